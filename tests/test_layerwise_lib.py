"""golore_jax.layerwise on small trees: per-layer states and keys, per-group clipping, specs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import golore_jax as gl
from golore_jax.partitioning import state_partition_specs
from tests.jaxpr_walk import iter_equations

PATH = ("body", "layers")


def _params(num_layers=3):
    keys = jax.random.split(jax.random.key(1), 3)
    return {
        "body": {
            "layers": {
                "w": jax.random.normal(keys[0], (num_layers, 12, 20)),
                "scale": jnp.ones((num_layers, 12)),
            },
            "norm": jnp.ones((12,)),
        },
        "head": jax.random.normal(keys[1], (12, 7)),
    }


def test_split_and_merge_round_trip_and_name_a_missing_path():
    params = _params()
    stack, rest = gl.layerwise.split_stack(params, PATH)
    assert set(stack) == {"w", "scale"} and set(rest["body"]) == {"norm"}
    merged = gl.layerwise.merge_stack(stack, rest, PATH)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match=r"no subtree 'layer' at \['body'\]"):
        gl.layerwise.split_stack(params, ("body", "layer"))
    bad = dict(stack, scale=jnp.ones((2, 12)))
    with pytest.raises(ValueError, match="same leading"):
        gl.layerwise.num_layers(bad)


def test_each_layer_runs_its_own_golore_with_its_own_key():
    """Layer i's state and update equal a GoLore run alone on layer i's slice with the key
    ``fold_in(key(seed), i)``: per-layer bases from per-layer streams (distinct layers get
    distinct random subspaces); the other params run their own copy with the seed's key."""
    tx = gl.golore_adamw(0.1, subspace=gl.Subspace(rank=3, update_every=2, seed=7))
    params = _params()
    grads = jax.tree_util.tree_map(lambda p: jnp.cos(3.0 * p + 1.0), params)
    layerwise = gl.layerwise.layerwise(tx, PATH)
    state = layerwise.init(params)
    for _ in range(3):  # refreshes at steps 0 and 2
        updates, state = jax.jit(layerwise.update)(grads, state, params)
    stack, rest = gl.layerwise.split_stack(params, PATH)
    stack_grads, rest_grads = gl.layerwise.split_stack(grads, PATH)
    stack_updates, rest_updates = gl.layerwise.split_stack(updates, PATH)

    @jax.jit
    def alone(key, layer, layer_grads):  # one GoLore on one layer, seeded with key
        tx = gl.golore_adamw(0.1, subspace=gl.Subspace(rank=3, update_every=2, seed=key))
        alone_state = tx.init(layer)
        for _ in range(3):
            want, alone_state = tx.update(layer_grads, alone_state, layer)
        return want, alone_state[0].bases

    bases = []
    for i in range(3):
        take = lambda a, i=i: a[i]  # noqa: E731
        want, want_bases = alone(
            jax.random.fold_in(jax.random.key(7), i),
            jax.tree_util.tree_map(take, stack),
            jax.tree_util.tree_map(take, stack_grads),
        )
        np.testing.assert_allclose(stack_updates["w"][i], want["w"], rtol=1e-5, atol=1e-7)
        basis = state.layers[0].bases["w"][i]
        np.testing.assert_allclose(basis, want_bases["w"], atol=1e-6)
        bases.append(basis)
    overlap = np.linalg.svd(np.asarray(bases[0]).T @ np.asarray(bases[1]), compute_uv=False)
    assert overlap.max() < 0.99  # two random 3-dim subspaces of R^12 are not the same
    tx = gl.golore_adamw(0.1, subspace=gl.Subspace(rank=3, update_every=2, seed=7))
    rest_state = tx.init(rest)
    for _ in range(3):
        want, rest_state = jax.jit(tx.update)(rest_grads, rest_state, rest)
    np.testing.assert_allclose(rest_updates["head"], want["head"], rtol=1e-6)


