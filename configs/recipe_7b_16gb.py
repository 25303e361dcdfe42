"""LLaMA-7B pre-training under 16 GB of device memory (issue 31): GaLore rank 1024, seq 256,
batch 16, with every memory option on.

* ``model.weight_storage="int8"``: the decoder layers' matrices as int8 with one fp32 scale per
  output channel, decoded to bf16 one layer at a time, updated with stochastic rounding;
  embedding, head and norms bf16 with stochastic rounding (``step.stochastic_rounding``).
* ``optimizer.subspace.basis_dtype="int4"``: projectors packed two values a byte, block scales.
* ``optimizer.inner.name="adamw8bit"``: 8-bit block-wise moments.
* ``step.layerwise`` (with ``model.scan_layers``; remat built in): each layer updated inside
  the backward pass, so no full gradient exists; each layer's gradient (and the rest's) is
  clipped to ``1 / sqrt(33)`` (33 groups; together they keep the global clip's bound of 1).
* ``optimizer.subspace.refresh_batch_size=1``: one matrix per decomposition in a refresh.
* ``optimizer.subspace.lazy_threshold=0.5``: a matrix whose new subspace overlaps the old one
  (``||P_old^T P_new||_F^2 / r``) by >= 0.5 at 2 refreshes in a row is refreshed half as often.

Measured on one H100 (README "Memory", benchmarks/memory_16gb.sh, without the per-layer clip):
13.8 GiB device peak over init, refresh and steady steps.
"""

import math

from configs import llama_7b


def get_config():
    config = llama_7b.get_config()
    config.seq_len = 256
    config.batch_size = 16
    config.model.scan_layers = True
    config.model.remat = True
    config.model.param_dtype = "bfloat16"
    config.model.weight_storage = "int8"
    config.step.stochastic_rounding = True
    config.step.layerwise = True
    config.optimizer.grad_clip = 0.0  # a global clip is impossible layer by layer
    config.step.layer_grad_clip = 1.0 / math.sqrt(config.model.num_layers + 1)
    config.optimizer.name = "galore"
    config.optimizer.inner.name = "adamw8bit"
    config.optimizer.subspace.basis_dtype = "int4"
    config.optimizer.subspace.refresh_batch_size = 1
    config.optimizer.subspace.lazy_threshold = 0.5
    return config
