"""golore-jax beside optax.contrib.galore: the side rules, step-for-step equality, state sizes."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import golore_jax as gl
from golore_jax import _layout as layout
from golore_jax._subspace import scale_by_subspace

# Tall, wide and square leaves (and a vector, which neither library projects).
SHAPES = {"tall": (12, 5), "wide": (5, 12), "square": (8, 8), "bias": (7,)}
RANK, GAP, STEPS = 3, 3, 8  # refreshes at steps 0, 3 and 6


def _grads(step: int) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(step), len(SHAPES))
    return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, SHAPES.items(), strict=True)}


@dataclasses.dataclass(frozen=True)
class StoredMatrixSVD:
    """The SVD optax takes: of the stored ``m x n`` matrix ``G``, never of ``G^T``.

    Singular vectors are defined up to sign, and moments are kept across refreshes, so a
    different sign changes the trajectory. optax decomposes ``G`` on both sides (``U`` on the
    left, ``Vh^T`` on the right); our ``svd()`` decomposes the projected rows (``G`` on the left,
    ``G^T`` on the right), whose LAPACK signs differ. With ``transposed`` (a right-side leaf:
    the rows handed over are ``G^T``) this takes ``Vh^T`` of ``G``: the same LAPACK call as
    optax, hence the same signs.
    """

    transposed: bool
    uses_gradient: bool = dataclasses.field(default=True, init=False)

    def __call__(self, key, g, previous, step):
        rank = previous.shape[-1]
        if self.transposed:
            _, _, vh = jnp.linalg.svd(g.T, full_matrices=False)
            return vh[:rank].T
        u, _, _ = jnp.linalg.svd(g, full_matrices=False)
        return u[:, :rank]


def _ours_with_optax_side() -> optax.GradientTransformation:
    """scale_by_subspace(scale_by_adam, side="state"): one transform per orientation so each
    leaf uses optax's SVD call (see StoredMatrixSVD); the side comes from the rule."""

    def only(names):  # multi_transform hands each part MaskedNodes for the other leaves
        return lambda params: {
            k: v if isinstance(v, optax.MaskedNode) else k in names for k, v in params.items()
        }

    def part(names, transposed):
        return scale_by_subspace(
            optax.scale_by_adam(),
            rank=RANK,
            update_every=GAP,
            projector=StoredMatrixSVD(transposed),
            mask=only(names),
            side="state",
        )

    return optax.multi_transform(
        {"left": part({"tall", "square"}, False), "right": part({"wide"}, True)},
        {"tall": "left", "square": "left", "bias": "left", "wide": "right"},
    )


def test_state_rule_is_optax_side_for_adam():
    """With Adam's 2 moments, "state" picks optax.contrib.galore's side: left iff m >= n."""
    for m, n in [(12, 5), (5, 12), (8, 8), (1, 2), (2, 1), (300, 299)]:
        assert layout.choose_side(m, n, "state", moments=2) == ("left" if m >= n else "right")
    assert gl.count_moments(optax.scale_by_adam(), {"w": jnp.zeros((3, 4))}) == 2
    assert gl.count_moments(optax.trace(0.9), {"w": jnp.zeros((3, 4))}) == 1
    assert gl.count_moments(optax.identity(), {"w": jnp.zeros((3, 4))}) == 0
    # and it is what scale_by_subspace builds (bases on the side optax keeps its projector)
    tx = scale_by_subspace(optax.scale_by_adam(), rank=RANK, update_every=GAP, side="state")
    ours = tx.init(_grads(0)).bases
    theirs = optax.contrib.scale_by_galore(RANK, GAP).init(_grads(0)).projector
    for k in ("tall", "wide", "square"):
        assert ours[k].shape == theirs[k].shape, k


