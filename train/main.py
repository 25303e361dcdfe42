"""Pre-train a LLaMA with GaLore / GoLore (or AdamW): the jitted sharded step and the loop.

``python -m train --config configs/llama_tiny.py --workdir runs/tiny`` trains, evaluates
held-out perplexity every ``eval_every`` steps, writes ``metrics.jsonl``, TensorBoard events,
``loss.png`` and orbax checkpoints to the workdir, and resumes from the latest checkpoint when
the workdir already holds one. SIGTERM / SIGINT finish the current step, save and exit.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import golore_jax as gl
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import interrupts
from train import layerwise as layerwise_lib
from train import loop as loop_lib
from train import mechanism as mechanism_lib
from train import model as model_lib
from train import optimizer as optimizer_lib
from train import relora as relora_lib
from train import sharding as sharding_lib
from train import step as step_lib
from train import weight_storage as weight_storage_lib
from train.errors import ConfigError, DataError

NONFINITE_POLICIES = ("skip", "stop")


TrainState = step_lib.TrainState
# Pre-training's loss (looked up at build time: tests swap it for a poisoned one).
cross_entropy = step_lib.cross_entropy


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one run: model, optimizer, mesh, shardings and step functions."""

    model: model_lib.LlamaForCausalLM
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    state_sharding: Any
    batch_sharding: Any
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]
    param_paths: list[str]
    abstract_state: TrainState  # ShapeDtypeStructs with shardings: the restore target
    # The model's weights of a state: its params, or W0 + P A in a ReLoRA-like run.
    weights: Callable[[TrainState], Any]
    # (halves, overlap) -> the jitted measuring step (train/mechanism.py); None for the
    # layer-wise and ReLoRA-like steps.
    measure: Callable[[bool, bool], Callable] | None = None


def validate_config(config: Any) -> None:
    """Checks the config before anything is built, compiled or written."""
    loop_lib.validate(config)
    for name in ("seq_len", "batch_size"):
        loop_lib.require(int(config[name]) > 0, name, config[name], "> 0")
    # eval_batches=0 would average no losses (NaN).
    loop_lib.require(int(config.eval_batches) >= 1, "eval_batches", config.eval_batches, ">= 1")
    if config.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"config.seq_len={config.seq_len} exceeds config.model.max_seq_len="
            f"{config.model.max_seq_len}"
        )
    explicit = sharding_lib.axis_type(config.mesh) == jax.sharding.AxisType.Explicit
    sharding_lib.typed_update(config.mesh)
    if explicit and (
        config.step.layerwise or config.step.relora or config.model.weight_storage != "float"
    ):
        raise ConfigError(
            "config.mesh.axis_types='explicit' runs the full-gradient step: it needs "
            "step.layerwise=False, step.relora=False and model.weight_storage='float' (use "
            "'auto' for those)"
        )
    optimizer_lib.validate(config.optimizer, num_steps=config.num_steps, step=config.step)
    mechanism_lib.validate(config)
    if config.step.stochastic_rounding and config.model.param_dtype != "bfloat16":
        raise ConfigError(
            "config.step.stochastic_rounding=True needs config.model.param_dtype="
            f"'bfloat16', got {config.model.param_dtype!r}"
        )
    if config.step.stochastic_rounding and config.step.relora:
        raise ConfigError(
            "config.step.stochastic_rounding=True is not supported with "
            "config.step.relora=True (the ReLoRA-like step applies its own updates)"
        )
    if config.step.relora and config.model.scan_layers:
        raise ConfigError(
            "config.step.relora=True needs config.model.scan_layers=False (the ReLoRA-like "
            "path reparameterises each layer's 2-D kernels)"
        )
    if config.step.layerwise and not config.model.scan_layers:
        raise ConfigError(
            "config.step.layerwise=True needs config.model.scan_layers=True (it scans "
            "over the stacked layers)"
        )
    storage = config.model.weight_storage
    if storage not in weight_storage_lib.STORAGES:
        raise ConfigError(
            f"config.model.weight_storage={storage!r}; expected one of "
            f"{weight_storage_lib.STORAGES}"
        )
    if storage == "int8" and not (config.step.layerwise and config.model.scan_layers):
        raise ConfigError(
            "config.model.weight_storage='int8' needs config.model.scan_layers=True and "
            "config.step.layerwise=True (the layer-wise step decodes one layer at a time)"
        )
    if (
        storage == "int8"
        and config.model.param_dtype != "float32"
        and not config.step.stochastic_rounding
    ):
        raise ConfigError(
            "config.model.weight_storage='int8' with config.model.param_dtype="
            f"{config.model.param_dtype!r} needs config.step.stochastic_rounding=True (the int8 "
            "matrices are always rounded stochastically; so must the bf16 embedding, head and "
            "norms be, with the same keys)"
        )
    if config.step.layers_per_call > 1 and not config.model.scan_layers:
        raise ConfigError(
            f"config.step.layers_per_call={config.step.layers_per_call} needs "
            "config.model.scan_layers=True (unstacked layers share one optimizer already)"
        )


