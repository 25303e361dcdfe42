"""LLaMA-7B (GaLore's configs/llama_7b.json), rank 1024, update_every 500, remat on."""

from configs.base import model_named


def get_config():
    config = model_named("llama_7b")
    config.optimizer.subspace.update_every = 500
    config.model.remat = True
    config.batch_size = 16
    return config
