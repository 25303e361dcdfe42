"""Helpers and the subprocess driver of tests/test_reliability.py (preemption, kill -9, 8 devices).

``python -m tests.reliability_run preempt DIR`` (with 8 fake devices) trains GoLore on a
(2, 2, 2) mesh in three phases in one process (one compile):

* a: pauses after step 1 until the test sends SIGTERM; the trainer saves step 1 and returns;
* b: resumes, pauses after step 3 until the test sends SIGINT; saves step 3 and returns;
* c: resumes, and hangs inside the save of step 6 after orbax has written the whole checkpoint
  to its temporary directory (just before the atomic rename), for the test to ``kill -9`` it.

``python -m tests.reliability_run resume DIR`` then resumes the killed run to the end, runs the
same config uninterrupted in another workdir, and prints both loss sequences and the checks
of every checkpoint left. Both pauses wait for the signal itself, so nothing depends on timing.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from tests.train_fixtures import tiny_config, write_corpus
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import loop as loop_lib
from train import main as main_lib
from train import sharding as sharding_lib

# ---------------------------------------------------------------- shared test helpers

_ORIGINAL_CROSS_ENTROPY = main_lib.cross_entropy
_ORIGINAL_BUILD_TRAINER = main_lib.build_trainer
_ORIGINAL_BUILD_DATASETS = data_lib.build_datasets
NAN, INF = -1, -2  # sentinels in targets[0, 0] that make the loss NaN / Inf


def poisoned_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """The trainer's loss, times NaN / Inf when targets[0, 0] holds a sentinel.

    Multiplying by the factor makes the gradient of every leaf non-finite too.
    """
    code = targets[0, 0]
    loss = _ORIGINAL_CROSS_ENTROPY(logits, jnp.maximum(targets, 0))
    return loss * jnp.where(code == NAN, jnp.nan, jnp.where(code == INF, jnp.inf, 1.0))


class _PoisonedIterator:
    """Wraps the train iterator: the batch of step s (1-based) gets ``poison[s]`` in targets."""

    def __init__(self, inner: data_lib.TrainIterator, poison: dict[int, int]) -> None:
        self._inner, self._poison = inner, poison

    def __next__(self) -> dict:
        step = self._inner.step + 1  # the data position is restored on resume
        batch = next(self._inner)
        if step in self._poison:
            batch["targets"] = batch["targets"].copy()
            batch["targets"][0, 0] = self._poison[step]
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def poisoned_build_datasets(poison: dict[int, int]):
    def build(*args, **kwargs):
        datasets = _ORIGINAL_BUILD_DATASETS(*args, **kwargs)
        datasets.train = _PoisonedIterator(datasets.train, poison)
        return datasets

    return build


_TRAINERS: dict[str, main_lib.Trainer] = {}


def cached_build_trainer(config: Any, mesh: jax.sharding.Mesh) -> main_lib.Trainer:
    """build_trainer, reusing the compiled steps of an earlier run with the same shapes.

    Only the fields the jitted steps depend on are in the key (not run_steps, nonfinite,
    max_skipped, checkpointing, logging), so a test compiles once per model/optimizer.
    """
    key = json.dumps(
        [
            config.model.to_dict(),
            config.optimizer.to_dict(),
            config.step.to_dict(),
            config.num_steps,
            config.seq_len,
            config.batch_size,
            [str(d) for d in mesh.devices.flat],
            list(mesh.devices.shape),
            main_lib.cross_entropy.__name__,
        ],
        default=str,
    )
    if key not in _TRAINERS:
        _TRAINERS[key] = _ORIGINAL_BUILD_TRAINER(config, mesh)
    return _TRAINERS[key]


def records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record (a non-finite loss is null in the file: None)."""
    return [(r["step"], r["loss"]) for r in records(workdir) if "loss" in r]


def nonfinite_leaves(tree: Any) -> list[str]:
    return [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf)))
    ]