def test_clip_norm_clips_each_layer_and_the_rest_by_its_own_norm():
    """SGD(lr 1) behind clip_norm=1: a layer whose gradient norm is below 1 is not scaled, one
    above is scaled to norm 1, and the other params are clipped as one group."""
    params = _params(num_layers=2)
    stack_grads = {
        "w": jnp.stack([jnp.full((12, 20), 0.01), jnp.full((12, 20), 1.0)]),
        "scale": jnp.zeros((2, 12)),
    }
    rest_grads = {"body": {"norm": jnp.full((12,), 2.0)}, "head": jnp.zeros((12, 7))}
    grads = gl.layerwise.merge_stack(stack_grads, rest_grads, PATH)
    tx = gl.layerwise.layerwise(optax.sgd(1.0), PATH, clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    w = updates["body"]["layers"]["w"]
    np.testing.assert_allclose(w[0], -0.01, rtol=1e-6)  # norm 0.01 * sqrt(240) < 1: as is
    np.testing.assert_allclose(w[1], -1.0 / np.sqrt(240.0), rtol=1e-5)  # norm sqrt(240) -> 1
    np.testing.assert_allclose(updates["body"]["norm"], -1.0 / np.sqrt(12.0), rtol=1e-5)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        gl.layerwise.layerwise(optax.sgd(1.0), PATH, clip_norm=0.0)


def test_state_specs_put_the_layer_axis_before_the_layer_slice_specs():
    tx = gl.galore_adamw(0.1, subspace=gl.Subspace(rank=3, update_every=2))
    params = _params()
    param_specs = {
        "body": {"layers": {"w": P(None, "fsdp", "tensor"), "scale": P()}, "norm": P()},
        "head": P("fsdp", None),
    }
    state = jax.eval_shape(gl.layerwise.layerwise(tx, PATH).init, params)
    specs = state_partition_specs(state, params, param_specs, stack_path=PATH)
    layer = specs.layers[0]
    # w is 12 x 20 per layer: left side, P (12 x r) spans rows, the r x 20 moment keeps cols.
    assert layer.bases["w"] == P(None, "fsdp", None)
    assert layer.inner_state.mu["w"] == P(None, None, "tensor")
    assert layer.count == P(None)
    assert specs.rest[0].inner_state.mu["head"] == P("fsdp", None)
    with pytest.raises(ValueError, match="needs stack_path"):
        state_partition_specs(state, params, param_specs)


def _hybrid(**subspace):  # GaLore (gram eigh) until step 2, GoLore after
    projector = gl.projectors.hybrid(switch_step=2, before=gl.projectors.gram_eigh())
    return gl.galore_adamw(0.1, subspace=gl.Subspace(projector=projector, **subspace))


LAYERS_PER_CALL_TXS = {
    "galore_gram": lambda: gl.galore_adamw(
        0.1, subspace=gl.Subspace(rank=3, update_every=2, projector=gl.projectors.gram_eigh())
    ),
    "golore": lambda: gl.golore_adamw(0.1, subspace=gl.Subspace(rank=3, update_every=2, seed=5)),
    "hybrid": lambda: _hybrid(rank=3, update_every=2, seed=5),
    "galore_msgd": lambda: gl.galore_sgd(
        0.1, subspace=gl.Subspace(rank=3, update_every=2), momentum=0.9
    ),
}


def _comparable(state):  # typed PRNG keys as their raw data, for chex's comparisons
    def raw(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key_data(x)
        return x

    return jax.tree_util.tree_map(raw, state)


@pytest.mark.parametrize("name", sorted(LAYERS_PER_CALL_TXS))
@pytest.mark.parametrize("layers_per_call", [2, 3])
def test_layers_per_call_equals_one_layer_at_a_time(name, layers_per_call):
    """Updates and states over 5 steps (refreshes at 0, 2, 4; the hybrid switches at 2) equal
    the one-layer-at-a-time update, 3 layers in calls of 2 (+ the remainder) or 3."""
    params = _params()
    one = gl.layerwise.layerwise(LAYERS_PER_CALL_TXS[name](), PATH)
    many = gl.layerwise.layerwise(
        LAYERS_PER_CALL_TXS[name](), PATH, layers_per_call=layers_per_call
    )
    state_one, state_many = one.init(params), many.init(params)
    for step in range(5):
        grads = jax.tree_util.tree_map(lambda p, s=step: jnp.cos((3.0 + s) * p + s), params)
        want, state_one = jax.jit(one.update)(grads, state_one, params)
        got, state_many = jax.jit(many.update)(grads, state_many, params)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        _comparable(state_many), _comparable(state_one), rtol=1e-5, atol=1e-6
    )


def _eigh_outside_cond(jaxpr) -> int:
    """eigh equations of ``jaxpr`` that run whichever cond branch is taken."""
    eqns = iter_equations(jaxpr, not_inside=("cond",))
    return sum(e.primitive.name == "eigh" for e in eqns)


def test_layers_per_call_keeps_the_refresh_a_branch():
    """The decomposition (eigh of the Gram matrix) runs only inside a cond branch, i.e. only
    on refresh steps. A plain vmap over the layers' states turns that cond into a select that
    decomposes at every step: the same check finds eigh outside any cond there (and inside
    the vmapped branch when its step counts are not shared)."""
    # No matrix outside the stack, so no refresh cond of the other params' optimizer: every
    # cond at the top is the one choosing how the layers are updated.
    params = {"body": _params()["body"]}
    grads = jax.tree_util.tree_map(jnp.cos, params)
    tx = gl.layerwise.layerwise(LAYERS_PER_CALL_TXS["galore_gram"](), PATH, layers_per_call=3)
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(grads, state, params).jaxpr
    assert any(e.primitive.name == "eigh" for e in iter_equations(jaxpr))
    assert _eigh_outside_cond(jaxpr) == 0
    # Inside the cond that picks vmapped or one-at-a-time layers, each branch still decomposes
    # only inside a further (the refresh) cond.
    picks = [e for e in iter_equations(jaxpr, not_inside=("cond",)) if e.primitive.name == "cond"]
    assert picks
    for pick in picks:
        assert all(_eigh_outside_cond(branch.jaxpr) == 0 for branch in pick.params["branches"])
    inner = LAYERS_PER_CALL_TXS["galore_gram"]()
    stack, _ = gl.layerwise.split_stack(params, PATH)
    naive = jax.make_jaxpr(jax.vmap(inner.update))(stack, state.layers, stack)
    assert _eigh_outside_cond(naive.jaxpr) > 0


def test_layers_per_call_falls_back_when_the_layers_counts_differ():
    """An inner apply_if_finite skips layer 1's non-finite gradient at step 0, so its counts
    lag the other layers'; calls of 3 layers then run one layer at a time and still equal the
    one-layer update at every later step."""
    params = _params()

    def make(k):
        tx = optax.apply_if_finite(LAYERS_PER_CALL_TXS["galore_gram"](), max_consecutive_errors=3)
        return gl.layerwise.layerwise(tx, PATH, layers_per_call=k)

    one, many = make(1), make(3)
    state_one, state_many = one.init(params), many.init(params)
    for step in range(4):
        grads = jax.tree_util.tree_map(lambda p, s=step: jnp.sin((2.0 + s) * p), params)
        if step == 0:
            w = grads["body"]["layers"]["w"]
            grads["body"]["layers"]["w"] = w.at[1, 0, 0].set(jnp.nan)
        want, state_one = jax.jit(one.update)(grads, state_one, params)
        got, state_many = jax.jit(many.update)(grads, state_many, params)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    counts = state_many.layers.inner_state[0].count
    np.testing.assert_array_equal(counts, [4, 3, 4])  # layer 1 skipped one update
    chex.assert_trees_all_close(
        _comparable(state_many), _comparable(state_one), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="layers_per_call must be an int >= 1, got 0"):
        gl.layerwise.layerwise(optax.sgd(1.0), PATH, layers_per_call=0)
