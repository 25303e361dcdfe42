"""LLaMA-1B (GaLore's configs/llama_1b.json), GaLore paper rank 512."""

from configs.base import model_named


def get_config():
    return model_named("llama_1b")