def check_checkpoints(config: Any, workdir: pathlib.Path) -> dict[int, list[str]]:
    """Restores every checkpoint of ``workdir``: {step: non-finite leaves of its state}."""
    mesh = sharding_lib.make_mesh(config.mesh)
    trainer = cached_build_trainer(config, mesh)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=100, every=1)
    try:
        out = {}
        for step in checkpoints.all_steps():
            state, _ = checkpoints.restore(step, trainer.abstract_state, config)
            assert int(state.step) == step
            out[step] = nonfinite_leaves(state)
        return out
    finally:
        checkpoints.close()


# ---------------------------------------------------------------- the subprocess driver


def preempt_config(tmp: pathlib.Path):
    """GoLore (random projector), refresh every 2 steps, saves every 2, keeps 2, 8 devices.

    Not hybrid: its SVD phase deadlocks on 8 fake CPU devices (a golore_jax issue, reported).
    """
    return tiny_config(
        tmp,
        checkpoint_every=2,
        **{"optimizer.name": "golore"},
        keep_checkpoints=2,
        **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    )


class _RecordingStop(loop_lib.StopRequest):
    current: _RecordingStop | None = None

    def __enter__(self):
        _RecordingStop.current = self
        return super().__enter__()


def _pausing(trainer: main_lib.Trainer, pause_after: set[int]) -> main_lib.Trainer:
    """After the steps in ``pause_after``: print PAUSED and wait for a signal to arrive."""
    import dataclasses

    def train_step(state, batch):
        state, metrics = trainer.train_step(state, batch)
        step = int(state.step)
        if step in pause_after:
            print(f"PAUSED {step}", flush=True)
            deadline = time.monotonic() + 300
            while _RecordingStop.current.signal is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("no signal arrived")
                time.sleep(0.05)
        return state, metrics

    return dataclasses.replace(trainer, train_step=train_step)


