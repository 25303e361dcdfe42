"""Every LLaMA shape the configs and the benchmarks use, defined once.

``configs/llama_<name>.py`` builds its training config from ``MODELS["llama_<name>"]`` and the
benchmarks (``benchmarks/train_step.py``, ``compile_time.py``, ``state_memory.py``,
``galore_torch_step.py``, ``refresh.py``, ``relora_step.py``) look their shapes up here, so a
row named ``llama_60m`` in a benchmark table is the model ``configs/llama_60m.py`` trains.
"""

from __future__ import annotations

from typing import NamedTuple


class ModelShape(NamedTuple):
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int
    rank: int  # the GaLore paper's rank for this size (config.optimizer.subspace.rank)


MODELS: dict[str, ModelShape] = {
    # The README's laptop model (1.8M params with its 4k BPE vocabulary).
    "llama_tiny": ModelShape(128, 352, 4, 4, 4096, 32),
    # GaLore's configs/llama_*.json with the GaLore paper's ranks.
    "llama_60m": ModelShape(512, 1376, 8, 8, 32000, 128),
    "llama_130m": ModelShape(768, 2048, 12, 12, 32000, 256),
    "llama_350m": ModelShape(1024, 2736, 16, 24, 32000, 256),
    "llama_1b": ModelShape(2048, 5461, 32, 24, 32000, 512),
    "llama_7b": ModelShape(4096, 11008, 32, 32, 32000, 1024),
}

# Benchmark-only CPU smoke shape (no training config): 2 layers of hidden 64, MLP 172, a
# 256-token vocabulary; small enough to compile and refresh in seconds on 2 CPU cores.
SMOKE_MODELS: dict[str, ModelShape] = {
    "llama_micro": ModelShape(64, 172, 4, 2, 256, 16),
}
