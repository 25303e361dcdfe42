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


def run_and_resume(trainer, config, batches, run_dir: pathlib.Path, save_at: int = 3):
    """Trains through ``batches``, saving the state (orbax, train/checkpoint.py) before step
    ``save_at``; then restores it into the trainer's abstract state and trains through the
    remaining batches. Returns ``(state, losses, resumed, resumed_losses, metrics)``: the
    uninterrupted run's final state and per-step losses, the resumed run's final state and
    losses (the first ``save_at`` copied from the uninterrupted run) and the uninterrupted
    run's per-step metrics. Callers assert the two runs agree bit for bit."""
    import jax

    from train import checkpoint as checkpoint_lib

    checkpoints = checkpoint_lib.Checkpoints(run_dir, keep=1, every=save_at)
    state = trainer.init(jax.random.key(0))
    losses, metrics_seen = [], []
    try:
        for t, batch in enumerate(batches):
            if t == save_at:
                meta = {"data_position": save_at, "fingerprint": checkpoint_lib.fingerprint(config)}
                checkpoints.save(save_at, state, meta)
            state, metrics = trainer.train_step(state, batch)
            metrics_seen.append(metrics)
            losses.append(float(metrics["loss"]))
        step, resumed, _ = checkpoints.restore_latest(trainer.abstract_state, config)
        assert step == save_at and int(resumed.step) == save_at
        resumed_losses = losses[:save_at]
        for batch in batches[save_at:]:
            resumed, metrics = trainer.train_step(resumed, batch)
            resumed_losses.append(float(metrics["loss"]))
    finally:
        checkpoints.close()
    return state, losses, resumed, resumed_losses, metrics_seen


def assert_trees_equal(got, want) -> None:
    """Leaf by leaf, bit for bit (same structure)."""
    import jax
    import numpy as np

    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
