"""The paper's Figure 3 run (Appendix E) on the endless sampled corpus (issue 32).

LLaMA-60M, 10,000 steps, batch 128 x seq 256, lr 1e-3 (warmup 1,000, cosine to 10%), rank
128, scale 1, update_every (tau) 200, AdamW (b1 0.9, b2 0.999), bf16 compute over fp32
params, grad clip 1.0, on ``data.source='sampled'``: rows drawn on the fly from a trigram
source fitted on GCIDE with a 32k BPE (train/sampled.py), so no row repeats and the held-out
loss has a known floor (``eval_floor``; ``eval_excess`` is the loss above the source's own
loss on the same held-out rows). The mechanism metrics are on: the gradient's noise and signal
per matrix every 100 steps, the subspace overlap at every refresh (train/mechanism.py).

Choose the method with ``--config.optimizer.name`` (adamw | galore | hybrid (GoLore@20%) |
golore) and the seed with ``--config.seed`` (init and training rows; the held-out rows are
the same for every seed). experiments/figure3_sampled.sh runs the four.
"""

from configs.base import model_named


def get_config():
    config = model_named("llama_60m")  # rank 128, tau 200, scale 1, lr 1e-3, 10,000 steps
    config.data.source = "sampled"
    config.eval_every = 500
    config.eval_batches = 16  # 2,048 held-out rows (524k tokens), the same for every run
    config.checkpoint_every = 500
    config.keep_checkpoints = 2
    config.mechanism.grad_noise_every = 100
    config.mechanism.subspace_overlap = True
    return config
