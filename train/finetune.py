"""Fine-tune the LLaMA of ``train.model`` on yes/no and two-choice tasks (BoolQ, WinoGrande).

``python -m train.finetune --config configs/finetune_boolq.py --workdir DIR``

Data come from LOCAL jsonl files named in the config (``config.data.train_file`` and
``config.data.eval_file``); nothing is downloaded. Two formats are understood:

* ``boolq``: ``{"question": str, "passage": str, "answer": bool}``. The prompt is
  ``"{passage}\\nQuestion: {question}?\\nAnswer:"``; the candidates are ``" yes"`` and ``" no"``.
* ``winogrande``: ``{"sentence": str with one "_", "option1": str, "option2": str,
  "answer": "1" | "2"}``. Each candidate context is the sentence up to the blank with the blank
  replaced by an option; the scored continuation is the rest of the sentence after the blank
  (the "partial scoring" of the lm-evaluation-harness).

Training minimises the cross-entropy of the correct continuation's tokens only (prompt and
padding positions get zero weight). Evaluation scores each candidate by the summed
log-likelihood of its continuation tokens and predicts the argmax; ``metrics.jsonl`` in the
workdir gets the train loss every ``log_every`` steps and the eval accuracy at step 0, every
``eval_every`` steps and at the end.

Weights: ``config.init.hf_checkpoint`` (a local Hugging Face LLaMA directory, read by
``train.hf_checkpoint.load_hf_llama``) with its tokenizer from ``config.init.tokenizer`` (a
``tokenizer.json`` or SentencePiece ``.model``; if unset, the checkpoint directory's own
``tokenizer.json`` / ``tokenizer.model``), or, when ``hf_checkpoint`` is None, a random init of
``config.model`` with a small byte-level BPE trained on the task text (tests and smoke runs).
At the end the weights are written back in Hugging Face format (``config.json`` +
``model.safetensors`` + the tokenizer file) to ``config.export.path`` (default
``WORKDIR/hf_export``), loadable by ``transformers.LlamaForCausalLM.from_pretrained``.

Sharding (one host): the step runs on ``config.mesh`` as the pre-training trainer does
(``train.sharding``): params and optimizer state (bases and low-rank moments included) carry
``NamedSharding``s from the model's logical axis names, checkpoint tensors are placed on their
shards as they are read, and the jitted step donates params and state. The recipe's batch of 1
cannot be split over ``data`` / ``fsdp``, so the default mesh is tensor parallelism over every
device (``data=1, fsdp=1, tensor=-1``), which spreads a 7B's weights, gradients and optimizer
state over the GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from train import cli, hf_checkpoint, xla_flags
from train import model as model_lib
from train import optimizer as optimizer_lib
from train import sharding as sharding_lib
from train import tokenizer as tokenizer_lib
from train.errors import ConfigError

TASKS = ("boolq", "winogrande")
# Optimizers whose ``rank`` is a subspace rank that must stay below each matrix's smaller side.
SUBSPACE_OPTIMIZERS = ("galore", "golore", "hybrid", "importance")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}


@dataclasses.dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice item: candidate ``i`` is ``contexts[i] + continuations[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int  # index of the correct candidate


# --------------------------------------------------------------------------------------------
# Data.


def boolq_prompt(passage: str, question: str) -> str:
    """The BoolQ prompt; the answer continuation is ``" yes"`` or ``" no"``."""
    return f"{passage}\nQuestion: {question.rstrip('?')}?\nAnswer:"


def boolq_example(record: dict[str, Any]) -> ChoiceExample:
    """``{"question", "passage", "answer": bool}`` -> a yes/no :class:`ChoiceExample`."""
    prompt = boolq_prompt(record["passage"], record["question"])
    answer = record["answer"]
    if isinstance(answer, str):
        answer = answer.strip().lower() in ("true", "yes", "1")
    return ChoiceExample((prompt, prompt), (" yes", " no"), 0 if answer else 1)


def winogrande_example(record: dict[str, Any]) -> ChoiceExample:
    """``{"sentence" with "_", "option1", "option2", "answer": "1"|"2"}`` -> partial scoring."""
    sentence = record["sentence"]
    blank = sentence.find("_")
    if blank < 0:
        raise ValueError(f"WinoGrande sentence has no '_' blank: {sentence!r}")
    prefix = sentence[:blank]
    continuation = " " + sentence[blank + 1 :].strip()
    contexts = (prefix + record["option1"], prefix + record["option2"])
    label = int(record["answer"]) - 1
    if label not in (0, 1):
        raise ValueError(f"WinoGrande answer must be '1' or '2', got {record['answer']!r}")
    return ChoiceExample(contexts, (continuation, continuation), label)


_PARSERS: dict[str, Callable[[dict[str, Any]], ChoiceExample]] = {
    "boolq": boolq_example,
    "winogrande": winogrande_example,
}


def resolve_path(value: str | None, field: str) -> pathlib.Path:
    """A config path that must name an existing file; errors name the config field."""
    if not value:
        raise ValueError(
            f"{field} is not set: point it at a local file, e.g. --{field}=/path/to/file"
        )
    path = pathlib.Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{field}={value!r} does not exist")
    return path


def load_examples(
    path: str | None, task: str, field: str, limit: int | None = None
) -> list[ChoiceExample]:
    """Reads a jsonl file of ``task`` records (``field`` names the config entry in errors)."""
    if task not in TASKS:
        raise ValueError(f"config.data.task must be one of {TASKS}, got {task!r}")
    file = resolve_path(path, field)
    parse = _PARSERS[task]
    examples = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(parse(json.loads(line)))
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{field}: {file}:{lineno} is not a {task} record: {e}") from e
            if limit is not None and len(examples) >= limit:
                break
    if not examples:
        raise ValueError(f"{field}: {file} holds no examples")
    return examples


def bos_id(tokenizer: Any) -> int:
    """The id prepended to every sequence: the tokenizer's BOS, else its EOS."""
    sp = getattr(tokenizer, "_sp", None)  # SentencePieceTokenizer
    if sp is not None and sp.bos_id() >= 0:
        return int(sp.bos_id())
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        for token in BOS_CANDIDATES:
            token_id = hf.token_to_id(token)
            if token_id is not None:
                return int(token_id)
    return int(tokenizer.eos_id)