def test_equals_optax_contrib_galore_step_for_step():
    """Our update equals optax.contrib.scale_by_galore's at every step, refreshes included.

    Tolerance: both run the same fp32 operations (same SVD call, same projection products,
    same Adam) in differently fused programs, so they may differ by fp32 reassociation: a few
    ulps of the update (measured on CPU: bitwise equal on the tall and square leaves, at most
    1.3e-7 of max|update| on the wide one). 1e-6 absolute and relative (Adam's updates are
    O(1)) bounds that; a wrong side, basis or singular-vector sign gives O(1) differences (with
    plain ``svd()`` instead of StoredMatrixSVD the wide leaf's sign flips at the step-3
    refresh and the update differs by 100% of its size on CPU).
    """
    ours = _ours_with_optax_side()
    theirs = optax.contrib.scale_by_galore(RANK, GAP, base_optimizer=optax.scale_by_adam())
    params = _grads(100)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    step_ours, step_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    for step in range(STEPS):
        g = _grads(step)
        u_ours, s_ours = step_ours(g, s_ours)
        u_theirs, s_theirs = step_theirs(g, s_theirs)
        for k in SHAPES:
            np.testing.assert_allclose(
                u_ours[k], u_theirs[k], rtol=1e-6, atol=1e-6, err_msg=f"{k} at step {step}"
            )
    bases = {
        **s_ours.inner_states["left"].inner_state.bases,
        **{"wide": s_ours.inner_states["right"].inner_state.bases["wide"]},
    }
    for k in ("tall", "wide", "square"):
        np.testing.assert_allclose(bases[k], s_theirs.projector[k], rtol=1e-6, atol=1e-6)


def test_default_side_differs_from_optax_on_tall_and_wide():
    """The default ("gradient") rule is GaLore's: on tall/wide leaves it is not optax's."""
    tx = scale_by_subspace(optax.scale_by_adam(), rank=RANK, update_every=GAP)
    lays = gl.subspace_layouts(_grads(0), rank=RANK)
    assert lays["['tall']"].side == "right" and lays["['wide']"].side == "left"
    assert lays["['square']"].side == "left"
    ours = tx.init(_grads(0)).bases
    theirs = optax.contrib.scale_by_galore(RANK, GAP).init(_grads(0)).projector
    assert ours["tall"].shape != theirs["tall"].shape
    assert ours["square"].shape == theirs["square"].shape


@pytest.mark.parametrize("side", layout.SIDE_RULES)
@pytest.mark.parametrize(
    ("inner", "moments"),
    [(optax.scale_by_adam(), 2), (optax.trace(0.9), 1), (optax.identity(), 0)],
)
def test_state_floats_closed_form_matches_the_state(side, inner, moments):
    """layout.state_floats / memory.subspace_state_floats equal the floats actually held."""
    params = _grads(0)
    state = scale_by_subspace(inner, rank=RANK, update_every=GAP, side=side).init(params)
    assert gl.optimizer_state_floats(state) == gl.subspace_state_floats(
        params, rank=RANK, moments=moments, side=side
    )
    lays = gl.subspace_layouts(params, rank=RANK, side=side, moments=moments)
    for k, (m, n) in (("tall", (12, 5)), ("wide", (5, 12)), ("square", (8, 8))):
        lay = lays[f"['{k}']"]
        held = math.prod(state.bases[k].shape) + moments * math.prod(lay.low_rank_shape)
        expected = (m if lay.side == "left" else n) * RANK + moments * RANK * (
            n if lay.side == "left" else m
        )
        assert layout.state_floats(m, n, RANK, lay.side, moments) == held == expected


def test_state_rule_minimises_the_floats():
    """ "state" holds no more floats than any other rule, on every leaf and inner optimizer."""
    for m, n in [(12, 5), (5, 12), (8, 8), (4096, 11008)]:
        for moments in (0, 1, 2, 3):
            best = layout.state_floats(m, n, 7, layout.choose_side(m, n, "state", moments), moments)
            assert best == min(layout.state_floats(m, n, 7, s, moments) for s in ("left", "right"))


def test_side_is_validated():
    with pytest.raises(ValueError, match=r"scale_by_subspace: side must be one of .* 'top'"):
        scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=2, side="top")
    with pytest.raises(ValueError, match=r"golore_jax\.Online: side must be one of"):
        gl.Online(rank=2, side="optax")
    with pytest.raises(ValueError, match=r"golore_jax\.Subspace: side must be one of"):
        gl.Subspace(side="smaller")