def use_compilation_cache(directory: str | pathlib.Path) -> None:
    """Keeps compiled steps in ``directory`` (JAX's persistent compilation cache): a restarted
    or resumed run loads them instead of compiling again (minutes for a 350M+ step on a GPU).

    Process-wide, and JAX reads it at its first cached compile: call before compiling.
    """
    path = pathlib.Path(directory).expanduser()
    checkpoint_lib.check_writable(path, "config.compilation_cache_dir")
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Only compiles worth keeping (JAX's default threshold is 1 s).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _stacked_subspace(config: Any) -> bool:
    """Stacked layers (``model.scan_layers``) with an optimizer that treats each matrix on its
    own (everything but AdamW and optax.contrib.galore, which refuses stacked kernels)."""
    return (
        bool(config.model.scan_layers)
        and config.optimizer.name not in optimizer_lib.NO_PER_LAYER_OPTIMIZERS
    )


def build_trainer(config: Any, mesh: jax.sharding.Mesh) -> Trainer:
    """Builds the model, optimizer, shardings and the jitted init / train / eval steps."""
    model_config = model_lib.LlamaConfig.from_dict(config.model)
    model = model_lib.LlamaForCausalLM(model_config)
    tx = optimizer_lib.build_optimizer(config.optimizer, config.num_steps, num_devices=mesh.size)
    int8 = weight_storage_lib.is_int8(config)
    step_config = config.step
    if int8:  # int8 leaves are always rounded stochastically (fp32 leaves exactly)
        step_config = config.step.copy_and_resolve_references()
        step_config.stochastic_rounding = True
    apply_updates = optimizer_lib.update_applier(step_config, config.seed)
    dummy = jnp.zeros((1, config.seq_len), jnp.int32)
    layerwise = bool(config.step.layerwise)
    per_layer = layerwise or _stacked_subspace(config)
    if layerwise:  # one copy of tx per decoder layer, updated inside the backward pass
        clip = config.step.layer_grad_clip or None
        layer_tx = gl.layerwise.per_layer_transform(tx, clip)
        tx = gl.layerwise.layerwise(tx, layerwise_lib.STACK_PATH, clip_norm=clip)
    elif per_layer:
        # Stacked layers, full-gradient step: a subspace optimizer must still see each layer's
        # matrices (not an (L*in) x out stack, nor the stacked norms as matrices), so it runs
        # per layer; the global-norm clip stays global, in front of it.
        opt = config.optimizer.copy_and_resolve_references()
        opt.grad_clip = 0.0
        tx = gl.layerwise.layerwise(
            optimizer_lib.build_optimizer(opt, config.num_steps, num_devices=mesh.size),
            layerwise_lib.STACK_PATH,
            layers_per_call=config.step.layers_per_call,
        )
        if config.optimizer.grad_clip:
            tx = optax.chain(optax.clip_by_global_norm(config.optimizer.grad_clip), tx)

    param_shapes, opt_shapes, param_sharding, opt_sharding = sharding_lib.model_shardings(
        mesh, model, tx, dummy, stack_path=layerwise_lib.STACK_PATH if per_layer else None
    )
    # The leaves the gradients and the step's leaf_finite have: the float params' (also with
    # int8 storage, whose optimizer state is built from the float shapes).
    param_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(param_shapes)
    ]
    float_param_sharding = param_sharding
    if int8:
        param_shapes = weight_storage_lib.encode_shapes(param_shapes)
        param_sharding = weight_storage_lib.encode_shardings(param_sharding)
    batch_size_per_shard = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_size_per_shard:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the data x fsdp mesh "
            f"axes ({batch_size_per_shard})"
        )
    replicated = sharding_lib.replicated(mesh)
    adapters = (
        relora_lib.AdapterLayer.for_optimizer(param_shapes, config.optimizer)
        if config.step.relora
        else None
    )
    state_sharding = TrainState(
        replicated,
        param_sharding,
        opt_sharding,
        replicated,
        adapters.shardings(param_sharding) if adapters else None,
    )
    batch_sharding = sharding_lib.batch_sharding(mesh)

    explicit = sharding_lib.is_explicit(mesh)

    def init_params(key):
        return nn.unbox(model.init(key, dummy)["params"])

    if explicit:  # model code under auto_axes; params (and so the state) get explicit types
        init_params = jax.sharding.auto_axes(init_params, out_sharding=float_param_sharding)

    def init(key):
        if int8:  # layer by layer: the float stack never exists (train/weight_storage.py)
            params = weight_storage_lib.init_params(model_config, key, dummy)
            # The optimizer's state from the decoded weights: XLA drops the decode when the
            # state needs only their shapes (the subspace optimizers' init does).
            opt_state = tx.init(weight_storage_lib.decode(params, model_config.param_dtype))
        else:
            params = init_params(key)
            opt_state = tx.init(params)
        return step_lib.init_state(params, opt_state, adapters.init(params) if adapters else None)

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"])

    decode = None
    if int8:
        decode = functools.partial(weight_storage_lib.decode, dtype=model_config.param_dtype)
        loss_fn = layerwise_lib.make_loss_fn(model_config, cross_entropy, decode)
    if explicit:
        # The model places its activations with logical sharding constraints (Auto-axis
        # code); on an Explicit mesh its forward/backward runs inside auto_axes, its
        # gradient coming back in the params' explicit types.
        loss_fn = sharding_lib.auto_axes_loss(loss_fn)
    # Explicit mesh: the guard and update between typed boundaries, placed by XLA inside
    # (step_lib.guarded says why), unless mesh.typed_update keeps every operation typed.
    placed = explicit and not sharding_lib.typed_update(config.mesh)
    if layerwise:
        train_step = layerwise_lib.make_train_step(
            model_config, layer_tx, cross_entropy, apply_updates, decode
        )
    elif adapters:
        train_step = adapters.train_step(model.apply, cross_entropy, tx)
    else:
        train_step = functools.partial(
            step_lib.train_step,
            loss_fn=loss_fn,
            tx=tx,
            apply_updates=apply_updates,
            compiler_placed=placed,
        )
    eval_step = functools.partial(step_lib.eval_step, loss_fn=loss_fn)

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
        jit_init = jax.jit(init, out_shardings=state_sharding)
        jit_train = jax.jit(
            train_step,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        )
        jit_eval = jax.jit(
            eval_step, in_shardings=(param_sharding, batch_sharding), out_shardings=replicated
        )
        jit_weights = jax.jit(
            adapters.weights if adapters else (lambda state: state.params),
            in_shardings=(state_sharding,),
            out_shardings=param_sharding,
        )
    step_shape = jax.ShapeDtypeStruct((), jnp.int32)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(
            step_shape,
            param_shapes,
            opt_shapes,
            step_shape,
            jax.eval_shape(adapters.init, param_shapes) if adapters else None,
        ),
        state_sharding,
    )
    return Trainer(
        model,
        tx,
        mesh,
        state_sharding,
        batch_sharding,
        sharding_lib.in_trace_context(mesh, jit_init),
        sharding_lib.in_trace_context(mesh, jit_train),
        sharding_lib.in_trace_context(mesh, jit_eval),
        param_paths,
        abstract_state,
        sharding_lib.in_trace_context(mesh, jit_weights)
        if adapters
        else (lambda state: state.params),
        None
        if layerwise or adapters
        else _measuring_steps(
            mesh, loss_fn, tx, apply_updates, state_sharding, batch_sharding, placed
        ),
    )


