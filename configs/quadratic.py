"""Config of the counter-example experiment (Figure 1 of He et al. 2024, arXiv 2410.11289).

    python -m train.quadratic --config configs/quadratic.py --workdir /tmp/quadratic
    python -m train.quadratic --config configs/quadratic.py --workdir /tmp/minimal \
        --config.problem=minimal

``problem="paper"`` is problem (1): ``f(X) = 1/2 ||A X||_F^2 + <B, X>_F`` with noise
``xi * sigma * C``. ``problem="minimal"`` is the instance from the proof of Theorem 1 (Theorem 5 in
the appendix): ``f(X) = L/2 ||p^T X||^2``, ``p = e_1``, noise ``xi * sigma_hat * Q Q^T``.

The GoLore authors' script (pkumelon/Golore ``exp/main.py``) used n=10, r=4, tau=100, sigma=1,
lr 3e-5 for 200,000 steps. We keep n, r, tau, sigma and their initial point and take larger
steps for 2,000 iterations with a cosine decay, so that the picture appears in seconds on a CPU.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Defaults that reproduce Figure 1 in seconds on CPU."""
    config = ml_collections.ConfigDict()

    # Problem.
    config.problem = "paper"  # "paper": problem (1); "minimal": the proof of Theorem 1.
    config.n = 10  # X is n x n.
    config.rank = 4  # r: the rank of the projection, and of the noise block C in problem (1).
    config.sigma = 1.0  # noise level: xi * sigma * C, xi uniform on {+1, -1}.
    # Minimal instance only: L, and lambda = lambda_fraction * sigma_hat / L (Theorem 1 needs
    # 0 < lambda < sigma_hat / L).
    config.smoothness = 1.0
    config.lambda_fraction = 0.5

    # Methods and optimizers (a subset may be selected from the command line).
    config.methods = ("full", "galore", "golore", "golore@50%", "large_batch_galore")
    config.optimizers = ("adamw", "msgd")
    config.num_steps = 2000
    config.update_every = 100  # tau: the subspace is refreshed when t % tau == 0.
    config.scale = 1.0  # alpha (the GoLore authors' toy script uses 1).
    config.golore_fraction = 0.5  # GoLore@x%: random projections for the last x of the steps.
    config.large_batch = 1024  # B: gradients averaged to choose large-batch GaLore's subspace.

    # AdamW in optax's convention (b1 = 0.9 is the paper's b1 = 0.1). No weight decay: decay
    # would move the minimiser away from f*'s and, in the minimal instance, shrink row 1.
    config.adamw = ml_collections.ConfigDict()
    config.adamw.learning_rate = 0.05
    config.adamw.b1 = 0.9
    config.adamw.b2 = 0.999
    config.adamw.eps = 1e-8
    config.adamw.weight_decay = 0.0

    # MSGD in the paper's convention: M <- (1 - b1) M + b1 G, X <- X - lr * M, mapped to optax
    # by golore_jax.paper_msgd_hyperparams (momentum = 1 - b1, learning rate lr * b1).
    config.msgd = ml_collections.ConfigDict()
    config.msgd.learning_rate = 0.2
    config.msgd.b1 = 0.1

    # Learning-rate schedule: "cosine" decays to final_lr_fraction * lr, which lets the methods
    # that converge average the noise out (a constant step only reaches a noise floor), or
    # "constant".
    config.schedule = "cosine"
    config.final_lr_fraction = 0.0

    # Seeds and output.
    config.seeds = (0, 1, 2)
    config.log_every = 10  # curve resolution in results.json / curves.csv.
    config.plot_metric = "loss_gap"  # "loss_gap" (f(X) - f*) or "grad_norm_sq" (||grad f||^2).
    return config
