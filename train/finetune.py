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

The step runs on one device (plain ``jax.jit``; the model's logical sharding constraints are
no-ops without a mesh).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from train import model as model_lib
from train import optimizer as optimizer_lib
from train import tokenizer as tokenizer_lib

TASKS = ("boolq", "winogrande")
# Optimizers whose ``rank`` is a subspace rank that must stay below each matrix's smaller side.
SUBSPACE_OPTIMIZERS = ("galore", "golore", "hybrid", "importance")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>")


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
        values["rank"] = subspace_rank_rule(opt.rank)
    return ml_collections.ConfigDict(values)


def task_texts(examples: Sequence[ChoiceExample]) -> list[str]:
    """Every candidate's full text (the random-init BPE is trained on these)."""
    return [c + k for ex in examples for c, k in zip(ex.contexts, ex.continuations, strict=True)]


def load_weights_and_tokenizer(
    config: ml_collections.ConfigDict, texts: Callable[[], list[str]], workdir: pathlib.Path
) -> tuple[model_lib.LlamaConfig, Any, Any]:
    """``(model config, params or None for a random init, tokenizer)`` as ``config.init`` says."""
    init = config.init
    if init.hf_checkpoint:
        from train.hf_checkpoint import load_hf_llama

        ckpt = resolve_path(init.hf_checkpoint, "config.init.hf_checkpoint")
        tok_path = init.tokenizer
        if not tok_path:
            found = [ckpt / n for n in ("tokenizer.json", "tokenizer.model") if (ckpt / n).exists()]
            if not found:
                raise ValueError(
                    "config.init.tokenizer is not set and the checkpoint directory "
                    f"{str(ckpt)!r} has no tokenizer.json / tokenizer.model"
                )
            tok_path = str(found[0])
        tokenizer = tokenizer_lib.load_tokenizer(
            resolve_path(tok_path, "config.init.tokenizer"), eos_token=init.get("eos_token")
        )
        model_config, params = load_hf_llama(
            ckpt,
            dtype=config.model.dtype,
            param_dtype=config.model.param_dtype,
            remat=config.model.remat,
        )
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(
                f"tokenizer {tok_path} has {tokenizer.vocab_size} ids but the checkpoint's "
                f"vocabulary is {model_config.vocab_size}"
            )
        if config.seq_len > model_config.max_seq_len:
            model_config = model_config.replace(max_seq_len=config.seq_len)
        return model_config, params, tokenizer
    tokenizer = tokenizer_lib.train_bpe(texts(), config.init.bpe_vocab_size)
    tokenizer.save(workdir / "tokenizer.json")
    model_dict = config.model.to_dict()
    model_dict["vocab_size"] = tokenizer.vocab_size
    model_dict["max_seq_len"] = max(model_dict["max_seq_len"], config.seq_len)
    return model_lib.LlamaConfig.from_dict(model_dict), None, tokenizer


# --------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class FineTuner:
    """Compiled pieces of one fine-tuning run."""

    model: model_lib.LlamaForCausalLM
    tx: optax.GradientTransformation
    train_step: Callable[[Any, Any, dict], tuple[Any, Any, jax.Array]]
    score: Callable[[Any, dict], jax.Array]


def build_finetuner(
    model_config: model_lib.LlamaConfig, opt: ml_collections.ConfigDict, num_steps: int
) -> FineTuner:
    """The model, optimizer and the jitted train step / candidate scorer."""
    model = model_lib.LlamaForCausalLM(model_config)
    tx = optimizer_lib.build_optimizer(optimizer_block(opt), num_steps)

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return answer_loss(logits, batch["targets"], batch["weights"])

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def score(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return continuation_logprob(logits, batch["targets"], batch["weights"])

    return FineTuner(model, tx, train_step, score)


def evaluate(
    score: Callable[[Any, dict], jax.Array],
    params: Any,
    encoded: dict[str, np.ndarray],
    labels: np.ndarray,
    batch_size: int,
) -> tuple[float, np.ndarray]:
    """Accuracy of the argmax-log-likelihood candidate; returns ``(accuracy, predictions)``."""
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
    num_examples = len(labels)
    num_choices = int(encoded["choice"].max()) + 1
    table = np.full((num_examples, num_choices), -np.inf)
    table[encoded["example"], encoded["choice"]] = scores
    predictions = table.argmax(axis=1)
    return float(np.mean(predictions == labels)), predictions


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks what can be checked before any file is read."""
    for name in ("seq_len", "batch_size", "num_steps", "log_every", "eval_every"):
        if int(config[name]) <= 0:
            raise ValueError(f"config.{name} must be > 0, got {config[name]}")
    if config.data.task not in TASKS:
        raise ValueError(f"config.data.task must be one of {TASKS}, got {config.data.task!r}")
    optimizer_lib.validate(config.optimizer)


def finetune(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Fine-tunes and evaluates; writes ``metrics.jsonl`` to ``workdir``.

    Returns ``{'step', 'train_loss', 'first_eval_accuracy', 'eval_accuracy'}``.
    """
    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = config.data
    train_examples = load_examples(
        data.train_file, data.task, "config.data.train_file", data.get("max_train_examples")
    )
    eval_examples = load_examples(
        data.eval_file, data.task, "config.data.eval_file", data.get("max_eval_examples")
    )
    model_config, params, tokenizer = load_weights_and_tokenizer(
        config, lambda: task_texts(train_examples), workdir
    )
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"config.seq_len={config.seq_len} exceeds the model's max_seq_len="
            f"{model_config.max_seq_len}"
        )
    train_data = encode_examples(tokenizer, train_examples, config.seq_len, correct_only=True)
    eval_data = encode_examples(tokenizer, eval_examples, config.seq_len, correct_only=False)
    eval_labels = np.asarray([ex.label for ex in eval_examples])

    ft = build_finetuner(model_config, config.optimizer, config.num_steps)
    if params is None:
        dummy = jnp.zeros((1, config.seq_len), jnp.int32)
        params = nn.unbox(jax.jit(ft.model.init)(jax.random.key(config.seed), dummy)["params"])
    opt_state = jax.jit(ft.tx.init)(params)

    metrics_file = (workdir / "metrics.jsonl").open("a")

    def log(record: dict[str, Any]) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        logging.info("%s", record)

    def run_eval(step: int) -> float:
        accuracy, _ = evaluate(ft.score, params, eval_data, eval_labels, config.eval_batch_size)
        log({"step": step, "eval_accuracy": accuracy, "eval_examples": len(eval_labels)})
        return accuracy

    first_accuracy = run_eval(0)
    accuracy = first_accuracy
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
            accuracy = run_eval(step)
    metrics_file.close()
    return {
        "step": config.num_steps,
        "train_loss": loss,
        "first_eval_accuracy": first_accuracy,
        "eval_accuracy": accuracy,
    }


def main(argv: Sequence[str]) -> None:
    """absl entry point (flags: --config, --workdir)."""
    from absl import app
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    absl_logging.set_verbosity(absl_logging.INFO)
    result = finetune(_FLAGS.config, _FLAGS.workdir)
    print(
        f"step {result['step']}: train loss {result['train_loss']:.4f}, eval accuracy "
        f"{result['first_eval_accuracy']:.4f} -> {result['eval_accuracy']:.4f}"
    )


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _FLAGS = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl and the tokenizer.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