@pytest.mark.parametrize("side", ["left", "right"])
def test_forced_side_is_an_orthogonal_projection(side):
    """ "left"/"right" project that side of every leaf: the update of an identity inner at full
    rank on that side is the gradient itself; at lower rank it is P P^T G or G Q Q^T."""
    params = _grads(0)
    tx = scale_by_subspace(optax.identity(), rank=RANK, update_every=GAP, side=side)
    upd, state = tx.update(params, tx.init(params))
    for k in ("tall", "wide", "square"):
        b = state.bases[k]
        g = params[k]
        expected = b @ (b.T @ g) if side == "left" else (g @ b) @ b.T
        assert b.shape[0] == (g.shape[0] if side == "left" else g.shape[1])
        np.testing.assert_allclose(upd[k], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The trainer's optax_galore and side options, and the compile-time benchmark
# --------------------------------------------------------------------------------------------


def _tiny_config(overrides):
    """configs/llama_tiny.py with ``{"optimizer.subspace.rank": 3, ...}`` set."""
    from configs import llama_tiny

    config = llama_tiny.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def _kernels():
    rng = np.random.default_rng(0)
    return {
        "embed": {"embedding": jnp.asarray(rng.standard_normal((20, 8)), jnp.float32)},
        "mlp": {"kernel": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)},
        "norm": {"scale": jnp.ones((8,), jnp.float32)},
    }


def test_trainer_optax_galore_is_optax_contrib_galore_on_the_kernels():
    """name=optax_galore builds optax.contrib.galore projecting what golore_jax projects (the
    kernel, not the embedding), and its updates equal a hand-built optax.contrib.galore's."""
    from train import optimizer as optimizer_lib

    opt = _tiny_config(
        {
            "optimizer.name": "optax_galore",
            "optimizer.subspace.rank": 3,
            "optimizer.subspace.update_every": 2,
            "optimizer.grad_clip": 0.0,
        }
    ).optimizer
    tx = optimizer_lib.build_optimizer(opt, num_steps=10)
    params = _kernels()
    schedule = optimizer_lib.learning_rate_schedule(opt, 10)
    reference = optax.contrib.galore(
        schedule,
        rank=3,
        update_proj_gap=2,
        scale=opt.subspace.scale,
        base_optimizer=optax.scale_by_adam(opt.inner.b1, opt.inner.b2, opt.inner.eps),
        weight_decay=opt.weight_decay,
        weight_dimension_numbers={
            "embed": {"embedding": None},
            "mlp": {"kernel": optax.contrib.GaLoreDimensionNumbers()},
            "norm": {"scale": None},
        },
    )
    s, s_ref = tx.init(params), reference.init(params)
    for step in range(3):
        grads = jax.tree.map(lambda p, step=step: jnp.sin(p * (step + 1)), params)
        u, s = tx.update(grads, s, params)
        u_ref, s_ref = reference.update(grads, s_ref, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref), strict=True):
            np.testing.assert_array_equal(a, b)
    projectors = s[0].projector  # (8, 12) is wide: optax projects its right side, Q is 12 x 3
    assert projectors["embed"]["embedding"].size == 0
    assert projectors["mlp"]["kernel"].shape == (12, 3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer.subspace.side": "top"}, r"config.optimizer.subspace.side must be one of"),
        (
            {"optimizer.name": "optax_galore", "optimizer.inner.name": "adamw8bit"},
            r"optax_galore' has no inner",
        ),
        (
            {"optimizer.name": "optax_galore", "optimizer.subspace.momentum_projection": True},
            r"momentum_projection=False",
        ),
        (
            {"step.relora": True, "optimizer.subspace.side": "state", "optimizer.grad_clip": 0.0},
            r"relora=True needs config.optimizer.subspace.side",
        ),
    ],
)
def test_trainer_rejects_bad_side_and_optax_galore_settings(overrides, message):
    from train import optimizer as optimizer_lib

    config = _tiny_config(overrides)
    with pytest.raises(ValueError, match=message):
        optimizer_lib.validate(config.optimizer, step=config.step)


def test_trainer_side_reaches_the_transform():
    """config.optimizer.subspace.side=state gives optax's side (left on a tall kernel)."""
    from train import optimizer as optimizer_lib

    params = {"mlp": {"kernel": jnp.ones((12, 8), jnp.float32)}}
    for side, basis_rows in (("gradient", 8), ("state", 12), ("left", 12), ("right", 8)):
        opt = _tiny_config(
            {
                "optimizer.name": "galore",
                "optimizer.subspace.rank": 3,
                "optimizer.subspace.side": side,
                "optimizer.grad_clip": 0.0,
            }
        ).optimizer
        state = optimizer_lib.build_optimizer(opt, num_steps=10).init(params)
        bases = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, gl.ScaleBySubspaceState))
        (sub,) = [b for b in bases if isinstance(b, gl.ScaleBySubspaceState)]
        assert sub.bases["mlp"]["kernel"].shape == (basis_rows, 3), side


