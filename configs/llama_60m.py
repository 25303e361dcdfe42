"""LLaMA-60M, the paper's pre-training recipe (Appendix E, Figure 3).

Batch 128, seq 256, lr 1e-3, rank 128, scale 1, update_every 200, 10,000 steps, AdamW, bf16,
GoLore@20% (the GoLore authors' script/Go_pt.sh: warmup 1,000).
"""

from configs.base import model_named


def get_config():
    return model_named("llama_60m")
