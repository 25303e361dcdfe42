"""Multiple-choice tasks for fine-tuning (BoolQ, WinoGrande): read, encode, sample, score.

Two formats of local jsonl files are understood:

* ``boolq``: ``{"question": str, "passage": str, "answer": bool}``. The prompt is
  ``"{passage}\\nQuestion: {question}?\\nAnswer:"``; the candidates are ``" yes"`` and ``" no"``.
* ``winogrande``: ``{"sentence": str with one "_", "option1": str, "option2": str,
  "answer": "1" | "2"}``. Each candidate context is the sentence up to the blank with the blank
  replaced by an option; the scored continuation is the rest of the sentence after the blank
  (the "partial scoring" of the lm-evaluation-harness).

Each candidate is encoded as next-token ``(inputs, targets, weights)`` with weight 1 on its
continuation's tokens only; evaluation scores each candidate by the summed log-likelihood of
its continuation and predicts the argmax.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("boolq", "winogrande")
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


def continuation_logprob(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Per-row summed log-likelihood of the weighted (continuation) tokens: ``[B]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_logp * weights, axis=-1)


def task_texts(examples: Sequence[ChoiceExample]) -> list[str]:
    """Every candidate's full text (the random-init BPE is trained on these)."""
    return [c + k for ex in examples for c, k in zip(ex.contexts, ex.continuations, strict=True)]


def candidate_scores(
    score: Callable[[Any, dict], jax.Array],
    params: Any,
    encoded: dict[str, np.ndarray],
    batch_size: int,
) -> np.ndarray:
    """Each candidate row's summed continuation log-likelihood, ``[rows]`` (float64).

    ``score`` gets host batches of ``batch_size`` rows (see :meth:`FineTuner.put`)."""
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


class EpochSampler:
    """The row indices of each train batch: epochs in a fresh seeded random order each time.

    Its position (``get_state`` / ``set_state``, JSON) is saved with each checkpoint, so a
    resumed run sees the batches the uninterrupted run would have seen.
    """

    def __init__(self, rows: int, batch_size: int, seed: int) -> None:
        self._rows, self._batch_size, self._seed = rows, batch_size, seed
        self.set_state({"epochs": 1, "cursor": 0})

    def get_state(self) -> dict[str, int]:
        return {"epochs": self._epochs, "cursor": self._cursor}

    def set_state(self, state: dict[str, int]) -> None:
        self._rng = np.random.default_rng(self._seed)
        for _ in range(state["epochs"]):
            self._order = self._rng.permutation(self._rows)
        self._epochs, self._cursor = state["epochs"], state["cursor"]

    def __next__(self) -> np.ndarray:
        idx: list[int] = []
        while len(idx) < self._batch_size:
            if self._cursor == self._rows:
                self._order, self._cursor = self._rng.permutation(self._rows), 0
                self._epochs += 1
            take = min(self._batch_size - len(idx), self._rows - self._cursor)
            idx.extend(self._order[self._cursor : self._cursor + take])
            self._cursor += take
        return np.asarray(idx)
