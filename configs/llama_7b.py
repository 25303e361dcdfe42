"""LLaMA-7B (GaLore's configs/llama_7b.json), rank 1024, update_every 500, remat on."""

from configs.base import llama_config


def get_config():
    config = llama_config(hidden=4096, intermediate=11008, heads=32, layers=32)
    config.optimizer.rank = 1024
    config.optimizer.update_every = 500
    config.model.remat = True
    config.batch_size = 16
    return config
