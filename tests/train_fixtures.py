"""A tiny training config on a small local corpus, shared by the trainer tests."""

from __future__ import annotations

import pathlib

import ml_collections

from configs.base import llama_config

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
    "matches near the old river bank and children read stories about ships rivers mountains "
    "and distant cities under bright stars every evening before they sleep"
).split()


def write_corpus(directory: pathlib.Path, documents: int = 400) -> pathlib.Path:
    """Deterministic pseudo-sentences: enough structure for the loss to fall in a few steps."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for d in range(documents):
        words = [WORDS[(d * 7 + i * (d % 5 + 1)) % len(WORDS)] for i in range(40)]
        lines.append(" ".join(words) + ".")
    path = directory / "corpus.txt"
    path.write_text("\n\n".join(lines))
    return path


def tiny_config(tmp_path: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    """A 2-layer LLaMA (hidden 64, vocab 512) with GoLore@50%, rank 8, refresh every 2 steps."""
    config = llama_config(hidden=64, intermediate=128, heads=4, layers=2, vocab=512)
    config.model.max_seq_len = 32
    config.model.dtype = "float32"
    config.data.source = "files"
    config.data.paths = [str(write_corpus(tmp_path / "corpus"))]
    config.data.txt_split = "blank_lines"
    config.data.vocab_size = 512
    config.data.eval_fraction = 0.1
    config.data.cache_dir = str(tmp_path / "cache")
    config.seq_len = 32
    config.batch_size = 8
    config.num_steps = 6
    config.log_every = 1
    config.eval_every = 3
    config.eval_batches = 2
    config.checkpoint_every = 3
    config.optimizer.name = "hybrid"
    config.optimizer.subspace.golore_fraction = 0.5
    config.optimizer.learning_rate = 1e-2
    config.optimizer.warmup_steps = 1
    config.optimizer.subspace.rank = 8
    config.optimizer.subspace.update_every = 2
    config.update_from_flattened_dict(overrides)  # {"optimizer.subspace.rank": 3, ...}
    return config