def encode_choice(
    tokenizer: Any, context: str, continuation: str, seq_len: int, *, bos: int, pad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One ``context + continuation`` as next-token ``(inputs, targets, weights)`` of ``seq_len``.

    The continuation's tokens are those of the joint encoding past the context's encoding (as in
    the lm-evaluation-harness, so word-boundary merges match what the model sees). ``weights``
    is 1 exactly at the positions whose target is a continuation token. Too long sequences lose
    context tokens from the left (the start of the passage), keeping the leading BOS; padding
    goes on the right with weight 0.
    """
    whole, ctx = tokenizer.encode_batch([context + continuation, context])
    common = 0
    while common < min(len(whole), len(ctx)) and whole[common] == ctx[common]:
        common += 1
    if common == len(whole):  # Continuation merged into the context: score the last token.
        common = max(len(whole) - 1, 0)
    ctx_ids, cont_ids = list(whole[:common]), list(whole[common:])
    cont_ids = cont_ids[:seq_len]
    room = seq_len + 1 - 1 - len(cont_ids)  # +1: inputs/targets shift; -1: BOS
    ctx_ids = ctx_ids[max(len(ctx_ids) - room, 0) :] if room > 0 else []
    tokens = [bos, *ctx_ids, *cont_ids]
    inputs = np.full(seq_len, pad, np.int32)
    targets = np.full(seq_len, pad, np.int32)
    weights = np.zeros(seq_len, np.float32)
    n = len(tokens) - 1
    inputs[:n] = tokens[:-1]
    targets[:n] = tokens[1:]
    weights[n - len(cont_ids) : n] = 1.0
    return inputs, targets, weights


def encode_examples(
    tokenizer: Any, examples: Sequence[ChoiceExample], seq_len: int, *, correct_only: bool
) -> dict[str, np.ndarray]:
    """Stacks encoded candidates: ``inputs/targets/weights [N, seq_len]``, ``example``, ``choice``.

    ``correct_only`` keeps only each example's correct candidate (the training set).
    """
    bos, pad = bos_id(tokenizer), int(tokenizer.eos_id)
    rows: dict[str, list] = {k: [] for k in ("inputs", "targets", "weights", "example", "choice")}
    for i, ex in enumerate(examples):
        choices = [ex.label] if correct_only else range(len(ex.contexts))
        for c in choices:
            x, y, w = encode_choice(
                tokenizer, ex.contexts[c], ex.continuations[c], seq_len, bos=bos, pad=pad
            )
            for key, value in zip(rows, (x, y, w, i, c), strict=True):
                rows[key].append(value)
    return {k: np.asarray(v) for k, v in rows.items()}


# --------------------------------------------------------------------------------------------
# Model, tokenizer and optimizer.


def answer_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Cross-entropy averaged over answer tokens only (``weights`` 0 on prompt and padding)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def continuation_logprob(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-row summed log-likelihood of the weighted (continuation) tokens: ``[B]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * weights, axis=-1)


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


def task_texts(examples: Sequence[ChoiceExample]) -> list[str]:
    """Every candidate's full text (the random-init BPE is trained on these)."""
    return [c + k for ex in examples for c, k in zip(ex.contexts, ex.continuations, strict=True)]


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

    ``train_step`` and ``score`` take host (numpy) batches; ``train_step`` donates its params
    and optimizer state (the step updates them in place).
    """

    model: model_lib.LlamaForCausalLM
    tx: optax.GradientTransformation
    mesh: Mesh
    param_sharding: Any
    opt_sharding: Any
    batch_sharding: NamedSharding
    param_shapes: Any  # ShapeDtypeStructs
    opt_shapes: Any
    init_params: Callable[[jax.Array], Any]
    init_opt_state: Callable[[Any], Any]
    train_step: Callable[[Any, Any, dict], tuple[Any, Any, jax.Array]]
    score: Callable[[Any, dict], jax.Array]
    # The jitted step itself (device batches), e.g. to lower and compile ahead of time.
    jit_train_step: Any

    def lower_train_step(self, batch_size: int, seq_len: int) -> Any:
        """The train step lowered for abstract, sharded inputs (``.compile()`` it)."""
        batch = {
            k: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=self.batch_sharding)
            for k, dtype in BATCH_DTYPES.items()
        }
        params = _with_shardings(self.param_shapes, self.param_sharding)
        opt_state = _with_shardings(self.opt_shapes, self.opt_sharding)
        with mesh_context(self.mesh):
            return self.jit_train_step.lower(params, opt_state, batch)


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings (abstract inputs for ``lower``)."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
    """The mesh and logical-axis rules the model's sharding constraints resolve against."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.LOGICAL_RULES):
        yield


def _in_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """Calls ``fn`` inside :func:`mesh_context` (needed when it traces)."""

    def wrapped(*args):
        with mesh_context(mesh):
            return fn(*args)

    return wrapped


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

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return answer_loss(logits, batch["targets"], batch["weights"])

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def score(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return continuation_logprob(logits, batch["targets"], batch["weights"])

    jit_init = jax.jit(
        lambda key: nn.unbox(model.init(key, dummy)["params"]), out_shardings=param_sharding
    )
    jit_opt_init = jax.jit(tx.init, in_shardings=(param_sharding,), out_shardings=opt_sharding)
    jit_train = jax.jit(
        train_step,
        in_shardings=(param_sharding, opt_sharding, batch_sharding),
        out_shardings=(param_sharding, opt_sharding, replicated),
        donate_argnums=(0, 1),  # no second copy of params and state
    )
    jit_score = jax.jit(
        score, in_shardings=(param_sharding, batch_sharding), out_shardings=replicated
    )
    # They trace on first call: under the mesh, where the logical constraints resolve.
    train, scorer = _in_mesh(mesh, jit_train), _in_mesh(mesh, jit_score)

    def put(batch: dict) -> dict:
        return jax.device_put({k: np.asarray(v) for k, v in batch.items()}, batch_sharding)

    return FineTuner(
        model=model,
        tx=tx,
        mesh=mesh,
        param_sharding=param_sharding,
        opt_sharding=opt_sharding,
        batch_sharding=batch_sharding,
        param_shapes=param_shapes,
        opt_shapes=opt_shapes,
        init_params=_in_mesh(mesh, jit_init),
        init_opt_state=_in_mesh(mesh, jit_opt_init),
        train_step=lambda params, opt_state, batch: train(params, opt_state, put(batch)),
        score=lambda params, batch: scorer(params, put(batch)),
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
# Evaluation.


def candidate_scores(
    score: Callable[[Any, dict], jax.Array],
    params: Any,
    encoded: dict[str, np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Each candidate row's summed continuation log-likelihood, ``[rows]`` (float64)."""
    n = len(encoded["inputs"])
    scores = np.empty(n, np.float64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = {}
        for k in ("inputs", "targets", "weights"):
            chunk = encoded[k][start:stop]
            if stop - start < batch_size:  # Pad the last batch to keep one compiled shape.
                pad = np.zeros((batch_size - (stop - start), *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            batch[k] = chunk
        scores[start:stop] = np.asarray(score(params, batch))[: stop - start]
    return scores


def accuracy_of(
    scores: np.ndarray, encoded: dict[str, np.ndarray], labels: np.ndarray
) -> tuple[float, np.ndarray]:
    """Accuracy of the argmax-log-likelihood candidate; returns ``(accuracy, predictions)``."""
    num_choices = int(encoded["choice"].max()) + 1
    table = np.full((len(labels), num_choices), -np.inf)
    table[encoded["example"], encoded["choice"]] = scores
    predictions = table.argmax(axis=1)
    return float(np.mean(predictions == labels)), predictions


def answer_loss_of(scores: np.ndarray, encoded: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """The correct answers' cross-entropy per answer token (the training loss, on eval data)."""
    correct = encoded["choice"] == labels[encoded["example"]]
    tokens = encoded["weights"][correct].sum()
    return float(-scores[correct].sum() / max(tokens, 1.0))


def evaluate(
    score: Callable[[Any, dict], jax.Array],
    params: Any,
    encoded: dict[str, np.ndarray],
    labels: np.ndarray,
    batch_size: int,
) -> tuple[float, np.ndarray]:
    """Accuracy of the argmax-log-likelihood candidate; returns ``(accuracy, predictions)``."""
    return accuracy_of(candidate_scores(score, params, encoded, batch_size), encoded, labels)


# --------------------------------------------------------------------------------------------
# The run.


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked before any file is read (one-line ConfigErrors)."""
    for name in (
        "seq_len",
        "batch_size",
        "eval_batch_size",
        "num_steps",
        "log_every",
        "eval_every",
    ):
        if int(config[name]) <= 0:
            raise ConfigError(f"config.{name}={config[name]!r}: must be > 0")
    if config.data.task not in TASKS:
        raise ConfigError(f"config.data.task must be one of {TASKS}, got {config.data.task!r}")
    if config.export.dtype not in EXPORT_DTYPES:
        raise ConfigError(
            f"config.export.dtype must be one of {EXPORT_DTYPES}, got {config.export.dtype!r}"
        )
    optimizer_lib.validate(config.optimizer, num_steps=config.num_steps)


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
    """Fine-tunes and evaluates on ``config.mesh`` over ``devices`` (default: all).

    Writes ``metrics.jsonl`` to ``workdir`` and, with ``config.export.enabled``, the weights in
    Hugging Face format (:func:`export_finetuned`). Returns ``step``, ``train_loss``,
    ``first_eval_accuracy``, ``eval_accuracy``, ``first_eval_answer_loss``,
    ``eval_answer_loss``, ``export_dir`` (or None), ``model_config`` and the final ``params``.
    """
    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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
    params = initial_params(source, ft, config.seed)
    opt_state = ft.init_opt_state(params)

    # Process 0 alone writes the metrics (every process computes the same records).
    metrics_file = (workdir / "metrics.jsonl").open("a") if jax.process_index() == 0 else None

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        logging.info("%s", record)

    def run_eval(step: int) -> tuple[float, float]:
        scores = candidate_scores(ft.score, params, eval_data, config.eval_batch_size)
        accuracy, _ = accuracy_of(scores, eval_data, eval_labels)
        loss = answer_loss_of(scores, eval_data, eval_labels)
        log(
            {
                "step": step,
                "eval_accuracy": accuracy,
                "eval_answer_loss": loss,
                "eval_examples": len(eval_labels),
            }
        )
        return accuracy, loss

    first_accuracy, first_eval_loss = run_eval(0)
    accuracy, eval_loss = first_accuracy, first_eval_loss
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(train_data["inputs"]))
    cursor = 0
    losses: list[float] = []
    loss = float("nan")
    start = time.time()
    for step in range(1, config.num_steps + 1):
        idx = []
        while len(idx) < config.batch_size:  # Epochs in a fresh random order each time.
            if cursor == len(order):
                order, cursor = rng.permutation(len(order)), 0
            take = min(config.batch_size - len(idx), len(order) - cursor)
            idx.extend(order[cursor : cursor + take])
            cursor += take
        batch = {k: train_data[k][np.asarray(idx)] for k in ("inputs", "targets", "weights")}
        params, opt_state, step_loss = ft.train_step(params, opt_state, batch)
        losses.append(float(step_loss))
        if step % config.log_every == 0 or step == config.num_steps:
            loss = float(np.mean(losses))
            log({"step": step, "train_loss": loss, "elapsed_s": round(time.time() - start, 2)})
            losses = []
        if step % config.eval_every == 0 or step == config.num_steps:
            accuracy, eval_loss = run_eval(step)
    if metrics_file is not None:
        metrics_file.close()
    del opt_state  # Free the optimizer state before the host copy of the export.
    export_dir = export_finetuned(config, source, params, workdir)
    return {
        "step": config.num_steps,
        "train_loss": loss,
        "first_eval_accuracy": first_accuracy,
        "eval_accuracy": accuracy,
        "first_eval_answer_loss": first_eval_loss,
        "eval_answer_loss": eval_loss,
        "export_dir": export_dir,
        "model_config": model_config,
        "params": params,
    }


def main(argv: Sequence[str]) -> None:
    """absl entry point (flags: --config, --workdir)."""
    from absl import app
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.INFO)
    xla_flags.apply_defaults()  # before the first device is touched
    with cli.one_line_errors():
        result = finetune(cli.loaded_config(_FLAGS), _FLAGS.workdir)
    print(
        f"step {result['step']}: train loss {result['train_loss']:.4f}, eval accuracy "
        f"{result['first_eval_accuracy']:.4f} -> {result['eval_accuracy']:.4f}, eval answer "
        f"loss {result['first_eval_answer_loss']:.4f} -> {result['eval_answer_loss']:.4f}"
    )
    if result["export_dir"] is not None:
        print(f"fine-tuned weights (Hugging Face format): {result['export_dir']}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    cli.register_list_parser()
    _FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl, tokenizer, hf_export.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
