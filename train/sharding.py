"""Device mesh, logical-axis rules, and the shardings of params, optimizer state and batches.

The mesh has three named axes:

* ``data``: pure data parallelism (params replicated),
* ``fsdp``: data parallelism with params and optimizer state sharded (ZeRO-3 style),
* ``tensor``: tensor parallelism over heads / MLP hidden / vocab.

The batch is split over ``data`` x ``fsdp``. Model code names logical axes only; the rules
below map them to mesh axes, so the same model runs on 1 device, N GPUs or a TPU pod.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import golore_jax as gl
from train.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Weights shard their 'embed' dim over fsdp and their heads / mlp /
# vocab dim over tensor; activations shard the batch over data x fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolves ``config.mesh`` (one entry may be -1) to sizes whose product is num_devices."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(
            f"config.mesh {dict(zip(MESH_AXES, sizes, strict=True))}: each axis must be a positive "
            "size, with at most one -1 (meaning: all remaining devices)"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh {dict(zip(MESH_AXES, sizes, strict=True))} does not divide the "
                f"{num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"config.mesh {dict(zip(MESH_AXES, sizes, strict=True))} has {math.prod(sizes)} "
            f"devices but {num_devices} are available"
        )
    return tuple(sizes)


AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def axis_type(mesh_config: Any) -> AxisType:
    """``config.mesh.axis_types`` (``auto`` when absent) as a ``jax.sharding.AxisType``."""
    name = mesh_config.get("axis_types", "auto") if hasattr(mesh_config, "get") else "auto"
    if name not in AXIS_TYPES:
        raise ConfigError(
            f"config.mesh.axis_types must be one of {sorted(AXIS_TYPES)}, got {name!r}"
        )
    return AXIS_TYPES[name]


def typed_update(mesh_config: Any) -> bool:
    """``config.mesh.typed_update`` (False when absent), checked: a bool, True only with
    ``axis_types='explicit'``."""
    value = mesh_config.get("typed_update", False) if hasattr(mesh_config, "get") else False
    if not isinstance(value, bool):
        raise ConfigError(f"config.mesh.typed_update must be True or False, got {value!r}")
    if value and axis_type(mesh_config) != AxisType.Explicit:
        raise ConfigError(
            "config.mesh.typed_update=True needs config.mesh.axis_types='explicit' (on Auto "
            "axes nothing is typed)"
        )
    return value


def is_explicit(mesh: Mesh) -> bool:
    """Whether the mesh's axes are Explicit (shardings in the arrays' types)."""
    return AxisType.Explicit in tuple(mesh.axis_types)


def make_mesh(mesh_config: Any, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    kind = axis_type(mesh_config)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(kind,) * len(MESH_AXES))


def _mesh_axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def check_divisible(shapes: Any, specs: Any, mesh: Mesh, what: str) -> None:
    """Raises if a sharded dim is not divisible by its mesh axes, naming the leaf and dim."""
    flat_specs = jax.tree_util.tree_structure(shapes).flatten_up_to(specs)
    for (path, leaf), spec in zip(
        jax.tree_util.tree_leaves_with_path(shapes), flat_specs, strict=True
    ):
        for dim, axes in enumerate(spec):
            size = _mesh_axis_size(mesh, axes)
            if leaf.shape[dim] % size:
                raise ConfigError(
                    f"{what} {jax.tree_util.keystr(path)} of shape {leaf.shape}: dim {dim} "
                    f"({leaf.shape[dim]}) is not divisible by mesh axes {axes} of size {size}; "
                    f"change config.mesh {dict(mesh.shape)} or the model dims"
                )


def logical_to_mesh(specs: Any) -> Any:
    """Logical PartitionSpecs -> mesh PartitionSpecs under :data:`LOGICAL_RULES`."""
    return nn.logical_to_mesh(specs, LOGICAL_RULES)


def named(mesh: Mesh, mesh_specs: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s),
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def param_and_state_shardings(
    mesh: Mesh, boxed_params: Any, opt_state_shapes: Any, stack_path: Any = None
) -> tuple[Any, Any]:
    """NamedShardings for params (from their logical names) and for the optimizer state.

    The optimizer state's specs come from golore_jax: projectors take the sharding of the
    param dim they span and low-rank moments that of the dim they keep.
    """
    logical = nn.get_partition_spec(boxed_params)
    params_shapes = nn.unbox(boxed_params)
    param_specs = logical_to_mesh(logical)
    check_divisible(params_shapes, param_specs, mesh, "param")
    state_specs = gl.state_partition_specs(
        opt_state_shapes, params_shapes, param_specs, dict(mesh.shape), stack_path=stack_path
    )
    return named(mesh, param_specs), named(mesh, state_specs)


class ModelShardings(NamedTuple):
    """Shapes and NamedShardings of a model's params and of its optimizer state."""

    param_shapes: Any
    opt_shapes: Any
    params: Any
    opt_state: Any


def model_shardings(
    mesh: Mesh, model: nn.Module, tx: Any, tokens: jax.Array, stack_path: Any = None
) -> ModelShardings:
    """Shapes and shardings of ``model.init(key, tokens)['params']`` and ``tx.init`` of them,
    found without allocating anything (``jax.eval_shape``). ``stack_path``: where the stacked
    layers are, for a ``golore_jax.layerwise`` optimizer state."""
    with nn.logical_axis_rules(LOGICAL_RULES):
        boxed = jax.eval_shape(lambda k: model.init(k, tokens)["params"], jax.random.key(0))
        param_shapes = nn.unbox(boxed)
        opt_shapes = jax.eval_shape(tx.init, param_shapes)
        params, opt_state = param_and_state_shardings(mesh, boxed, opt_shapes, stack_path)
    return ModelShardings(param_shapes, opt_shapes, params, opt_state)


@contextlib.contextmanager
def trace_context(mesh: Mesh) -> Iterator[None]:
    """The mesh and logical-axis rules the model's sharding constraints resolve against, with
    Python's cyclic garbage collector paused: tracing a model allocates millions of objects and
    the full collections they trigger were a fifth of LLaMA-1B's lowering on CPU (2.59 s ->
    2.12 s; explicit axes allocate more: BENCHMARKS section 11)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            yield
    finally:
        if was_enabled:  # nested: the outer context enables it
            gc.enable()


def in_trace_context(mesh: Mesh, fn: Callable) -> Callable:
    """``fn`` (a jitted function) called, and lowered (``.lower``, ahead of time), inside
    :func:`trace_context`: it traces on its first call."""

    def wrapped(*args):
        with trace_context(mesh):
            return fn(*args)

    def lower(*args):
        with trace_context(mesh):
            return fn.lower(*args)

    wrapped.lower = lower
    return wrapped


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def auto_axes_loss(loss_fn: Any) -> Any:
    """``loss_fn(params, batch) -> scalar`` run with the mesh's Explicit axes as Auto ones
    (``jax.sharding.auto_axes``): model code written for Auto meshes (logical sharding
    constraints) runs unchanged; its scalar loss comes back replicated, and its gradient in
    the params' explicit types."""
    return jax.sharding.auto_axes(loss_fn, out_sharding=PartitionSpec())
