"""Tests for golore_jax/partitioning.py: PartitionSpecs of an optimizer state from param specs."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import golore_jax as gl
from golore_jax import partitioning
from golore_jax._subspace import scale_by_subspace
from golore_jax.partitioning import state_partition_specs

RANK = 2
PARAMS = {
    "wide": jax.ShapeDtypeStruct((4, 8), jnp.float32),  # left: P (4, r), R (r, 8)
    "tall": jax.ShapeDtypeStruct((8, 4), jnp.float32),  # right: Q (4, r), R (8, r)
    "qkernel": jax.ShapeDtypeStruct((8, 2, 3), jnp.float32),  # 8 x 6: right
    "okernel": jax.ShapeDtypeStruct((2, 3, 8), jnp.float32),  # 6 x 8: left
    "norm": jax.ShapeDtypeStruct((4,), jnp.float32),  # not projected
}
SPECS = {
    "wide": P("x", "y"),
    "tall": P("x", "y"),
    "qkernel": P("x", "y", None),
    "okernel": P(None, "y", "x"),
    "norm": P("x"),
}
# (basis spec, low-rank moment spec) per projected leaf.
EXPECTED = {
    "wide": (P("x", None), P(None, "y")),  # basis: row spec; moments: (None, col)
    "tall": (P("y", None), P("x", None)),  # basis: col spec; moments: (row, None)
    "qkernel": (P("y", None), P("x", None)),  # merged cols (heads, head_dim) -> "y"
    "okernel": (P("y", None), P(None, "x")),  # merged rows (heads, head_dim) -> "y"
}


def _is_spec(x):
    return isinstance(x, P)


def _check_same_structure(specs, state):
    assert jax.tree.structure(specs, is_leaf=_is_spec) == jax.tree.structure(state)
    for spec, leaf in zip(
        jax.tree.leaves(specs, is_leaf=_is_spec), jax.tree.leaves(state), strict=True
    ):
        assert len(spec) <= len(leaf.shape), (spec, leaf.shape)


def test_galore_adamw_state_specs():
    """Bases (row|col, None), low-rank moments (None, col)|(row, None), others param/replicated."""
    opt = gl.galore_adamw(1e-3, subspace=gl.Subspace(rank=RANK, update_every=5), weight_decay=0.1)
    state = jax.eval_shape(opt.init, PARAMS)
    specs = state_partition_specs(state, PARAMS, SPECS)
    _check_same_structure(specs, state)
    sub = specs[0]
    assert sub.count == P() and sub.key == P()
    adam = sub.inner_state
    assert adam.count == P()
    for name, (basis, low) in EXPECTED.items():
        assert state[0].bases[name].shape[1] == RANK
        assert sub.bases[name] == basis, name
        assert adam.mu[name] == low and adam.nu[name] == low, name
    assert isinstance(sub.bases["norm"], optax.MaskedNode)
    assert adam.mu["norm"] == P("x") and adam.nu["norm"] == P("x")


def test_plain_optax_state_specs_follow_params():
    """A plain optax.adamw state: moments take the param specs, counts are replicated."""
    state = jax.eval_shape(optax.adamw(1e-3).init, PARAMS)
    specs = state_partition_specs(state, PARAMS, SPECS)
    _check_same_structure(specs, state)
    assert specs[0].mu == SPECS and specs[0].nu == SPECS
    assert specs[0].count == P()


def test_specs_for_a_custom_split_and_nested_wrappers():
    """Specs follow a non-default matrix_split and survive MultiSteps / inject_hyperparams."""
    sub = scale_by_subspace(
        optax.trace(0.9),
        rank=RANK,
        update_every=3,
        mask={k: k == "qkernel" for k in PARAMS},
        matrix_split=lambda path, shape: 2,  # (8*2, 3): right, Q (3, r)
    )
    factory = optax.inject_hyperparams(lambda lr: optax.chain(sub, optax.scale(-lr)))
    opt = optax.MultiSteps(factory(lr=0.1), every_k_schedule=2)
    state = jax.eval_shape(opt.init, PARAMS)
    specs = state_partition_specs(state, PARAMS, SPECS)
    _check_same_structure(specs, state)
    inner = specs.inner_opt_state.inner_state[0]
    assert inner.bases["qkernel"] == P(None, None)  # cols = head_dim, unsharded
    assert inner.inner_state.trace["qkernel"] == P("x", None)  # rows (8, 2) -> "x"
    assert inner.inner_state.trace["wide"] == SPECS["wide"]
    assert specs.acc_grads == SPECS
    assert specs.inner_opt_state.hyperparams["lr"] == P()


def test_low_rank_moments_shard_their_rank_dim_given_the_mesh():
    """Given the mesh axis sizes, a low-rank moment's rank dim takes the spec of the param dim
    it replaces (so FSDP shards the moments), where those axes divide the rank."""
    sub = gl.Subspace(rank=RANK, update_every=5)
    state = jax.eval_shape(gl.galore_adamw(1e-3, subspace=sub).init, PARAMS)
    mu = state_partition_specs(state, PARAMS, SPECS, {"x": 2, "y": 2})[0].inner_state.mu
    assert mu["wide"] == P("x", "y")  # left (r, n): r takes the rows' "x"
    assert mu["tall"] == P("x", "y")  # right (m, r): r takes the cols' "y"
    assert mu["qkernel"] == P("x", "y")  # right, merged cols (heads, head_dim) -> "y"
    assert mu["okernel"] == P("y", "x")  # left, merged rows (heads, head_dim) -> "y"
    uneven = state_partition_specs(state, PARAMS, SPECS, {"x": 4, "y": 2})[0].inner_state.mu
    assert uneven["wide"] == P(None, "y")  # 4 devices cannot split rank 2: as without sizes
    assert uneven["tall"] == P("x", "y")
    bases = state_partition_specs(state, PARAMS, SPECS, {"x": 2, "y": 2})[0].bases
    assert {k: bases[k] for k in EXPECTED} == {k: v[0] for k, v in EXPECTED.items()}


class _ToyState(NamedTuple):
    """A new transform's state: a params-shaped table its own rule keeps replicated."""

    count: jax.Array
    table: Any


def test_a_registered_rule_gives_the_specs_of_its_state_type():
    """Without a rule a params-shaped field takes the params' specs; a rule registered for the
    state type (as a new transform's module does) decides instead, also inside a chain."""
    params = {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)}
    specs = {"w": P("x", "y")}
    state = (optax.EmptyState(), _ToyState(jnp.zeros([], jnp.int32), params))
    assert state_partition_specs(state, params, specs)[1].table == specs

    def rule(toy, context):
        assert context.params is params and context.param_specs is specs
        return _ToyState(count=P(), table=jax.tree.map(lambda _: P(), toy.table))

    partitioning.register_partition_rule(_ToyState, rule)
    got = state_partition_specs(state, params, specs)
    assert got[1] == _ToyState(count=P(), table={"w": P()})
    assert got[0] == optax.EmptyState()
