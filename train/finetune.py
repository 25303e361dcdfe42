"""Fine-tune the LLaMA of ``train.model`` on yes/no and two-choice tasks (BoolQ, WinoGrande).

``python -m train.finetune --config configs/finetune_boolq.py --workdir DIR``

Data come from LOCAL jsonl files named in the config (``config.data.train_file`` and
``config.data.eval_file``); nothing is downloaded. Their formats, the encoding and the scoring
are ``train/choice_tasks.py``'s. Training minimises the cross-entropy of the correct
continuation's tokens only. The run is the pre-training loop (``train/loop.py``):
``metrics.jsonl`` gets the train loss every ``log_every`` steps and the eval accuracy at step
0, every ``eval_every`` steps and at the end; TensorBoard events, ``loss.png`` and orbax
checkpoints go to the workdir; a rerun resumes from the newest checkpoint; non-finite steps
follow ``config.nonfinite``; SIGTERM / SIGINT save and stop.

Weights: ``config.init.hf_checkpoint`` (a local Hugging Face LLaMA directory, read by
``train.hf_checkpoint.load_hf_llama``) with its tokenizer from ``config.init.tokenizer`` (a
``tokenizer.json`` or SentencePiece ``.model``; if unset, the checkpoint directory's own
``tokenizer.json`` / ``tokenizer.model``), or, when ``hf_checkpoint`` is None, a random init of
``config.model`` with a small byte-level BPE trained on the task text (tests and smoke runs).
At the end the weights are written back in Hugging Face format (``config.json`` +
``model.safetensors`` + the tokenizer file) to ``config.export.path`` (default
``WORKDIR/hf_export``), loadable by ``transformers.LlamaForCausalLM.from_pretrained``.

Sharding: the step runs on ``config.mesh`` as the pre-training trainer does
(``train.sharding``): params and optimizer state (bases and low-rank moments included) carry
``NamedSharding``s from the model's logical axis names, checkpoint tensors are placed on their
shards as they are read, and the jitted step donates params and state. The recipe's batch of 1
cannot be split over ``data`` / ``fsdp``, so the default mesh is tensor parallelism over every
device (``data=1, fsdp=1, tensor=-1``), which spreads a 7B's weights, gradients and optimizer
state over the GPUs. Several processes (``config.distributed``, as in pre-training): each
feeds only the rows of every batch its devices hold; process 0 alone writes the metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from train import checkpoint as checkpoint_lib
from train import cli, hf_checkpoint
from train import loop as loop_lib
from train import model as model_lib
from train import optimizer as optimizer_lib
from train import sharding as sharding_lib
from train import step as step_lib
from train import tokenizer as tokenizer_lib
from train.choice_tasks import (
    TASKS,
    EpochSampler,
    accuracy_of,
    answer_loss_of,
    candidate_scores,
    continuation_logprob,
    encode_examples,
    load_examples,
    resolve_path,
    task_texts,
)
from train.console import number
from train.errors import ConfigError

# Optimizers whose ``rank`` is a subspace rank that must stay below each matrix's smaller side.
SUBSPACE_OPTIMIZERS = ("galore", "golore", "hybrid", "importance")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}


# --------------------------------------------------------------------------------------------
# Model, tokenizer and optimizer.


answer_loss = step_lib.answer_loss


def subspace_rank_rule(rank: int) -> Callable[[str, tuple[int, int]], int]:
    """Per-matrix rank ``min(rank, min(m, n) - 1)``: the recipe's 1024 on a small model."""

    def rule(path: str, shape: tuple[int, int]) -> int:
        del path
        return max(1, min(int(rank), min(shape) - 1))

    return rule


