"""LLaMA-350M (GaLore's configs/llama_350m.json), GaLore paper rank 256."""

from configs.base import llama_config


def get_config():
    config = llama_config(hidden=1024, intermediate=2736, heads=16, layers=24)
    config.optimizer.rank = 256
    return config