def test_compile_time_benchmark_rows(tmp_path):
    """benchmarks/compile_time.py (update mode) times each optimizer and writes its rows."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    out_json = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "benchmarks.compile_time", "--models", "llama_tiny"]
    cmd += ["--layers", "1", "--repeats", "1", "--optimizers", "optax_galore,galore_adamw"]
    out = subprocess.run(
        [*cmd, "--json", str(out_json)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out_json.read_text())
    assert [r["optimizer"] for r in rows] == ["optax_galore", "galore_adamw"]
    for r in rows:
        assert r["compile_s"] > 0 and r["lower_s"] > 0 and r["matrices"] == 7
        assert r["total_s"] == pytest.approx(r["lower_s"] + r["compile_s"])
    assert "| update | llama_tiny | galore_adamw |" in out.stdout


@pytest.mark.parametrize(
    "values",
    [
        [1.0, 0.0],
        [0.0, 0.0],
        [1.0, np.nan],
        [np.nan, 1.0],
        [np.inf, 1.0],
        [1.0, -np.inf],
        [np.nan, np.inf],
        [-3.0, 0.0],
    ],
)
def test_usable_gradient_is_finite_and_nonzero(values):
    """The one-reduction check (max |g|, cheaper to compile) says what all(isfinite(g)) &
    any(g != 0) says, eagerly, under jit and under vmap (the batched refresh)."""
    from golore_jax._refresh import usable_gradient as _usable_gradient

    g = jnp.asarray(values, jnp.float32).reshape(1, 2)
    expected = bool(np.all(np.isfinite(values)) and np.any(np.asarray(values) != 0))
    assert bool(_usable_gradient(g)) == expected
    assert bool(jax.jit(_usable_gradient)(g)) == expected
    assert bool(jax.vmap(_usable_gradient)(jnp.stack([g, jnp.ones_like(g)]))[0]) == expected


@pytest.mark.parametrize("side", ["left", "right"])
def test_relora_dense_reads_the_side_from_the_adapter(side):
    """A square kernel's adapter is W0 + P A (left) or W0 + A Q^T (right) as its layout says
    (train/relora.py hands the model the factors in multiplication order), so the model
    follows whichever side rule the optimizer used."""
    from jax.tree_util import DictKey

    from train import model as model_lib
    from train import relora as relora_lib

    rng = np.random.default_rng(0)
    x, w0 = rng.standard_normal((3, 6)), rng.standard_normal((6, 6))
    basis, coef = (
        rng.standard_normal((6, 2)),
        rng.standard_normal((2, 6) if side == "left" else (6, 2)),
    )
    merged = w0 + (basis @ coef if side == "left" else coef @ basis.T)
    layout = gl.make_layout((6, 6), 2, side=side)
    assert layout.side == side
    dense = model_lib.Dense(6, use_bias=False, dtype=jnp.float32)
    adapter = relora_lib.adapter_variables(
        [(DictKey("kernel"),)],
        [layout],
        [jnp.asarray(basis, jnp.float32)],
        [jnp.asarray(coef, jnp.float32)],
    )
    variables = {"params": {"kernel": jnp.asarray(w0, jnp.float32)}, model_lib.ADAPTER: adapter}
    y = dense.apply(variables, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(y, x @ merged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("side", "basis_spec", "moment_spec"),
    [("left", ("rows", None), (None, "cols")), ("right", ("cols", None), ("rows", None))],
)
def test_partition_specs_follow_the_side_of_a_square_leaf(side, basis_spec, moment_spec):
    """A square leaf's basis is (m, r) on both sides: the moments' shape tells the side."""
    from jax.sharding import PartitionSpec

    from golore_jax import partitioning

    params = {"sq": jnp.zeros((8, 8), jnp.float32)}
    tx = scale_by_subspace(optax.scale_by_adam(), rank=2, update_every=2, side=side)
    state = jax.eval_shape(tx.init, params)
    specs = partitioning.state_partition_specs(state, params, {"sq": PartitionSpec("rows", "cols")})
    assert specs.bases["sq"] == PartitionSpec(*basis_spec)
    assert specs.inner_state.mu["sq"] == PartitionSpec(*moment_spec)
    assert specs.inner_state.nu["sq"] == PartitionSpec(*moment_spec)