def _measuring_steps(mesh, loss_fn, tx, apply_updates, state_sharding, batch_sharding, placed):
    """(halves, overlap) -> the full-gradient step that also measures (train/mechanism.py),
    jitted on first use like the plain one."""
    update = functools.partial(
        step_lib.update_step, tx=tx, apply_updates=apply_updates, compiler_placed=placed
    )

    @functools.cache
    def measuring(halves: bool, overlap: bool) -> Callable:
        fn = functools.partial(
            mechanism_lib.measured_step,
            loss_fn=loss_fn,
            apply=update,
            halves=halves,
            overlap=overlap,
        )
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
            jitted = jax.jit(
                fn,
                in_shardings=(state_sharding, batch_sharding),
                out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                donate_argnums=0,
            )
        return sharding_lib.in_trace_context(mesh, jitted)

    return measuring


to_global = loop_lib.to_global
_StopRequest = loop_lib.StopRequest


def evaluate(trainer: Trainer, params: Any, batches: list[dict]) -> float:
    losses = [
        float(trainer.eval_step(params, to_global(b, trainer.batch_sharding))["loss"])
        for b in batches
    ]
    return float(np.mean(losses))


def train_and_evaluate(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Runs (or resumes) training; returns the final metrics.

    Returns a dict with ``step``, ``train_loss``, ``eval_loss`` (at the last evaluation, step
    ``eval_step``), ``first_eval_loss`` (step ``first_eval_step``) and ``stopped_by_signal``.
    Bad config values, unwritable directories and a workdir in use by another run raise a
    one-line :class:`~train.errors.UserError` before anything on disk changes.
    """
    workdir = pathlib.Path(workdir)
    validate_config(config)
    directories = []
    if config.data.cache_dir:
        directories.append((config.data.cache_dir, "config.data.cache_dir"))
    if config.compilation_cache_dir:
        directories.append((config.compilation_cache_dir, "config.compilation_cache_dir"))
    loop_lib.start(config, workdir, directories)
    if config.compilation_cache_dir:  # before the first compile, the lock's included
        use_compilation_cache(config.compilation_cache_dir)
    with checkpoint_lib.WorkdirLock(workdir):
        return _train(config, workdir)


def _train(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
    mesh = sharding_lib.make_mesh(config.mesh)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % rows:
        raise ConfigError(
            f"config.batch_size={config.batch_size}: must be divisible by the data x fsdp mesh "
            f"axes ({rows}) of config.mesh {dict(mesh.shape)}"
        )
    try:
        datasets = data_lib.build_datasets(
            config.data,
            seq_len=config.seq_len,
            global_batch_size=config.batch_size,
            seed=config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            model_vocab_size=config.model.vocab_size,
        )
        eval_batches = datasets.eval_batches(config.eval_batches)
    except ValueError as e:  # the data config or files: the user's to fix (exit status 3)
        raise DataError(str(e)) from e
    interrupts.check()  # a Ctrl-C the tokenizer library swallowed (train/interrupts.py)
    trainer = build_trainer(config, mesh)
    logging.info(
        "attention: %s; XLA_FLAGS: %r",
        model_lib.resolve_attention(trainer.model.config),
        os.environ.get("XLA_FLAGS", ""),
    )
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_steps)
    tokens_per_step = config.batch_size * config.seq_len

    def init():
        logging.info("starting from scratch: %s", datasets.description)
        return trainer.init(jax.random.key(config.seed))

    floor = datasets.loss_floor  # data.source='sampled': the least expected loss
    if floor is not None:
        logging.info("loss floor of the sampled source: %.4f nats/token", floor)
        oracle = datasets.oracle_loss(len(eval_batches) * config.batch_size)

    def evaluate_state(state):
        loss = evaluate(trainer, trainer.weights(state), eval_batches)
        record = {"eval_loss": loss, "eval_ppl": math.exp(loss)}
        if floor is not None:  # the source's own loss on the same held-out rows, and the floor
            record.update(eval_floor=floor, eval_oracle=oracle, eval_excess=loss - oracle)
        return record

    def train_record(step, window, seconds):
        last = window[-1]
        return {
            "loss": float(last["loss"]),
            "grad_norm": float(last["grad_norm"]),
            "learning_rate": float(schedule(step - 1)),
            "tokens_per_s": len(window) * tokens_per_step / seconds,
            **(scheduler.record_fields(window) if scheduler else {}),
        }

    train_step, scheduler = trainer.train_step, None
    mech = config.mechanism
    if mech.grad_noise_every or mech.subspace_overlap:
        train_step = scheduler = mechanism_lib.Scheduler(
            trainer.train_step,
            trainer.measure,
            grad_noise_every=mech.grad_noise_every,
            update_every=config.optimizer.subspace.update_every if mech.subspace_overlap else None,
        )

    program = loop_lib.Program(
        init=init,
        abstract_state=trainer.abstract_state,
        train_step=train_step,
        next_batch=lambda: to_global(next(datasets.train), trainer.batch_sharding),
        data_position=datasets.train.get_state,
        set_data_position=datasets.train.set_state,
        evaluate=evaluate_state,
        train_record=train_record,
        param_paths=trainer.param_paths,
    )
    run = loop_lib.run(config, workdir, program)
    return {
        "stopped_by_signal": run.stopped_by_signal,
        "signal": run.signal,  # the stop's SIGINT / SIGTERM (None: not stopped by a signal)
        "step": run.step,
        "train_loss": run.history[-1]["loss"] if run.history else None,
        "eval_loss": run.evals[-1]["eval_loss"] if run.evals else None,
        "first_eval_loss": run.evals[0]["eval_loss"] if run.evals else None,
        # The steps of those evaluations (the last can be older than "step", e.g. after
        # run_steps or a stop between two evaluations).
        "eval_step": run.evals[-1]["step"] if run.evals else None,
        "first_eval_step": run.evals[0]["step"] if run.evals else None,
    }
