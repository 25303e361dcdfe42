"""One optax-contract table over every alias of golore_jax (as optax's contrib/_common_test.py).

Every public ``golore_jax`` optimizer (``name(learning_rate, ...)`` holding a subspace
state) must have a row in ``ALIASES``: a new alias without one fails
``test_every_alias_is_in_the_table``. Each row runs through the same checks: jit and no jit
agree, updates have the params' shapes and dtypes (float32 and bfloat16 params), the alias
works inside optax wrappers (``chain``, ``masked``, ``MultiSteps``, ``inject_hyperparams``),
and a state round-tripped through a serialisation (flattened to host arrays, PRNG keys as key
data) gives the same next update.
"""

from __future__ import annotations

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import golore_jax as gl

# Small enough to be cheap, big enough that every alias projects "a" (rank 2 of a 6x4) and
# leaves "b" (a vector) at full shape. "a" is the first leaf, so that its update (random
# subspaces included: a leaf's key is folded with its index) is the same with "b" masked out.
# update_every=2: steps 0 and 2 refresh. The family optimizers run other optax inners (any
# transformation works inside); the drop-ins fix theirs.
_SUBSPACE = dict(subspace=gl.Subspace(rank=2, update_every=2))
_SPARSE = dict(sparse=gl.Sparse(k=5, update_every=2))
_ONLINE = dict(online=gl.Online(rank=2, update_every=1))
ALIASES = {
    "galore": dict(base_optimizer=optax.scale_by_lion(), **_SUBSPACE),
    "galore_adamw": _SUBSPACE,
    "galore_sgd": _SUBSPACE,
    "golore_adamw": _SUBSPACE,
    "golore_sgd": _SUBSPACE,
    "gasare": dict(base_optimizer=optax.scale_by_rms(), **_SPARSE),
    "gasare_adamw": _SPARSE,
    "gasare_sgd": _SPARSE,
    "gosare_adamw": _SPARSE,
    "gosare_sgd": _SPARSE,
    "osd": dict(base_optimizer=optax.scale_by_belief(), **_ONLINE),
    "osd_adamw": _ONLINE,
    "osd_sgd": _ONLINE,
}
LEARNING_RATE = 0.1
SHAPES = {"a": (6, 4), "b": (4,)}
STEPS = 3


def public_aliases() -> set[str]:
    """Public names of ``golore_jax`` called like an optax alias, ``name(learning_rate)``,
    whose transformation keeps a subspace state (``default_projector_optimizer`` is plain
    AdamW; ``paper_msgd_hyperparams`` returns numbers)."""
    states = (gl.ScaleBySubspaceState, gl.ScaleBySparseSubspaceState, gl.ScaleByOnlineSubspaceState)
    params = {"a": jax.ShapeDtypeStruct((300, 200), jnp.float32)}  # above the default rank
    found = set()
    for name in gl.__all__:
        obj = getattr(gl, name)
        if not inspect.isfunction(obj) or list(inspect.signature(obj).parameters)[:1] != [
            "learning_rate"
        ]:
            continue
        tx = obj(LEARNING_RATE) if name != "paper_msgd_hyperparams" else None
        if not isinstance(tx, optax.GradientTransformation):
            continue
        state = jax.eval_shape(tx.init, params)
        if any(
            isinstance(x, states)
            for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, states))
        ):
            found.add(name)
    return found


def _tree(seed: int, dtype=jnp.float32) -> dict:
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}


@functools.cache
def _make(name: str) -> optax.GradientTransformation:
    """One transform per alias for the whole module, so that its jitted update compiles once
    per input signature (compiling is most of this table's time)."""
    return getattr(gl, name)(LEARNING_RATE, **ALIASES[name])


@functools.cache
def _jitted(name: str):
    return jax.jit(_make(name).update)


def _run(tx, params, steps=STEPS, update=None):
    """Updates of ``steps`` steps on fixed gradients, and the final state."""
    update = update or tx.update
    state = tx.init(params)
    outs = []
    for t in range(steps):
        u, state = update(_tree(10 + t, jax.tree.leaves(params)[0].dtype), state, params)
        outs.append(u)
    return outs, state


