"""Moments are declared per state type (golore_jax/_rotation.py), not guessed from field names."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import golore_jax as gl
from golore_jax import _rotation as rotation
from golore_jax import projectors
from golore_jax._subspace import scale_by_subspace


class DeclaredState(NamedTuple):
    m: Any  # not a name the old field-name rule knew; declared a first moment below


class UndeclaredState(NamedTuple):
    mu: Any  # a moment-like name, but this type declares nothing


rotation.register_moments(DeclaredState, {"m": rotation.FIRST})


def _trace(decay: float, state_type: type) -> optax.GradientTransformation:
    """optax.trace (``m <- decay m + g``, update ``m``) with its moment in ``state_type``."""

    def init(params):
        return state_type(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        m = jax.tree.map(lambda a, g: decay * a + g, state[0], updates)
        return m, state_type(m)

    return optax.GradientTransformation(init, update)


def _updates(inner, momentum_projection, steps=5):
    tx = scale_by_subspace(
        inner,
        rank=2,
        update_every=2,
        projector=projectors.random(),
        momentum_projection=momentum_projection,
        seed=3,
    )
    rng = np.random.default_rng(0)
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    outs = []
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        u, state = update(grads, state, params)
        outs.append(u)
    return outs


def test_a_declared_moment_is_rotated_and_an_undeclared_one_is_not():
    """A state type declaring ``m`` a first moment is rotated like optax.trace's ``trace``;
    one whose field is named ``mu`` but declares nothing is kept, as with no projection."""
    projected = _updates(optax.trace(0.9), momentum_projection=True)
    kept = _updates(optax.trace(0.9), momentum_projection=False)
    # The two references differ after the second refresh (step 2), so the checks can fail.
    assert not np.allclose(projected[3]["w"], kept[3]["w"], atol=1e-4)
    chex.assert_trees_all_close(
        _updates(_trace(0.9, DeclaredState), momentum_projection=True),
        projected,
        rtol=1e-5,
        atol=1e-6,
    )
    chex.assert_trees_all_close(
        _updates(_trace(0.9, UndeclaredState), momentum_projection=True),
        kept,
        rtol=1e-5,
        atol=1e-6,
    )


def test_declarations_of_optax_and_quantized_states():
    """optax's Adam declares mu/nu, trace its trace; the 8-bit state declares nothing."""
    assert rotation.declared_moments(optax.ScaleByAdamState(0, {}, {})) == {
        "mu": rotation.FIRST,
        "nu": rotation.SECOND,
    }
    assert rotation.declared_moments(optax.TraceState({})) == {"trace": rotation.FIRST}
    state = gl.scale_by_adam_8bit().init({"w": jnp.zeros(4)})
    assert rotation.declared_moments(state) == {}


def test_register_moments_errors_name_the_field_and_kind():
    with pytest.raises(ValueError, match=r"DeclaredState has no fields \['x'\]"):
        rotation.register_moments(DeclaredState, {"x": rotation.FIRST})
    with pytest.raises(ValueError, match="kinds must be one of"):
        rotation.register_moments(DeclaredState, {"m": "third"})


def test_every_optax_state_with_moment_fields_is_declared():
    """Every optax state the former field-name rule rotated (``mu``/``trace``/``ema`` first,
    ``nu`` second) declares exactly those fields, so optax inner optimizers rotate as before."""
    first, second = {"mu", "trace", "ema", "momentum"}, {"nu"}
    types = {
        obj
        for module in (optax, optax.contrib)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
    }
    types |= {
        type(optax.scale_by_rms(bias_correction=True).init({})),
        type(optax.scale_by_stddev(bias_correction=True).init({})),
    }
    checked = 0
    for state_type in types:
        by_name = {f: rotation.FIRST for f in state_type._fields if f in first}
        by_name |= {f: rotation.SECOND for f in state_type._fields if f in second}
        if not by_name:
            continue
        state = state_type(*[None] * len(state_type._fields))
        assert rotation.declared_moments(state) == by_name, state_type.__name__
        checked += 1
    assert checked >= 15
