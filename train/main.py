"""Pre-train a LLaMA with GaLore / GoLore (or AdamW): the jitted sharded step and the loop.

``python -m train --config configs/llama_tiny.py --workdir runs/tiny`` trains, evaluates
held-out perplexity every ``eval_every`` steps, writes ``metrics.jsonl``, TensorBoard events,
``loss.png`` and orbax checkpoints to the workdir, and resumes from the latest checkpoint when
the workdir already holds one. SIGTERM / SIGINT finish the current step, save and exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import golore_jax as gl
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import distributed as distributed_lib
from train import layerwise as layerwise_lib
from train import model as model_lib
from train import optimizer as optimizer_lib
from train import relora as relora_lib
from train import sharding as sharding_lib
from train.errors import ConfigError, UserError, WorkdirError

NONFINITE_POLICIES = ("skip", "stop")


class TrainState(NamedTuple):
    step: jax.Array  # int32, optimizer steps applied or skipped
    params: Any
    opt_state: Any
    skipped: jax.Array  # int32, steps skipped for non-finite loss or gradients
    # ReLoRA-like runs (config.step.relora): A per projected leaf, whose params hold W0.
    adapters: Any = None


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


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raises a one-line ConfigError ``config.KEY=VALUE: must be ALLOWED`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config.{key}={value!r}: must be {allowed}")


def validate_config(config: Any) -> None:
    """Checks the config before anything is built, compiled or written."""
    for name in ("seq_len", "batch_size", "num_steps", "log_every", "eval_every"):
        require(int(config[name]) > 0, name, config[name], "> 0")
    # eval_batches=0 would average no losses (NaN); checkpoint_every=0 divides by zero;
    # keep_checkpoints=0 makes orbax delete every checkpoint, the saved ones included.
    for name in ("eval_batches", "checkpoint_every", "keep_checkpoints"):
        require(int(config[name]) >= 1, name, config[name], ">= 1")
    require(int(config.max_skipped) >= 0, "max_skipped", config.max_skipped, ">= 0")
    if config.run_steps is not None:
        require(int(config.run_steps) >= 1, "run_steps", config.run_steps, ">= 1 (or None)")
    if config.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"config.seq_len={config.seq_len} exceeds config.model.max_seq_len="
            f"{config.model.max_seq_len}"
        )
    if config.nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(
            f"config.nonfinite must be one of {NONFINITE_POLICIES}, got {config.nonfinite!r}"
        )
    optimizer_lib.validate(config.optimizer, num_steps=config.num_steps, step=config.step)
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
    distributed_lib.validate(config)


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


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _stacked_subspace(config: Any) -> bool:
    """Stacked layers (``model.scan_layers``) with an optimizer that treats each matrix on its
    own (everything but AdamW and optax.contrib.galore, which refuses stacked kernels)."""
    return bool(config.model.scan_layers) and config.optimizer.name not in (
        "adamw",
        "optax_galore",
    )


def build_trainer(config: Any, mesh: jax.sharding.Mesh) -> Trainer:
    """Builds the model, optimizer, shardings and the jitted init / train / eval steps."""
    model_config = model_lib.LlamaConfig.from_dict(config.model)
    model = model_lib.LlamaForCausalLM(model_config)
    tx = optimizer_lib.build_optimizer(config.optimizer, config.num_steps, num_devices=mesh.size)
    apply_updates = optimizer_lib.update_applier(config.step, config.seed)
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
        )
        if config.optimizer.grad_clip:
            tx = optax.chain(optax.clip_by_global_norm(config.optimizer.grad_clip), tx)

    param_shapes, opt_shapes, param_sharding, opt_sharding = sharding_lib.model_shardings(
        mesh, model, tx, dummy, stack_path=layerwise_lib.STACK_PATH if per_layer else None
    )
    batch_size_per_shard = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_size_per_shard:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by the data x fsdp mesh "
            f"axes ({batch_size_per_shard})"
        )
    replicated = sharding_lib.replicated(mesh)
    relora = bool(config.step.relora)
    layouts = (
        relora_lib.layouts_of(
            param_shapes, config.optimizer.subspace.rank, config.optimizer.subspace.side
        )
        if relora
        else None
    )
    adapter_sharding = relora_lib.adapter_shardings(param_sharding, layouts) if relora else None
    state_sharding = TrainState(
        replicated, param_sharding, opt_sharding, replicated, adapter_sharding
    )
    batch_sharding = sharding_lib.batch_sharding(mesh)

    def init(key):
        params = nn.unbox(model.init(key, dummy)["params"])
        zero = jnp.zeros([], jnp.int32)
        adapters = relora_lib.init_adapters(params, layouts) if relora else None
        return TrainState(zero, params, tx.init(params), zero, adapters)

    def loss_fn(params, batch):
        return cross_entropy(model.apply({"params": params}, batch["inputs"]), batch["targets"])

    def finish(state, loss, grads, apply):
        """Applies the update only if loss and gradients are finite; the step's metrics."""
        leaf_finite = jnp.stack(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]
        )
        finite = jnp.isfinite(loss) & jnp.all(leaf_finite)
        # A non-finite step changes nothing but the counters (policy 'skip' or 'stop').
        params, opt_state, adapters = jax.lax.cond(
            finite,
            apply,
            lambda operands: operands,
            (state.params, state.opt_state, state.adapters),
        )
        new_state = TrainState(
            state.step + 1,
            params,
            opt_state,
            state.skipped + (~finite).astype(jnp.int32),
            adapters,
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "finite": finite,
            "leaf_finite": leaf_finite,
        }
        return new_state, metrics

    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)

        def apply(operands):
            params, opt_state, adapters = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            return apply_updates(params, updates, state.step), opt_state, adapters

        return finish(state, loss, grads, apply)

    if layerwise:
        train_step = layerwise_lib.make_train_step(
            model_config, layer_tx, cross_entropy, apply_updates
        )
    if relora:
        train_step = relora_lib.make_train_step(
            model.apply, cross_entropy, tx, layouts, config.optimizer.subspace.update_every, finish
        )

    def merged_weights(state):  # ReLoRA-like runs: W0 + P A
        bases = relora_lib.subspace_state(state.opt_state).bases
        return relora_lib.merge(state.params, state.adapters, bases, layouts)

    def eval_step(params, batch):
        return {"loss": loss_fn(params, batch)}

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
            merged_weights, in_shardings=(state_sharding,), out_shardings=param_sharding
        )
    param_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(param_shapes)
    ]
    step_shape = jax.ShapeDtypeStruct((), jnp.int32)
    abstract_state = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        TrainState(
            step_shape,
            param_shapes,
            opt_shapes,
            step_shape,
            jax.eval_shape(lambda p: relora_lib.init_adapters(p, layouts), param_shapes)
            if relora
            else None,
        ),
        state_sharding,
    )
    return Trainer(
        model,
        tx,
        mesh,
        state_sharding,
        batch_sharding,
        _in_context(mesh, jit_init),
        _in_context(mesh, jit_train),
        _in_context(mesh, jit_eval),
        param_paths,
        abstract_state,
        _in_context(mesh, jit_weights) if relora else (lambda state: state.params),
    )


