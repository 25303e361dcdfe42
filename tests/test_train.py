"""The trainer: loss falls, exact resume, sharding on 8 fake devices, bad input."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.child_env import child_env, eight_devices_env
from tests.jaxpr_walk import iter_equations
from tests.train_fixtures import tiny_config
from train import checkpoint as checkpoint_lib
from train import main as main_lib
from train import sharding as sharding_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _records(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_held_out_loss_and_writes_outputs(tmp_path):
    """12 steps: held-out loss falls clearly; metrics, TensorBoard, PNG, checkpoints written."""
    config = tiny_config(tmp_path, num_steps=12, eval_every=6, checkpoint_every=6)
    result = main_lib.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 12
    assert result["eval_loss"] < result["first_eval_loss"] - 1.0
    records = _records(tmp_path / "run")
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert {"loss", "learning_rate", "tokens_per_s", "grad_norm"} <= set(train_records[0])
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 6, 12]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [6, 12]


def test_resume_is_exact_across_refresh_and_hybrid_switch(tmp_path):
    """Stopping at step 3 and resuming gives bit-identical losses to an uninterrupted run.

    update_every=2 and the hybrid switch at step 3 (50% of 6): the resumed part crosses a
    projector refresh (step 4) and the switch to random projections.
    """
    full = tiny_config(tmp_path)
    main_lib.train_and_evaluate(full, tmp_path / "full")
    split = tiny_config(tmp_path, run_steps=3)
    first = main_lib.train_and_evaluate(split, tmp_path / "split")
    assert first["step"] == 3
    split.run_steps = None
    second = main_lib.train_and_evaluate(split, tmp_path / "split")
    assert second["step"] == 6

    def losses(workdir):
        return [(r["step"], r["loss"]) for r in _records(workdir) if "loss" in r]

    assert losses(tmp_path / "split") == losses(tmp_path / "full")


@pytest.mark.parametrize("axis_types", ["auto", "explicit"])
def test_eight_fake_devices_match_one_and_shard_state(tmp_path, axis_types):
    """Meshes (8,1,1), (2,4,1), (2,2,2) give the losses of 1 device; params AND state sharded.
    ``mesh.axis_types='explicit'`` (Explicit axes; the 1-device and 2x2x2 meshes, to keep it
    cheap): the same losses and the same shardings, now the arrays' types; also for the
    stacked full-gradient step (``model.scan_layers``, two layers per optimizer call), there
    with ``mesh.typed_update=True`` (every operation of the update typed)."""
    flags = ["--explicit"] if axis_types == "explicit" else []
    out = subprocess.run(
        [sys.executable, "-m", "tests.multidevice_check", str(tmp_path), *flags],
        env=eight_devices_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    reference = result["losses"]["1"]
    if axis_types == "explicit":  # the stacked full-gradient step (scan_layers) as well
        stacked = result["losses"]["stacked_2_per_call_2x2x2"]
        assert stacked == pytest.approx(result["losses"]["stacked_2_per_call_1"], rel=1e-5)
        specs = result["specs"]["stacked_2_per_call_2x2x2"]
        assert specs["q_basis"] == "P(None, 'fsdp', None)"
        assert specs["q_mu"] == "P(None, 'fsdp', 'tensor')"
        assert specs["q_mu_shard_shape"] == [2, 4, 32]  # 2 layers, r=8 over fsdp, 64 over tensor
    for name in [n for n in ("8x1x1", "2x4x1", "2x2x2") if n in result["losses"]]:
        # fp32 compute; only the order of cross-device reductions differs.
        assert result["losses"][name] == pytest.approx(reference, rel=1e-5), name
    specs = result["specs"]["2x2x2"]
    assert specs["q_kernel"] == "P('fsdp', 'tensor')"
    assert specs["q_kernel_shards"] == 8
    # Left-projected q (64 x 64): P spans rows (fsdp), the r x n moment keeps cols (tensor)
    # and its rank dim takes the rows' fsdp.
    assert specs["q_basis"] == "P('fsdp', None)"
    assert specs["q_mu"] == "P('fsdp', 'tensor')"
    assert specs["q_mu_shard_shape"] == [4, 32]  # r=8 over fsdp=2, 64 columns over tensor=2
    # Right-projected down_proj (128 x 64): Q spans cols (fsdp), the m x r moment keeps rows.
    assert specs["down_basis"] == "P('fsdp', None)"
    assert specs["down_mu"] == "P('tensor', 'fsdp')"


def test_steps_trace_with_the_gc_paused_and_restore_it():
    """train/sharding.trace_context: the trainer's steps trace inside it (mesh and logical
    rules set, Python's cyclic GC paused); on leaving, nested or by an exception, the GC is as
    it was."""
    import gc

    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    seen = []

    @jax.jit
    def traced(x):
        seen.append((gc.isenabled(), jax.sharding.get_abstract_mesh().axis_names))
        return x + 1

    step = sharding_lib.in_trace_context(mesh, traced)
    assert gc.isenabled()
    step(jnp.zeros(2))
    step.lower(jnp.zeros(3))
    assert seen == [(False, sharding_lib.MESH_AXES)] * 2 and gc.isenabled()
    with sharding_lib.trace_context(mesh):
        with sharding_lib.trace_context(mesh):
            pass
        assert not gc.isenabled()  # the outer context still holds it
    assert gc.isenabled()
    with pytest.raises(ValueError), sharding_lib.trace_context(mesh):
        raise ValueError
    assert gc.isenabled()
    gc.disable()
    try:
        with sharding_lib.trace_context(mesh):
            pass
        assert not gc.isenabled()  # paused by the caller: left paused
    finally:
        gc.enable()


def test_mesh_axis_types_are_checked(tmp_path):
    """``mesh.axis_types``: 'auto' or 'explicit', and 'explicit' only for the plain step; the
    mesh gets the axis types asked for."""
    config = tiny_config(tmp_path)
    main_lib.validate_config(config)
    config.mesh.axis_types = "manual"
    with pytest.raises(ValueError, match=r"config.mesh.axis_types must be one of \['auto', "):
        main_lib.validate_config(config)
    config.mesh.axis_types = "explicit"
    main_lib.validate_config(config)
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "axis_types": "explicit"})
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
    config.step.layerwise = True
    with pytest.raises(ValueError, match="axis_types='explicit' runs the full-gradient step"):
        main_lib.validate_config(config)
    config.step.layerwise = False
    config.mesh.typed_update = True
    main_lib.validate_config(config)
    config.mesh.axis_types = "auto"
    with pytest.raises(ValueError, match=r"typed_update=True needs config.mesh.axis_types="):
        main_lib.validate_config(config)


def test_explicit_modes_give_the_auto_losses_with_typed_state(tmp_path):
    """One device, 2 steps (a refresh, then a steady step): ``axis_types='explicit'`` with the
    update inside auto_axes (default) and with every operation typed
    (``mesh.typed_update=True``) give auto's losses, and the state comes back with explicit
    types. The default lowers a fraction of the typed mode's sharding constraints (JAX puts
    one after every typed operation; step_lib.guarded says why that matters).

    Tolerance: fp32 throughout; the three programs differ only in sharding annotations,
    which on one device can change XLA's fusion and so the order of a reduction's sums: a
    few ulps of the loss per step, far below 1e-6 relative after 2 steps."""
    config = tiny_config(tmp_path)
    batches = [
        {"inputs": b, "targets": b}
        for b in jax.random.randint(jax.random.key(3), (2, 8, 32), 0, 512, jnp.int32)
    ]
    losses, constraints = {}, {}
    for mode, axis_types, typed in (
        ("auto", "auto", False),
        ("placed", "explicit", False),
        ("typed", "explicit", True),
    ):
        config.mesh.axis_types, config.mesh.typed_update = axis_types, typed
        main_lib.validate_config(config)
        trainer = main_lib.build_trainer(config, sharding_lib.make_mesh(config.mesh))
        state = trainer.init(jax.random.key(0))
        batch = main_lib.to_global(batches[0], trainer.batch_sharding)
        lowered = trainer.train_step.lower(state, batch)
        constraints[mode] = lowered.as_text().count("sdy.sharding_constraint")
        losses[mode] = []
        for b in batches:
            state, metrics = trainer.train_step(
                state, main_lib.to_global(b, trainer.batch_sharding)
            )
            losses[mode].append(float(metrics["loss"]))
        if axis_types == "explicit":
            for leaf in jax.tree.leaves((state.params, state.opt_state)):
                if hasattr(leaf, "sharding") and jnp.issubdtype(leaf.dtype, jnp.floating):
                    axes = jax.typeof(leaf).sharding.mesh.axis_types
                    assert set(axes) == {jax.sharding.AxisType.Explicit}, mode
    assert losses["placed"] == pytest.approx(losses["auto"], rel=1e-6)
    assert losses["typed"] == pytest.approx(losses["auto"], rel=1e-6)
    assert constraints["auto"] < constraints["placed"] < constraints["typed"] / 4, constraints


def test_bad_mesh_raises_before_compiling():
    with pytest.raises(ValueError, match="devices but 1 are available"):
        sharding_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with pytest.raises(ValueError, match="at most one -1"):
        sharding_lib.make_mesh({"data": -1, "fsdp": -1, "tensor": 1})


def test_model_dim_not_divisible_by_mesh_names_the_param():
    mesh = jax.sharding.Mesh([[[d]] for d in jax.devices()[:1]], sharding_lib.MESH_AXES)
    shapes = {"w": jax.ShapeDtypeStruct((6, 4), "float32")}
    fake_mesh = type("M", (), {"shape": {"data": 1, "fsdp": 4, "tensor": 1}})()
    with pytest.raises(ValueError, match=r"param \['w'\].*dim 0 \(6\).*fsdp"):
        sharding_lib.check_divisible(
            shapes, {"w": jax.sharding.PartitionSpec("fsdp")}, fake_mesh, "param"
        )
    del mesh


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"optimizer.name": "sophia"}, ValueError, "optimizer.name"),
        ({"seq_len": 64}, ValueError, "max_seq_len"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite"),
        ({"data.paths": ["/nonexistent/corpus.txt"]}, FileNotFoundError, "/nonexistent"),
        ({"model.vocab_size": 100}, ValueError, "100"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"step.relora": True}, ValueError, "grad_clip=0"),
        (
            {"step.relora": True, "optimizer.grad_clip": 0.0, "optimizer.name": "gosare"},
            ValueError,
            "basis projector",
        ),
        (
            {"step.relora": True, "optimizer.grad_clip": 0.0, "model.scan_layers": True},
            ValueError,
            "scan_layers=False",
        ),
        ({"optimizer.inner.name": "adamw8bit", "optimizer.name": "osd"}, ValueError, "adamw8bit"),
        (
            {"optimizer.subspace.projection_dtype": "bf16"},
            ValueError,
            "optimizer.subspace.projection_dtype",
        ),
        ({"model.attention": "flash"}, ValueError, "attention='flash'"),
    ],
)
def test_bad_config_raises_clear_error(tmp_path, overrides, error, match):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(error, match=match):
        main_lib.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_other_runtime_model_fields(tmp_path):
    """remat / attention / compute dtype change how a step runs, not the saved state: a run
    resumes across them (old checkpoints stored them in the fingerprint: ignored there too)."""
    run = tmp_path / "run"
    main_lib.train_and_evaluate(
        tiny_config(tmp_path, num_steps=3, **{"model.attention": "einsum"}), run
    )
    result = main_lib.train_and_evaluate(
        tiny_config(tmp_path, num_steps=5, **{"model.remat": True, "model.attention": "auto"}),
        run,
    )
    assert result["step"] == 5
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 5  # resumed, each step logged once
    old = {"model": {"hidden_size": 64, "remat": False, "dtype": "float32"}, "seq_len": 32}
    assert checkpoint_lib.comparable(old) == {"model": {"hidden_size": 64}, "seq_len": 32}


_CACHED_RUN = """
import json, logging, sys, pathlib
import jax
from tests.train_fixtures import tiny_config
from train import main as main_lib
cache_in = main_lib.use_compilation_cache
def use_cache_for_every_compile(directory):  # however fast this machine compiles
    cache_in(directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
main_lib.use_compilation_cache = use_cache_for_every_compile
hits = []
class Hits(logging.Handler):  # JAX logs each persistent-cache hit, naming the program
    def emit(self, record):
        if record.getMessage().startswith("Persistent compilation cache hit"):
            hits.append(record.args[0])
compiler_log = logging.getLogger("jax._src.compiler")
compiler_log.setLevel(logging.DEBUG)
compiler_log.addHandler(Hits(logging.DEBUG))
tmp = pathlib.Path(sys.argv[1])
run_steps = int(sys.argv[2]) or None
config = tiny_config(tmp, num_steps=6, run_steps=run_steps, compilation_cache_dir=str(tmp / "xla"))
main_lib.train_and_evaluate(config, tmp / "run")
print(json.dumps({"hits": hits}))
"""


def test_compilation_cache_serves_a_resumed_run(tmp_path):
    """config.compilation_cache_dir: the first run stores its compiled steps there, the resumed
    run (a new process, same config) loads them: JAX reports cache hits only then.
    Subprocesses: the cache setting is process-wide."""
    env = child_env()

    def run(run_steps: int) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", _CACHED_RUN, str(tmp_path), str(run_steps)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["hits"]

    assert run(3) == []  # steps 1-3 of 6, then stops (as if preempted)
    entries = sorted(p.name for p in (tmp_path / "xla").iterdir())
    assert any(name.startswith("jit_train_step") for name in entries), entries
    # resumed from step 3 to the end: the train step came from the cache
    assert "jit_train_step" in run(0)
    assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r][-1] == 6


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        main_lib.train_and_evaluate(tiny_config(tmp_path), blocker / "run")


def test_checkpoint_from_other_config_is_refused_and_kept(tmp_path):
    """Resuming with a different rank names the mismatch and leaves the checkpoint intact."""
    main_lib.train_and_evaluate(tiny_config(tmp_path, num_steps=3), tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"optimizer.subspace.rank"):
        main_lib.train_and_evaluate(
            tiny_config(tmp_path, num_steps=6, **{"optimizer.subspace.rank": 4}), tmp_path / "run"
        )
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_batch_refresh_off_or_bounded_gives_the_same_update(tmp_path):
    """optimizer.subspace.batch_refresh=False (one decomposition per matrix, no stacked
    copy), optimizer.subspace.refresh_batch_size=2 (stacks of at most 2) and the default stacked
    refresh choose the same bases and updates (two steps: the learning rate is 0 at step 0 of
    the warmup)."""
    from train import optimizer as optimizer_lib

    params = {
        "model": {f"layers_{i}": {"w": jnp.zeros((16, 40))} for i in range(3)},
        "norm": jnp.zeros((16,)),
    }
    leaves, treedef = jax.tree.flatten(params)
    grads = treedef.unflatten(
        [jax.random.normal(jax.random.key(i), p.shape) for i, p in enumerate(leaves)]
    )
    results = []
    for batched, bound, expected_eighs in ((True, 0, 1), (False, 0, 3), (True, 2, 2)):
        config = tiny_config(
            tmp_path,
            **{
                "optimizer.name": "galore",
                "optimizer.subspace.batch_refresh": batched,
                "optimizer.subspace.refresh_batch_size": bound,
            },
        )
        tx = optimizer_lib.build_optimizer(config.optimizer, config.num_steps)
        update = jax.jit(tx.update)
        state = tx.init(params)
        jaxpr = jax.make_jaxpr(tx.update)(grads, state, params).jaxpr
        # gram_eigh: one batched eigh for the 3 same-shape matrices, one each, or 2 + 1.
        eighs = sum(eqn.primitive.name == "eigh" for eqn in iter_equations(jaxpr))
        assert eighs == expected_eighs
        for _ in range(2):
            step_update, state = update(grads, state, params)
        results.append((step_update, state))

    def numbers(tree):  # typed PRNG keys compare through their data
        return [
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for x in jax.tree.leaves(tree)
        ]

    for other in results[1:]:
        for a, b in zip(numbers(results[0]), numbers(other), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(results[0][0]["model"]["layers_0"]["w"]).max()) > 1e-4