def _hang_in_save(step: int) -> None:
    """Makes orbax block forever just before renaming the finished temporary dir of ``step``."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self._final_path.name == str(step) and self._final_path.parent.name == "checkpoints":
            print(f"SAVING {step} {self._tmp_path}", flush=True)
            time.sleep(3600)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def preempt(tmp: pathlib.Path) -> None:
    config = preempt_config(tmp)
    loop_lib.StopRequest = _RecordingStop
    pause: set[int] = set()
    main_lib.build_trainer = lambda c, m: _pausing(cached_build_trainer(c, m), pause)
    for phase, after in (("a", 1), ("b", 3)):
        pause.clear()
        pause.add(after)
        result = main_lib.train_and_evaluate(config, tmp / "run")
        print(f"PHASE {phase} {json.dumps(result)}", flush=True)
    pause.clear()
    _hang_in_save(6)
    main_lib.train_and_evaluate(config, tmp / "run")
    print("NOT KILLED", flush=True)


def resume(tmp: pathlib.Path) -> None:
    config = preempt_config(tmp)
    main_lib.build_trainer = cached_build_trainer
    resumed = main_lib.train_and_evaluate(config, tmp / "run")
    reference = main_lib.train_and_evaluate(config, tmp / "reference")
    out = {
        "devices": jax.device_count(),
        "resumed": resumed,
        "reference": reference,
        "losses": losses(tmp / "run"),
        "reference_losses": losses(tmp / "reference"),
        "eval_steps": [r["step"] for r in records(tmp / "run") if "eval_loss" in r],
        "checkpoints": check_checkpoints(config, tmp / "run"),
    }
    print("RESULT " + json.dumps(out), flush=True)


def table(tmp: pathlib.Path) -> None:
    """Tries every bad input; prints a markdown table of the exact errors (docs/bad_inputs.md)."""
    import os
    import shutil

    import optax

    import golore_jax as gl
    from golore_jax import _layout as layout
    from golore_jax import projectors
    from golore_jax._subspace import scale_by_subspace

    rows: list[tuple[str, str, str, str]] = []

    def attempt(area: str, what: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # record whatever is raised
            message = " ".join(str(e).split())
            if len(message) > 400:
                message = message[:400] + " ..."
            rows.append((area, what, type(e).__name__, message.replace(str(tmp), "TMP")))
            return
        rows.append((area, what, "(no error)", ""))

    # --- library: golore_jax
    bad_params = {"layer": {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros((6,))}}

    def subspace(params=None, **kw):
        kw = {"update_every": 2, **kw}
        return lambda: scale_by_subspace(optax.scale_by_adam(), **kw).init(
            bad_params if params is None else params
        )

    lib = [
        ("rank=-2", subspace(rank=-2)),
        ("rank=4 on a 4x6 leaf (full rank)", subspace(rank=4)),
        ("rank=5 on a 4x6 leaf", subspace(rank=5)),
        ("rank callable returning 0", subspace(rank=lambda p, mn: 0)),
        ("update_every=0", subspace(rank=2, update_every=0)),
        ("update_every=-1", subspace(rank=2, update_every=-1)),
        ("second_moment='rotate'", subspace(rank=2, second_moment="rotate")),
        ("scale=nan", subspace(rank=2, scale=float("nan"))),
        ("projection_dtype='bf16'", subspace(rank=2, projection_dtype="bf16")),
        (
            "mask selects a 1-D leaf",
            subspace(rank=1, mask={"layer": {"kernel": True, "bias": True}}),
        ),
        (
            "mask selects an int32 leaf",
            subspace({"ids": jnp.zeros((4, 6), jnp.int32)}, rank=1, mask={"ids": True}),
        ),
        ("mask missing a leaf", subspace(rank=1, mask={"layer": {"kernel": True}})),
        (
            "mask with an extra leaf",
            subspace(rank=1, mask={"layer": {"kernel": True, "bias": False, "extra": True}}),
        ),
        ("paper_msgd_hyperparams(0.1, beta1=1.5)", lambda: gl.paper_msgd_hyperparams(0.1, 1.5)),
        ("golore_projector(1.5, 100)", lambda: gl.golore_projector(1.5, 100)),
        ("golore_projector(0.5, total_steps=None)", lambda: gl.golore_projector(0.5, None)),
        (
            "golore_adamw(subspace=Subspace(projector=...))",
            lambda: gl.golore_adamw(1e-3, subspace=gl.Subspace(projector=projectors.svd())),
        ),
        ("Subspace(update_every=0)", lambda: gl.Subspace(update_every=0)),
        ("Subspace(side='smaller')", lambda: gl.Subspace(side="smaller")),
        ("Execution(refresh_batch_size=0)", lambda: gl.Execution(refresh_batch_size=0)),
        ("Sparse(k=3, density=0.5)", lambda: gl.Sparse(k=3, density=0.5)),
        ("Online(orthonormalize_every=0)", lambda: gl.Online(orthonormalize_every=0)),
        (
            "galore_adamw(subspace={'rank': 2}) (not a Subspace)",
            lambda: gl.galore_adamw(1e-3, subspace={"rank": 2}),
        ),
        ("galore_adamw(rnak=2) (a misspelt keyword)", lambda: gl.galore_adamw(1e-3, rnak=2)),
        ("layout.most_square_split((5,))", lambda: layout.most_square_split((5,))),
        ("projectors.random('householder')", lambda: projectors.random("householder")),
        ("projectors.hybrid(-1)", lambda: projectors.hybrid(-1)),
    ]
    int_params = {"w": jnp.ones((4, 6)), "ids": jnp.zeros((4, 6), jnp.int32)}

    def int_leaf_update(grads):
        tx = gl.galore_adamw(1e-3, subspace=gl.Subspace(rank=2, update_every=2))
        return lambda: tx.update(grads, tx.init(int_params), int_params)

    float0 = jax.grad(
        lambda p: jnp.sum(p["w"]) + jnp.sum(p["ids"]).astype(jnp.float32), allow_int=True
    )(int_params)
    lib += [
        (
            "int32 param with a float32 gradient (update)",
            int_leaf_update({"w": jnp.ones((4, 6)), "ids": jnp.ones((4, 6))}),
        ),
        ("float0 gradient, jax.grad(allow_int=True) (update)", int_leaf_update(float0)),
    ]
    for what, fn in lib:
        attempt("library", what, fn)

    # --- data pipeline (through the trainer: config.data)
    base = tiny_config(tmp)
    files = {
        "bad.txt": b"\xff\xfe\xfa not utf-8",
        "bad.jsonl": b'{"text": "ok"}\n{broken\n',
        "field.jsonl": b'{"body": "no text field"}\n',
        "bad.csv": b"a,b\n",
        "empty.txt": b"\n\n  \n",
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    single = write_corpus(tmp / "single")  # one .txt file: one document (txt_split='file')
    data_cases = [
        ("data.paths: missing file", {"data.paths": [str(tmp / "nope.jsonl")]}),
        ("data.paths: a directory with no data file", {"data.paths": [str(tmp / "cache")]}),
        *[(f"data.paths: {n} ({c!r})", {"data.paths": [str(tmp / n)]}) for n, c in files.items()],
        ("data.source='s3'", {"data.source": "s3"}),
        (
            "data.ngram_min_count=0, source='sampled'",
            {"data.source": "sampled", "data.ngram_min_count": 0},
        ),
        ("data.tokenizer: missing tokenizer.json", {"data.tokenizer": str(tmp / "missing.json")}),
        ("data.tokenizer: broken tokenizer.json", {"data.tokenizer": str(tmp / "bad.jsonl")}),
        ("data.vocab_size 512 > model.vocab_size 100", {"model.vocab_size": 100}),
        ("data.eval_fraction=1.5", {"data.eval_fraction": 1.5}),
        ("data.eval_fraction=0.0001 (no held-out batch)", {"data.eval_fraction": 0.0001}),
        ("batch_size=100000 (more than the data)", {"batch_size": 100_000}),
        (
            "data.stream_files=True on one .txt file (one document)",
            {"data.paths": [str(single)], "data.stream_files": True, "data.txt_split": "file"},
        ),
    ]
    (tmp / "cache").mkdir(exist_ok=True)
    (tmp / "blocker").write_text("a file")
    # --- trainer config
    config_cases = [
        ("optimizer.name='sophia'", {"optimizer.name": "sophia"}),
        ("optimizer.inner.name='lion'", {"optimizer.inner.name": "lion"}),
        ("optimizer.learning_rate=0", {"optimizer.learning_rate": 0.0}),
        ("seq_len=64 > model.max_seq_len=32", {"seq_len": 64}),
        ("batch_size=0", {"batch_size": 0}),
        ("num_steps=-1", {"num_steps": -1}),
        ("nonfinite='ignore'", {"nonfinite": "ignore"}),
        ("log_level='loud'", {"log_level": "loud"}),
        ("mesh data=2 on 1 device", {"mesh.data": 2}),
        ("mesh data=-1, fsdp=-1", {"mesh.data": -1, "mesh.fsdp": -1}),
        (
            "optimizer.subspace.rank=64 = min(m, n) of 64x64 kernels",
            {"optimizer.subspace.rank": 64},
        ),
        (
            "optimizer.subspace.projection_dtype='int8'",
            {"optimizer.subspace.projection_dtype": "int8"},
        ),
        ("model.attention='flash'", {"model.attention": "flash"}),
        ("model.attention='cudnn', fp32 compute", {"model.attention": "cudnn"}),
        (
            "model.attention='cudnn' on CPU",
            {"model.attention": "cudnn", "model.dtype": "bfloat16"},
        ),
        ("keep_checkpoints=0", {"keep_checkpoints": 0}),
        ("optimizer.inner.b1=1.5", {"optimizer.inner.b1": 1.5}),
        ("optimizer.inner.b2=1.0", {"optimizer.inner.b2": 1.0}),
        ("optimizer.grad_clip=-1", {"optimizer.grad_clip": -1.0}),
        ("optimizer.weight_decay=-0.1", {"optimizer.weight_decay": -0.1}),
        ("optimizer.warmup_steps=7 > num_steps=6", {"optimizer.warmup_steps": 7}),
        ("optimizer.min_lr_ratio=2", {"optimizer.min_lr_ratio": 2.0}),
        ("optimizer.subspace.update_every=0", {"optimizer.subspace.update_every": 0}),
        ("optimizer.subspace.golore_fraction=1.5", {"optimizer.subspace.golore_fraction": 1.5}),
        ("optimizer.subspace.projector='qr'", {"optimizer.subspace.projector": "qr"}),
        (
            "optimizer.sparse.density=1.5, name='gasare'",
            {"optimizer.name": "gasare", "optimizer.sparse.density": 1.5},
        ),
        (
            "optimizer.online.projector_learning_rate=0, name='osd'",
            {"optimizer.name": "osd", "optimizer.online.projector_learning_rate": 0.0},
        ),
        ("step.layer_grad_clip=1 without step.layerwise", {"step.layer_grad_clip": 1.0}),
        ("step.layers_per_call=2, unstacked layers", {"step.layers_per_call": 2}),
        ("model.weight_storage='int4'", {"model.weight_storage": "int4"}),
        ("model.weight_storage='int8' without step.layerwise", {"model.weight_storage": "int8"}),
        (
            "model.weight_storage='int8', bf16 params, no stochastic rounding",
            {
                "model.weight_storage": "int8",
                "model.scan_layers": True,
                "step.layerwise": True,
                "optimizer.grad_clip": 0.0,
                "model.param_dtype": "bfloat16",
            },
        ),
        ("step.relora=True with optimizer.grad_clip=1", {"step.relora": True}),
        ("eval_batches=0", {"eval_batches": 0}),
        ("run_steps=0", {"run_steps": 0}),
        (
            "mechanism.grad_noise_every=3, log_every=2",
            {"mechanism.grad_noise_every": 3, "log_every": 2},
        ),
        (
            "mechanism.subspace_overlap=True with step.layerwise=True",
            {
                "mechanism.subspace_overlap": True,
                "model.scan_layers": True,
                "step.layerwise": True,
                "optimizer.grad_clip": 0.0,
            },
        ),
        ("checkpoint_every=0", {"checkpoint_every": 0}),
        ("max_skipped=-1", {"max_skipped": -1}),
        ("coordinator_address='10.0.0.1' (no port)", {"coordinator_address": "10.0.0.1"}),
        ("num_processes=0", {"num_processes": 0}),
        ("process_id=2, num_processes=2", {"num_processes": 2, "process_id": 2}),
        ("heartbeat_timeout_s=0", {"heartbeat_timeout_s": 0}),
        ("compilation_cache_dir is a file", {"compilation_cache_dir": str(tmp / "blocker")}),
        ("data.cache_dir below a file", {"data.cache_dir": str(tmp / "blocker" / "cache")}),
    ]
    main_lib.build_trainer = cached_build_trainer
    for i, (what, overrides) in enumerate(data_cases + config_cases):
        area = "data" if i < len(data_cases) else "trainer config"
        attempt(
            area,
            what,
            lambda o=overrides, i=i: main_lib.train_and_evaluate(
                tiny_config(tmp, **o), tmp / f"run{i}"
            ),
        )
    blocker = tmp / "blocker"
    attempt(
        "workdir",
        "workdir below a regular file",
        lambda: main_lib.train_and_evaluate(base, blocker / "run"),
    )
    if os.geteuid() != 0:
        ro = tmp / "readonly"
        ro.mkdir()
        ro.chmod(0o500)
        attempt("workdir", "read-only workdir", lambda: main_lib.train_and_evaluate(base, ro))

    # --- checkpoints: a 3-step golore run to tamper with
    main_lib.cross_entropy = poisoned_cross_entropy
    config = tiny_config(tmp, num_steps=6, run_steps=3, **{"optimizer.name": "golore"})
    main_lib.train_and_evaluate(config, tmp / "good")
    config.run_steps = None

    def tampered(name: str, change, cfg=config):
        work = tmp / name
        shutil.copytree(tmp / "good", work)
        change(work / "checkpoints" / "3")
        return lambda: main_lib.train_and_evaluate(cfg, work)

    def flip(step_dir):
        f = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(bytes(b))

    def truncate(step_dir):
        f = step_dir / "state" / "manifest.ocdbt"
        f.write_bytes(f.read_bytes()[:10])

    def truncate_unverified(step_dir):
        (step_dir / checkpoint_lib.CHECKSUMS).unlink()
        truncate(step_dir)

    def flip_unverified(step_dir):
        (step_dir / checkpoint_lib.CHECKSUMS).unlink()
        flip(step_dir)

    def bad_meta(step_dir):
        (step_dir / checkpoint_lib.CHECKSUMS).unlink()
        (step_dir / "meta" / "metadata").write_text("{not json")

    ckpt_cases = [
        (
            "checkpoint from optimizer.subspace.rank=8, config rank=4",
            tampered(
                "rank",
                lambda d: None,
                tiny_config(tmp, **{"optimizer.name": "golore", "optimizer.subspace.rank": 4}),
            ),
        ),
        (
            "checkpoint from hidden_size=64, config hidden_size=32",
            tampered(
                "model",
                lambda d: None,
                tiny_config(tmp, **{"optimizer.name": "golore", "model.hidden_size": 32}),
            ),
        ),
        (
            "checkpoint from optimizer golore, config galore",
            tampered("name", lambda d: None, tiny_config(tmp, **{"optimizer.name": "galore"})),
        ),
        ("only checkpoint: one byte flipped in a data file", tampered("flip", flip)),
        ("only checkpoint: state/manifest.ocdbt truncated", tampered("trunc", truncate)),
        (
            "only checkpoint: manifest truncated, crc32.json deleted",
            tampered("trunc2", truncate_unverified),
        ),
        ("only checkpoint: meta/metadata not JSON, crc32.json deleted", tampered("meta", bad_meta)),
        (
            "only checkpoint: state/ deleted",
            tampered("nostate", lambda d: shutil.rmtree(d / "state")),
        ),
        (
            "only checkpoint: byte flipped, crc32.json deleted (undetectable)",
            tampered("flip2", flip_unverified),
        ),
    ]
    ckpt_cases.append(
        (
            "resume with batch_size=16, checkpoint saved with 8",
            tampered(
                "batch",
                lambda d: None,
                tiny_config(tmp, batch_size=16, **{"optimizer.name": "golore"}),
            ),
        )
    )
    for what, fn in ckpt_cases:
        attempt("checkpoint", what, fn)

    def locked(pid: int, host: str):
        work = tmp / f"locked{pid}"
        shutil.copytree(tmp / "good", work)
        (work / checkpoint_lib.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host}))
        return lambda: main_lib.train_and_evaluate(config, work)

    attempt("workdir", "workdir locked by another run (.lock)", locked(4242, "other-host"))

    # --- non-finite steps (data poisoned at steps 2 and 3)
    data_lib.build_datasets = poisoned_build_datasets({2: NAN, 3: INF})
    for what, overrides in (
        ("NaN loss at step 2, nonfinite='stop'", {"nonfinite": "stop"}),
        ("NaN at step 2, Inf at step 3, nonfinite='skip', max_skipped=1", {"max_skipped": 1}),
    ):
        attempt(
            "non-finite",
            what,
            lambda o=overrides: main_lib.train_and_evaluate(
                tiny_config(tmp, **{"optimizer.name": "golore", **o}), tmp / f"nf{len(rows)}"
            ),
        )
    data_lib.build_datasets = _ORIGINAL_BUILD_DATASETS

    print("| area | bad input | exception | message |")
    print("|---|---|---|---|")
    for area, what, error, message in rows:
        message = message.replace("|", "\\|")
        print(f"| {area} | {what} | {error} | {message} |")


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(sys.argv[2]) / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    {"preempt": preempt, "resume": resume, "table": table}[sys.argv[1]](pathlib.Path(sys.argv[2]))