def _in_context(mesh: jax.sharding.Mesh, fn: Callable) -> Callable:
    """Calls ``fn`` with the mesh and logical rules active (needed when it traces)."""

    def wrapped(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
            return fn(*args)

    def lower(*args):  # ahead-of-time: wrapped.lower(*args).compile() (benchmarks/memory.py)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
            return fn.lower(*args)

    wrapped.lower = lower
    return wrapped


def to_global(batch: dict, sharding: Any) -> dict:
    """This host's rows of a batch -> a global array sharded over data x fsdp."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step.

    With several processes SIGTERM stays with JAX's preemption notifier, which makes all
    processes stop at the same step (:meth:`agreed`); SIGINT is forwarded to it.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in distributed_lib.stop_signals():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if jax.process_count() > 1:
            distributed_lib.forward_to_preemption_notifier()
        else:
            self.signal = signum

    def agreed(self, step: int) -> bool:
        """Whether to save and stop after ``step``: the same answer on every process."""
        if distributed_lib.preemption_step(step):
            self.signal = signal.SIGTERM
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _loss_png(history: list[dict], evals: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss")
    if evals:
        ax.plot(
            [e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval loss"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(trainer: Trainer, params: Any, batches: list[dict]) -> float:
    losses = [
        float(trainer.eval_step(params, to_global(b, trainer.batch_sharding))["loss"])
        for b in batches
    ]
    return float(np.mean(losses))


def train_and_evaluate(config: Any, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Runs (or resumes) training; returns the final metrics.

    Returns a dict with ``step``, ``train_loss``, ``eval_loss`` (at the last evaluation),
    ``first_eval_loss`` and ``stopped_by_signal``. Bad config values, unwritable directories
    and a workdir in use by another run raise a one-line :class:`~train.errors.UserError`
    before anything on disk changes.
    """
    workdir = pathlib.Path(workdir)
    validate_config(config)
    if config.distributed:
        distributed_lib.initialize(config)
    check_directories(config, workdir)
    if config.compilation_cache_dir:  # before the first compile, the lock's included
        use_compilation_cache(config.compilation_cache_dir)
    _warn_small_cpu_thread_pool()
    with checkpoint_lib.WorkdirLock(workdir):
        return _train(config, workdir)


def check_directories(config: Any, workdir: pathlib.Path) -> None:
    """Every directory the run writes to must be writable, before the first step."""
    checkpoint_lib.check_writable(workdir)
    for sub in ("checkpoints", "tensorboard"):
        if (workdir / sub).exists():
            checkpoint_lib.check_writable(workdir / sub, f"workdir's {sub} directory")
    metrics = workdir / "metrics.jsonl"
    if metrics.exists() and not os.access(metrics, os.W_OK):
        raise WorkdirError(f"{metrics} is not writable")
    if config.data.cache_dir:
        checkpoint_lib.check_writable(pathlib.Path(config.data.cache_dir), "config.data.cache_dir")
    if config.compilation_cache_dir:
        checkpoint_lib.check_writable(
            pathlib.Path(config.compilation_cache_dir), "config.compilation_cache_dir"
        )


def _warn_small_cpu_thread_pool() -> None:
    """Several CPU devices and no spare pool thread can hang a batched refresh (see
    train/xla_flags.py: ``python -m train`` sizes the pool; a library caller sets PJRT_NPROC)."""
    if jax.default_backend() != "cpu" or jax.local_device_count() == 1:
        return
    cores = os.cpu_count() or 1
    threads = int(os.environ.get("PJRT_NPROC", cores))
    if threads < cores + jax.local_device_count():
        logging.warning(
            "%d CPU devices share %d XLA:CPU threads: a batched subspace refresh can hang; "
            "set PJRT_NPROC=%d (or more) before JAX starts",
            jax.local_device_count(),
            threads,
            cores + jax.local_device_count(),
        )


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
    except ValueError as e:  # the data config or files: the user's to fix
        if isinstance(e, UserError):
            raise
        raise ConfigError(str(e)) from e
    trainer = build_trainer(config, mesh)
    logging.info(
        "attention: %s; XLA_FLAGS: %r",
        model_lib.resolve_attention(trainer.model.config),
        os.environ.get("XLA_FLAGS", ""),
    )
    checkpoints = checkpoint_lib.Checkpoints(
        workdir, keep=config.keep_checkpoints, every=config.checkpoint_every
    )
    # The newest readable checkpoint; unreadable newer ones are moved aside with a warning.
    restored = checkpoints.restore_latest(trainer.abstract_state, config)
    latest = None
    if restored is None:
        state = trainer.init(jax.random.key(config.seed))
        logging.info("starting from scratch: %s", datasets.description)
        initial_eval = evaluate(trainer, trainer.weights(state), eval_batches)
    else:
        latest, state, meta = restored
        datasets.train.set_state(meta["data_position"])
        logging.info("resumed from step %d in %s", latest, checkpoints.directory)
        _warn_changed_seed(meta, config, latest)

    def meta() -> dict[str, Any]:
        return {
            "data_position": datasets.train.get_state(),
            "fingerprint": checkpoint_lib.fingerprint(config),
            "config": json.loads(config.to_json_best_effort()),
        }

    tokens_per_step = config.batch_size * config.seq_len
    metrics_path = workdir / "metrics.jsonl"
    history, evals = [], []
    main = distributed_lib.is_main()  # process 0 alone writes metrics, events and plots
    if metrics_path.exists():
        records = _read_metrics(
            metrics_path, keep_until=-1 if latest is None else latest, rewrite=main
        )
        for record in records:
            (evals if "eval_loss" in record else history).append(record)
    writer = _summary_writer(workdir)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, config.num_steps)
    step = int(state.step)
    # Stop (after saving) when this invocation has run config.run_steps steps, e.g. to fit
    # a long run into several time-limited jobs.
    stop_at = None if config.run_steps is None else step + config.run_steps
    result: dict[str, Any] = {"stopped_by_signal": False}
    progress = _progress(step, config.num_steps)
    metrics_cm = metrics_path.open("a") if main else contextlib.nullcontext()
    with _StopRequest() as stop, metrics_cm as metrics_file:
        if latest is None:
            record = {"step": 0, "eval_loss": initial_eval, "eval_ppl": math.exp(initial_eval)}
            evals.append(record)
            _write(metrics_file, writer, record)
        last_time, last_step = time.perf_counter(), step
        while step < config.num_steps:
            batch = to_global(next(datasets.train), trainer.batch_sharding)
            state, metrics = trainer.train_step(state, batch)
            step += 1
            if config.nonfinite == "stop" and not bool(metrics["finite"]):
                bad = [
                    p
                    for p, ok in zip(trainer.param_paths, metrics["leaf_finite"], strict=True)
                    if not ok
                ]
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step} (leaves: {bad or ['loss']}); "
                    f"the last checkpoint is step {checkpoints.latest_step()}"
                )
            if step % config.log_every == 0 or step == config.num_steps:
                loss = float(metrics["loss"])  # waits for the step: time it after this
                now = time.perf_counter()
                record = {
                    "step": step,
                    "loss": loss,
                    "grad_norm": float(metrics["grad_norm"]),
                    "learning_rate": float(schedule(step - 1)),
                    "tokens_per_s": (step - last_step) * tokens_per_step / (now - last_time),
                    "skipped": int(state.skipped),
                }
                last_time, last_step = now, step
                history.append(record)
                _write(metrics_file, writer, record)
                progress.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                if record["skipped"] > config.max_skipped:
                    raise FloatingPointError(
                        f"{record['skipped']} steps had non-finite loss or gradients "
                        f"(config.max_skipped={config.max_skipped}); stopping"
                    )
            if step % config.eval_every == 0 or step == config.num_steps:
                eval_loss = evaluate(trainer, trainer.weights(state), eval_batches)
                record = {"step": step, "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss)}
                evals.append(record)
                _write(metrics_file, writer, record)
            progress.update(1)
            if step % config.checkpoint_every == 0 or step == config.num_steps:
                checkpoints.save(step, state, meta())
            if step % config.eval_every == 0 or step % config.checkpoint_every == 0:
                last_time = time.perf_counter()  # keep eval and saving out of tokens/s
            if stop.agreed(step) or step == stop_at:
                checkpoints.save(step, state, meta(), force=True)
                reason = f"received signal {stop.signal}" if stop.signal else "run_steps reached"
                print(
                    f"{reason}: saved step {step} to {checkpoints.directory}; "
                    "rerun the same command to resume"
                )
                result["stopped_by_signal"] = stop.signal is not None
                break
    progress.close()
    checkpoints.close()
    if writer is not None:
        writer.close()
    if history and main:
        _loss_png(history, evals, workdir / "loss.png")
    result.update(
        step=step,
        train_loss=history[-1]["loss"] if history else None,
        eval_loss=evals[-1]["eval_loss"] if evals else None,
        first_eval_loss=evals[0]["eval_loss"] if evals else None,
    )
    return result


def _warn_changed_seed(meta: dict[str, Any], config: Any, step: int) -> None:
    """A resumed run may change config.seed (it set the init, which is restored, and the data
    order, which continues from the saved position in the new seed's order): said loudly."""
    saved = (meta.get("config") or {}).get("seed")
    if saved is not None and saved != config.seed:
        logging.warning(
            "RESUMING step %d WITH A DIFFERENT SEED: config.seed=%s, the checkpoint was saved "
            "with seed=%s; the data order from here on follows seed %s",
            step,
            config.seed,
            saved,
            config.seed,
        )


def _read_metrics(path: pathlib.Path, keep_until: int, *, rewrite: bool = True) -> list[dict]:
    """The records of ``path`` up to step ``keep_until``: the ones after it are dropped.

    Steps run after the checkpoint a run resumes from (before a crash or kill) are run again,
    so their old records are removed (the file is rewritten atomically) and every step appears
    once. A torn last line (a kill mid-write) is dropped too.
    """
    lines = path.read_text().splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= keep_until:
            records.append(record)
    if len(records) != len(lines) and rewrite:
        logging.warning(
            "%s: dropped %d records past the resumed step %d (they will be run again)",
            path,
            len(lines) - len(records),
            keep_until,
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)
    return records


def _write(metrics_file, writer, record: dict) -> None:
    if metrics_file is None:  # not process 0
        return
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()
    if writer is not None:
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(key, value, record["step"])


def _summary_writer(workdir: pathlib.Path):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=jax.process_index() != 0, unit="step")