def optimizer_block(opt: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.optimizer`` with the subspace rank clipped per matrix (see subspace_rank_rule)."""
    values = opt.to_dict()
    if opt.name in SUBSPACE_OPTIMIZERS:
        values["subspace"]["rank"] = subspace_rank_rule(opt.subspace.rank)
    return ml_collections.ConfigDict(values)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What ``config.init`` names: the model's shape, the tokenizer, where weights come from."""

    model_config: model_lib.LlamaConfig
    tokenizer: Any
    tokenizer_file: pathlib.Path  # copied beside the exported weights
    checkpoint: pathlib.Path | None  # a Hugging Face directory; None: random init
    load_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def _checkpoint_tokenizer(ckpt: pathlib.Path) -> str:
    """The checkpoint directory's own ``tokenizer.json`` / ``tokenizer.model``."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (ckpt / name).exists():
            return str(ckpt / name)
    raise ValueError(
        "config.init.tokenizer is not set and the checkpoint directory "
        f"{str(ckpt)!r} has no tokenizer.json / tokenizer.model"
    )


def resolve_model(
    config: ml_collections.ConfigDict, texts: Callable[[], list[str]], workdir: pathlib.Path
) -> ModelSource:
    """The model config and tokenizer as ``config.init`` says; no weights are read yet.

    Weights are read once the mesh and shardings are known (:func:`initial_params`), so each
    tensor goes straight to its devices.
    """
    init = config.init
    if not init.hf_checkpoint:
        tokenizer = tokenizer_lib.train_bpe(texts(), init.bpe_vocab_size)
        tokenizer_file = workdir / "tokenizer.json"
        tokenizer.save(tokenizer_file)
        model_dict = config.model.to_dict()
        model_dict["vocab_size"] = tokenizer.vocab_size
        model_dict["max_seq_len"] = max(model_dict["max_seq_len"], config.seq_len)
        model_config = model_lib.LlamaConfig.from_dict(model_dict)
        return ModelSource(model_config, tokenizer, tokenizer_file, None)

    ckpt = resolve_path(init.hf_checkpoint, "config.init.hf_checkpoint")
    tok_path = init.tokenizer or _checkpoint_tokenizer(ckpt)
    tokenizer_file = resolve_path(tok_path, "config.init.tokenizer")
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_file, eos_token=init.eos_token)
    config_file = resolve_path(str(ckpt / "config.json"), "config.init.hf_checkpoint/config.json")
    hf_config = json.loads(config_file.read_text())
    # Compute dtype, master-weight dtype, remat and attention come from config.model, the shape
    # from the checkpoint; RoPE has no table, so a longer seq_len only raises max_seq_len.
    overrides = {
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "remat": config.model.remat,
        "attention": config.model.attention,
        "max_seq_len": max(int(hf_config.get("max_position_embeddings", 2048)), config.seq_len),
    }
    model_config, _ = hf_checkpoint.config_from_hf(hf_config, **overrides)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"tokenizer {tok_path} has {tokenizer.vocab_size} ids but the checkpoint's "
            f"vocabulary is {model_config.vocab_size}"
        )
    return ModelSource(model_config, tokenizer, tokenizer_file, ckpt, overrides)


# --------------------------------------------------------------------------------------------
# The sharded step.


@dataclasses.dataclass
class FineTuner:
    """Compiled pieces of one fine-tuning run on a mesh.

    ``train_step`` and ``score`` take global batches on the devices (:meth:`put` makes one
    from host rows); ``train_step`` donates its state (the step updates it in place).
    """

    model: model_lib.LlamaForCausalLM
    tx: optax.GradientTransformation
    mesh: Mesh
    param_sharding: Any
    opt_sharding: Any
    state_sharding: Any
    batch_sharding: NamedSharding
    param_shapes: Any  # ShapeDtypeStructs
    opt_shapes: Any
    abstract_state: step_lib.TrainState  # ShapeDtypeStructs with shardings: the restore target
    param_paths: list[str]
    init_params: Callable[[jax.Array], Any]
    init_state: Callable[[Any], step_lib.TrainState]  # params -> the state at step 0
    train_step: Callable[[step_lib.TrainState, dict], tuple[step_lib.TrainState, dict]]
    score: Callable[[Any, dict], jax.Array]
    # The jitted step itself, e.g. to lower and compile ahead of time.
    jit_train_step: Any

    def put(self, rows: dict) -> dict:
        """A global batch (the same host rows on every process) on the devices; each process
        passes only the rows its devices hold."""
        return loop_lib.global_batch(rows, self.batch_sharding)

    def lower_train_step(self, batch_size: int, seq_len: int) -> Any:
        """The train step lowered for abstract, sharded inputs (``.compile()`` it)."""
        batch = {
            k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=self.batch_sharding)
            for k, dtype in BATCH_DTYPES.items()
        }
        with sharding_lib.trace_context(self.mesh):
            return self.jit_train_step.lower(self.abstract_state, batch)


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings (abstract inputs for ``lower``)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def single_device_mesh() -> Mesh:
    """A ``(1, 1, 1)`` mesh on the first device."""
    return sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def build_finetuner(
    model_config: model_lib.LlamaConfig,
    opt: ml_collections.ConfigDict,
    num_steps: int,
    mesh: Mesh | None = None,
    *,
    tx: optax.GradientTransformation | None = None,
) -> FineTuner:
    """The model, optimizer, shardings and jitted init / train step / candidate scorer.

    Params and optimizer state (bases and low-rank moments included) get ``NamedSharding``s
    from the model's logical axis names (``train.sharding``), as in the pre-training trainer;
    the batch is split over ``data x fsdp``. ``tx`` replaces the optimizer built from ``opt``.
    The step is :func:`train.step.train_step` on the answer-token loss.
    """
    mesh = mesh if mesh is not None else single_device_mesh()
    model = model_lib.LlamaForCausalLM(model_config)
    if tx is None:
        tx = optimizer_lib.build_optimizer(optimizer_block(opt), num_steps, num_devices=mesh.size)
    dummy = jnp.zeros((1, 1), jnp.int32)  # params do not depend on the length

    param_shapes, opt_shapes, param_sharding, opt_sharding = sharding_lib.model_shardings(
        mesh, model, tx, dummy
    )
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    state_sharding = step_lib.TrainState(replicated, param_sharding, opt_sharding, replicated)

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return step_lib.answer_loss(logits, batch["targets"], batch["weights"])

    def score(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return continuation_logprob(logits, batch["targets"], batch["weights"])

    jit_init = jax.jit(
        lambda key: nn.unbox(model.init(key, dummy)["params"]), out_shardings=param_sharding
    )
    jit_state = jax.jit(
        lambda params: step_lib.init_state(params, tx.init(params)),
        in_shardings=(param_sharding,),
        out_shardings=state_sharding,
    )
    jit_train = jax.jit(
        functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,  # no second copy of params and state
    )
    jit_score = jax.jit(
        score, in_shardings=(param_sharding, batch_sharding), out_shardings=replicated
    )
    step_shape = jax.ShapeDtypeStruct((), jnp.int32)
    abstract_state = _with_shardings(
        step_lib.TrainState(step_shape, param_shapes, opt_shapes, step_shape), state_sharding
    )
    param_paths = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(param_shapes)
    ]
    # They trace on first call: under the mesh, where the logical constraints resolve.
    return FineTuner(
        model=model,
        tx=tx,
        mesh=mesh,
        param_sharding=param_sharding,
        opt_sharding=opt_sharding,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
        param_shapes=param_shapes,
        opt_shapes=opt_shapes,
        abstract_state=abstract_state,
        param_paths=param_paths,
        init_params=sharding_lib.in_trace_context(mesh, jit_init),
        init_state=sharding_lib.in_trace_context(mesh, jit_state),
        train_step=sharding_lib.in_trace_context(mesh, jit_train),
        score=sharding_lib.in_trace_context(mesh, jit_score),
        jit_train_step=jit_train,
    )


def finetune_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None) -> Mesh:
    """``config.mesh`` over ``devices`` (default: all), checked against the batch sizes."""
    mesh = sharding_lib.make_mesh(config.mesh, list(devices) if devices is not None else None)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % rows:
            raise ConfigError(
                f"config.{name}={config[name]} is not divisible by the data x fsdp mesh axes "
                f"({rows}) of config.mesh {dict(mesh.shape)}; with batch size 1 use tensor "
                "parallelism (the default mesh: data=1, fsdp=1, tensor=-1)"
            )
    return mesh


def initial_params(source: ModelSource, ft: FineTuner, seed: int) -> Any:
    """The checkpoint's weights, each tensor placed on its shards as read; else a random init."""
    if source.checkpoint is None:
        return ft.init_params(jax.random.key(seed))
    loaded_config, params = hf_checkpoint.load_hf_llama(
        source.checkpoint, shardings=ft.param_sharding, **source.load_overrides
    )
    if loaded_config != source.model_config:  # Both read the same config.json.
        raise RuntimeError(
            f"{source.checkpoint}/config.json changed during the run: {loaded_config} != "
            f"{source.model_config}"
        )
    return params


# --------------------------------------------------------------------------------------------
# The run.


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked before any file is read (one-line ConfigErrors)."""
    loop_lib.validate(config)
    for name in ("seq_len", "batch_size", "eval_batch_size"):
        loop_lib.require(int(config[name]) > 0, name, config[name], "> 0")
    if config.data.task not in TASKS:
        raise ConfigError(f"config.data.task must be one of {TASKS}, got {config.data.task!r}")
    if config.export.dtype not in EXPORT_DTYPES:
        raise ConfigError(
            f"config.export.dtype must be one of {EXPORT_DTYPES}, got {config.export.dtype!r}"
        )
    optimizer_lib.validate(config.optimizer, num_steps=config.num_steps)
    storage = config.model.weight_storage
    if storage != "float":
        raise ConfigError(
            f"config.model.weight_storage={storage!r} is a pre-training option (the layer-wise "
            "step); fine-tuning stores its weights in model.param_dtype: use 'float'"
        )


def export_finetuned(
    config: ml_collections.ConfigDict,
    source: ModelSource,
    params: Any,
    workdir: pathlib.Path,
) -> pathlib.Path | None:
    """Writes the weights as a Hugging Face LLaMA directory (with the tokenizer file).

    ``config.export.path`` or ``WORKDIR/hf_export``: ``config.json``, ``model.safetensors``
    (``config.export.dtype``) and the tokenizer, so it loads with
    ``transformers.LlamaForCausalLM.from_pretrained`` and fine-tunes again from there.
    """
    if not config.export.enabled:
        return None
    path = pathlib.Path(config.export.path or workdir / "hf_export").expanduser()
    hf_checkpoint.export_hf_llama(
        source.model_config, params, path, torch_dtype=config.export.dtype
    )
    if jax.process_index() == 0:
        name = "tokenizer.model" if source.tokenizer_file.suffix == ".model" else "tokenizer.json"
        shutil.copyfile(source.tokenizer_file, path / name)
    return path


def finetune(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    devices: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Fine-tunes (or resumes) and evaluates on ``config.mesh`` over ``devices`` (default: all).

    Runs the shared loop (``train/loop.py``: checkpoints and resume, the non-finite policy,
    ``metrics.jsonl``, TensorBoard, ``loss.png``, stop requests, ``run_steps``) and, once
    ``config.num_steps`` are done and with ``config.export.enabled``, writes the weights in
    Hugging Face format (:func:`export_finetuned`). Returns ``step``, ``train_loss``,
    ``first_eval_accuracy``, ``eval_accuracy``, ``first_eval_answer_loss``,
    ``eval_answer_loss``, ``export_dir`` (or None), ``model_config``, the final ``params`` and
    ``stopped_by_signal``.
    """
    validate_config(config)
    workdir = pathlib.Path(workdir)
    loop_lib.start(config, workdir)
    with checkpoint_lib.WorkdirLock(workdir):
        return _finetune(config, workdir, devices)


def _finetune(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, devices: Sequence[Any] | None
) -> dict[str, Any]:
    mesh = finetune_mesh(config, devices)
    data = config.data
    train_examples = load_examples(
        data.train_file, data.task, "config.data.train_file", data.max_train_examples
    )
    eval_examples = load_examples(
        data.eval_file, data.task, "config.data.eval_file", data.max_eval_examples
    )
    source = resolve_model(config, lambda: task_texts(train_examples), workdir)
    tokenizer, model_config = source.tokenizer, source.model_config
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"config.seq_len={config.seq_len} exceeds the model's max_seq_len="
            f"{model_config.max_seq_len}"
        )
    train_data = encode_examples(tokenizer, train_examples, config.seq_len, correct_only=True)
    eval_data = encode_examples(tokenizer, eval_examples, config.seq_len, correct_only=False)
    eval_labels = np.asarray([ex.label for ex in eval_examples])
    ft = build_finetuner(model_config, config.optimizer, config.num_steps, mesh)
    sampler = EpochSampler(len(train_data["inputs"]), config.batch_size, config.seed)
    start = time.time()

    def next_batch() -> dict:
        idx = next(sampler)
        return ft.put({k: train_data[k][idx] for k in ("inputs", "targets", "weights")})

    def evaluate_state(state) -> dict[str, Any]:
        score = lambda params, rows: ft.score(params, ft.put(rows))  # noqa: E731
        scores = candidate_scores(score, state.params, eval_data, config.eval_batch_size)
        accuracy, _ = accuracy_of(scores, eval_data, eval_labels)
        return {
            "eval_accuracy": accuracy,
            "eval_answer_loss": answer_loss_of(scores, eval_data, eval_labels),
            "eval_examples": len(eval_labels),
        }

    def train_record(step, window, seconds) -> dict[str, Any]:
        del step, seconds
        return {
            "train_loss": float(np.mean([float(m["loss"]) for m in window])),
            "elapsed_s": round(time.time() - start, 2),
        }

    program = loop_lib.Program(
        init=lambda: ft.init_state(initial_params(source, ft, config.seed)),
        abstract_state=ft.abstract_state,
        train_step=ft.train_step,
        next_batch=next_batch,
        data_position=sampler.get_state,
        set_data_position=sampler.set_state,
        evaluate=evaluate_state,
        train_record=train_record,
        param_paths=ft.param_paths,
        plot=("train_loss", "eval_answer_loss"),
    )
    run = loop_lib.run(config, workdir, program)
    params = run.state.params
    del run.state  # Free the optimizer state before the host copy of the export.
    done = run.step == config.num_steps
    export_dir = export_finetuned(config, source, params, workdir) if done else None
    first, last = run.evals[0], run.evals[-1]
    return {
        "step": run.step,
        "train_loss": run.history[-1]["train_loss"] if run.history else float("nan"),
        "first_eval_accuracy": first["eval_accuracy"],
        "eval_accuracy": last["eval_accuracy"],
        "first_eval_answer_loss": first["eval_answer_loss"],
        "eval_answer_loss": last["eval_answer_loss"],
        "first_eval_step": first["step"],
        "eval_step": last["step"],  # can be older than "step" (run_steps, a stop)
        "export_dir": export_dir,
        "model_config": model_config,
        "params": params,
        "stopped_by_signal": run.stopped_by_signal,
        "signal": run.signal,  # the stop's SIGINT / SIGTERM (None: not stopped by a signal)
    }


def summary(result: dict[str, Any]) -> str:
    """The command line's last words: losses, accuracies and where the weights went."""
    text = (
        f"step {result['step']}: train loss {number(result['train_loss'])}; evaluated at step "
        f"{result['first_eval_step']} -> {result['eval_step']}: accuracy "
        f"{number(result['first_eval_accuracy'])} -> {number(result['eval_accuracy'])}, answer "
        f"loss {number(result['first_eval_answer_loss'])} -> {number(result['eval_answer_loss'])}"
    )
    if result["export_dir"] is not None:
        text += f"\nfine-tuned weights (Hugging Face format): {result['export_dir']}"
    return text


if __name__ == "__main__":
    cli.run_program(
        finetune,
        summary,
        config_help="Fine-tuning config file.",
        workdir_help="Directory for checkpoints, metrics.jsonl, tokenizer, hf_export.",
    )
