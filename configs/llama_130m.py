"""LLaMA-130M (GaLore's configs/llama_130m.json), GaLore paper rank 256."""

from configs.base import llama_config


def get_config():
    config = llama_config(hidden=768, intermediate=2048, heads=12, layers=12)
    config.optimizer.rank = 256
    return config