def test_every_alias_is_in_the_table():
    """The table covers exactly the package's optimizers (13 today: three families, ten
    drop-ins; paper_msgd_hyperparams is a helper): none can be forgotten."""
    assert public_aliases() == set(ALIASES)


def _serialize(state):
    """Host copies of the leaves (typed PRNG keys as their key data) and the structure."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    out = []
    for x in leaves:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            out.append(("key", np.asarray(jax.random.key_data(x))))
        else:
            out.append(("array", np.asarray(x)))
    return out, treedef


def _deserialize(saved):
    leaves, treedef = saved
    restored = [
        jax.random.wrap_key_data(jnp.asarray(x)) if kind == "key" else jnp.asarray(x)
        for kind, x in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, restored)


class AliasContractTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*ALIASES)
    def test_updates_match_params_and_jit_equals_eager(self, name):
        """Every update has its param's shape and dtype, is finite and moves the params; the
        jitted and eager steps agree."""
        tx = _make(name)
        params = _tree(0)
        outs, _ = _run(tx, params, steps=2, update=self.variant(tx.update))
        for u in outs:
            chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
            chex.assert_tree_all_finite(u)
        assert float(jnp.abs(outs[-1]["a"]).max()) > 0
        reference, _ = _run(tx, params, steps=2, update=_jitted(name))
        chex.assert_trees_all_close(outs, reference, rtol=1e-5, atol=1e-6)

    @parameterized.parameters(*ALIASES)
    def test_bfloat16_params_get_bfloat16_updates(self, name):
        """With bfloat16 params the updates are bfloat16, finite, and the state's float
        leaves stay fp32 or bf16 (no float64, nothing lost to int)."""
        tx = _make(name)
        params = _tree(0, jnp.bfloat16)
        outs, state = _run(tx, params, update=_jitted(name))
        for u in outs:
            chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
            chex.assert_tree_all_finite(u)
        floats = [x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert set(floats) <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}, floats

    @parameterized.parameters(*ALIASES)
    def test_inside_optax_wrappers(self, name):
        """MultiSteps(2, chain(inactive clip, masked(inject_hyperparams(alias)))): the first
        mini-step applies nothing; the second applies the alias's step on the mean gradient to
        the selected leaf and passes the masked-out one through; doubling the injected learning
        rate doubles the step. (One program for the four wrappers: compiling is most of this
        table's time.)"""
        params, g1, g2 = _tree(0), _tree(1), _tree(2)
        alias = getattr(gl, name)
        static = [p for p in inspect.signature(alias).parameters if p != "learning_rate"]
        injected = optax.inject_hyperparams(alias, static_args=static)(
            learning_rate=LEARNING_RATE, **ALIASES[name]
        )
        masked = optax.masked(injected, {"a": True, "b": False})
        multi = optax.MultiSteps(
            optax.chain(optax.clip_by_global_norm(1e6), masked), every_k_schedule=2
        )
        update = jax.jit(multi.update)
        first, state = update(g1, multi.init(params), params)
        chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, first))
        second, _ = update(g2, state, params)

        tx = _make(name)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
        on_mean, _ = _jitted(name)(mean, tx.init(params), params)
        chex.assert_trees_all_close(second["a"], on_mean["a"], rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_close(second["b"], mean["b"], rtol=1e-6)
        assert float(jnp.abs(second["a"]).max()) > 0

        hyperparams = state.inner_opt_state[1].inner_state.hyperparams
        hyperparams["learning_rate"] = jnp.asarray(2 * LEARNING_RATE)
        doubled, _ = update(g2, state, params)
        chex.assert_trees_all_close(doubled["a"], 2 * second["a"], rtol=1e-5, atol=1e-7)

    @parameterized.parameters(*ALIASES)
    def test_resume_from_a_serialized_state(self, name):
        """A state saved after two steps and restored gives the same next update and state
        (the third step refreshes: random subspaces are drawn from the restored key)."""
        tx = _make(name)
        params = _tree(0)
        update = _jitted(name)
        _, state = _run(tx, params, steps=2, update=update)
        restored = _deserialize(_serialize(state))
        want = update(_tree(12), state, params)
        got = update(_tree(12), restored, params)
        chex.assert_trees_all_equal(jax.tree.map(_plain, got), jax.tree.map(_plain, want))


def _plain(x):
    """Key data for typed keys (which equality cannot compare), the array otherwise."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


@pytest.mark.parametrize("name", ["galore_adamw", "gasare_adamw", "osd_adamw"])
def test_alias_is_one_chain_of_core_and_tail(name):
    """An alias is its core transform, then decayed weights and the learning rate: its state
    is a chain state of three parts (weight decay on by default for the AdamW aliases)."""
    state = _make(name).init(_tree(0))
    assert isinstance(state, tuple) and len(state) == 3
    assert isinstance(state[1], optax.AddDecayedWeightsState)


# --- Explicit-axis meshes, shard_map and inject_hyperparams (issue 30) -----------------------


# tests/explicit_sharding_check.py's EXTRA rows: options with their own refresh paths.
EXPLICIT_EXTRA = ("galore_adamw_int4", "galore_adamw_lazy")
EXPLICIT_NAMES = (*sorted(ALIASES), *EXPLICIT_EXTRA)
# The check runs as two processes of about equal size (alternate rows), side by side: its time
# is compiling (one update per alias and mesh, single-threaded), so on CI's 2 cores two halves
# take half the wall time of one process.
EXPLICIT_PARTS = (EXPLICIT_NAMES[0::2], EXPLICIT_NAMES[1::2])


def _run_explicit_sharding_check(scratch) -> dict:
    """tests/explicit_sharding_check.py over every alias: both parts at once, each a process
    with 8 fake CPU devices (their output goes to files: a full pipe would stall a process)."""
    import json
    import subprocess
    import sys

    from tests.child_env import eight_devices_env
    from tests.conftest import ROOT

    procs = []
    for i, part in enumerate(EXPLICIT_PARTS):
        out, err = scratch / f"part{i}.out", scratch / f"part{i}.err"
        with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its copies
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.explicit_sharding_check", *part],
                env=eight_devices_env(),
                cwd=ROOT,
                stdout=stdout,
                stderr=stderr,
            )
        procs.append((proc, out, err))
    codes = [proc.wait() for proc, _, _ in procs]  # both finish, even when one fails
    result: dict = {}
    for code, (_, out, err) in zip(codes, procs, strict=True):
        if code:
            raise RuntimeError(f"explicit_sharding_check exited {code}:\n{err.read_text()[-4000:]}")
        part = json.loads(out.read_text().strip().splitlines()[-1])
        result["devices"] = part.pop("devices")
        result.update(part)
    return result


@pytest.fixture(scope="session")
def explicit_sharding_results(tmp_path_factory) -> dict:
    """The check's results, computed once per test session: under pytest-xdist the first worker
    to ask runs it (holding a file lock in the session's shared temporary directory) and the
    others read its JSON, instead of every worker running the whole check."""
    import fcntl
    import json
    import os

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "explicit_sharding.json"
    with open(shared / "explicit_sharding.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():  # a worker that failed to make it leaves none: the next retries
            scratch = shared / "explicit_sharding"
            scratch.mkdir(exist_ok=True)
            path.write_text(json.dumps(_run_explicit_sharding_check(scratch)))
        return json.loads(path.read_text())


# Error model of a sharded update against the one-device update: the same fp32 operations with
# the sums of the projections (P^T G, P N over d <= 6) and of the decomposition's inputs split
# across devices, so only their summation order changes: at most ~n u per sum (u = 2^-24, n <= 6)
# in each of the ~10 sums an update's entry passes through over three steps, amplified in the
# basis by ||G|| / (spectral gap) <= ~10 for these fixed Gaussian gradients, i.e. <= 1e-5 of the
# update's norm (Adam's m / sqrt(v) keeps relative errors: both carry the same rounding). GaSare
# gathers and scatters exact values, so its updates are bit-identical. Measured: <= 1.3e-7.
SHARDED_RTOL = 1e-5


@pytest.mark.parametrize("case", ["explicit_2x2", "explicit_2x2x2", "mixed", "shard_map"])
@pytest.mark.parametrize("name", EXPLICIT_NAMES)
def test_explicit_sharding_equals_one_device(explicit_sharding_results, name, case):
    """On Explicit-axis meshes (2x2; data x fsdp x tensor 2x2x2 with the trainer's fsdp x tensor
    layout), a mixed Explicit/Auto mesh and inside a shard_map over ``data``, ``jit(tx.init)``
    and three ``jit(tx.update)`` steps (two refreshes) give the single-device updates, and every
    state leaf has the sharding ``state_partition_specs`` derives from the params' specs. Also
    a lazy refresh and INT4-stored bases (codes sharded like the basis)."""
    result = explicit_sharding_results
    assert result["devices"] == 8
    got = result[name][case]
    assert "error" not in got, got
    assert got["relative"] <= SHARDED_RTOL, got
    assert got["init_specs"] == [] and got["update_specs"] == [], got


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_inject_hyperparams_as_optax_users_write_it(name):
    """``optax.inject_hyperparams(alias)(learning_rate=..., **row)`` without ``static_args``
    (structural options are not numbers or callables, so they stay static) gives the alias's
    updates; the injected learning rate is a hyperparameter that scales them.

    Error model: the same operations, but the numeric arguments (learning rate, b1, b2, eps,
    momentum, weight decay) arrive as fp32 arrays instead of Python floats. Python computes
    ``1 - b2`` in double; injected, ``b2 = 0.999`` is first rounded to fp32, so Adam's bias
    correction ``1 - b2^t`` carries a relative error up to ``u b2 / (1 - b2)`` = 6e-5
    (u = 2^-24), half of it through ``sqrt(v)``: <= 3e-5 of each update (measured 7.7e-6);
    ``1 - b1`` and the others add ~1e-6."""
    params = _tree(0)
    injected = optax.inject_hyperparams(getattr(gl, name))(
        learning_rate=LEARNING_RATE, **ALIASES[name]
    )
    update = jax.jit(injected.update)
    got, state = _run(injected, params, update=update)
    want, _ = _run(_make(name), params, update=_jitted(name))
    chex.assert_trees_all_close(got, want, rtol=3e-5, atol=1e-9)
    assert set(state.hyperparams) >= {"learning_rate"}
    for key, value in state.hyperparams.items():  # only numbers became hyperparameters
        assert jnp.ndim(value) == 0, key
    state.hyperparams["learning_rate"] = jnp.asarray(2 * LEARNING_RATE)
    doubled, _ = update(_tree(10 + STEPS), state, params)
    half, _ = update(
        _tree(10 + STEPS),
        state._replace(
            hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(LEARNING_RATE)}
        ),
        params,
    )
    chex.assert_trees_all_close(doubled, jax.tree.map(lambda x: 2 * x, half), rtol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        {"mu_dtype": jnp.bfloat16},
        {"weight_decay_mask": lambda p: jax.tree.map(lambda x: x.ndim > 1, p)},
    ],
    ids=["mu_dtype", "mask_function"],
)
def test_inject_hyperparams_names_the_static_args_it_needs(extra):
    """A dtype or a mask function is callable, so ``inject_hyperparams`` calls it as a
    schedule: the one-line error names the ``static_args`` that keep it as it is, and with
    them the step runs."""
    name = "galore_adamw"
    (key,) = extra
    params = _tree(0)
    injected = optax.inject_hyperparams(getattr(gl, name))(
        learning_rate=LEARNING_RATE, **extra, **ALIASES[name]
    )
    with pytest.raises(TypeError, match=rf"static_args=\('{key}',\)"):
        injected.init(params)
    fixed = optax.inject_hyperparams(getattr(gl, name), static_args=(key,))(
        learning_rate=LEARNING_RATE, **extra, **ALIASES[name]
    )
    _run(fixed, params, steps=1, update=jax.jit(fixed.update))
