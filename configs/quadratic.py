"""Config of the counter-example experiment (Figure 1 of He et al. 2024, arXiv 2410.11289).

    python -m experiments.quadratic --config configs/quadratic.py --workdir /tmp/quadratic
    python -m experiments.quadratic --config configs/quadratic.py --workdir /tmp/minimal \
        --config.problem=minimal
    python -m experiments.quadratic --config configs/quadratic.py --workdir /tmp/family \
        --config.family=True   # + GaSare, GoSare, OSD, importance-sampled SVD

``problem="paper"`` is problem (1): ``f(X) = 1/2 ||A X||_F^2 + <B, X>_F`` with noise
``xi * sigma * C``. ``problem="minimal"`` is the instance from the proof of Theorem 1 (Theorem 5 in
the appendix): ``f(X) = L/2 ||p^T X||^2``, ``p = e_1``, noise ``xi * sigma_hat * Q Q^T``.

The GoLore authors' script (pkumelon/Golore ``exp/main.py``) used n=10, r=4, tau=100, sigma=1,
lr 3e-5 for 200,000 steps. We keep n, r, tau, sigma and their initial point and take larger
steps for 5,000 iterations with an exponentially decaying step size, so that the picture
appears in seconds on a CPU.
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
    config.num_steps = 5000
    config.update_every = 100  # tau: the subspace is refreshed when t % tau == 0.
    config.scale = 1.0  # alpha (the GoLore authors' toy script uses 1).
    config.golore_fraction = 0.5  # GoLore@x%: random projections for the last x of the steps.
    config.large_batch = 1024  # B: gradients averaged to choose large-batch GaLore's subspace.
    # The family of issue 10 (GaSare, GoSare, OSD, importance-sampled SVD): off by default to
    # keep the default command fast; --config.family=True adds them (figure1_family.png).
    config.family = False
    # GaSare/GoSare's k; 0 means rank * n (as many values as GaLore's rank-r moments).
    config.sparse_k = 0

    # AdamW in optax's convention (b1 = 0.9 is the paper's b1 = 0.1). No weight decay: decay
    # would move the minimiser away from f*'s and, in the minimal instance, shrink row 1.
    config.adamw = ml_collections.ConfigDict()
    config.adamw.learning_rate = 0.1
    config.adamw.b1 = 0.9
    config.adamw.b2 = 0.999
    config.adamw.eps = 1e-8
    config.adamw.weight_decay = 0.0
    # What a subspace refresh does to Adam's moments (golore_jax.scale_by_subspace): equation
    # (2) for the first moment, and "keep" / "reset" / "project" for the second.
    config.adamw.momentum_projection = False
    config.adamw.second_moment = "keep"

    # MSGD in the paper's convention: M <- (1 - b1) M + b1 G, X <- X - lr * M, mapped to optax
    # by golore_jax.paper_msgd_hyperparams (momentum = 1 - b1, learning rate lr * b1).
    config.msgd = ml_collections.ConfigDict()
    config.msgd.learning_rate = 1.0
    config.msgd.b1 = 0.1

    # Learning-rate schedule: "exponential" (or "cosine") decays lr to final_lr_fraction * lr,
    # "constant" keeps it. GoLore's random projections mix the noise sigma C into the rows of
    # grad f, so with a constant step GoLore only reaches a noise floor proportional to the step;
    # the decay averages the noise out (SGD's O(1/T) rate). Full-parameter training and GaLore do
    # not need it: their noise stays in the rows where grad f is zero.
    config.schedule = "exponential"
    config.final_lr_fraction = 1e-3

    # Seeds and output.
    config.seeds = (0, 1, 2)
    config.log_every = 10  # curve resolution in results.json / curves.csv.
    config.plot_metric = "loss_gap"  # "loss_gap" (f(X) - f*) or "grad_norm_sq" (||grad f||^2).
    return config
