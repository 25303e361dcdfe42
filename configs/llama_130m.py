"""LLaMA-130M (GaLore's configs/llama_130m.json), GaLore paper rank 256."""

from configs.base import model_named


def get_config():
    return model_named("llama_130m")
