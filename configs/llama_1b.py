"""LLaMA-1B (GaLore's configs/llama_1b.json), GaLore paper rank 512."""

from configs.base import llama_config


def get_config():
    config = llama_config(hidden=2048, intermediate=5461, heads=32, layers=24)
    config.optimizer.rank = 512
    return config
