"""Language-model data pipeline: corpus -> tokenizer -> packed, shuffled, resumable batches.

Entry point: ``build_datasets(data_config, seq_len=..., global_batch_size=..., seed=...)``.

* Documents come from ``train.corpus`` (the offline default corpus, local files or TFDS/C4).
* Each document goes to the held-out split when a hash of its text falls below
  ``eval_fraction``, so no document (nor any exact duplicate of it) is in both splits.
* The tokenized documents of each split are concatenated, each followed by EOS, into one token
  stream cached as ``.npy`` (uint16 when the vocabulary fits) under the cache directory, so a
  second run with the same corpus and tokenizer skips tokenization.
* The stream is cut into sequences of ``seq_len + 1`` tokens (the remainder is dropped);
  ``inputs`` are the first ``seq_len`` tokens and ``targets`` the last ``seq_len``.
* Training order: epoch ``e`` visits the sequences in a permutation seeded by ``(seed, e)``,
  ``global_batch_size`` at a time (a partial last batch is dropped). The iterator's position
  is two ints, so a restored run yields exactly the batches of an uninterrupted one.
* With several hosts each yields its contiguous ``1 / process_count`` slice of every global
  batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ml_collections
import numpy as np

from train import corpus as corpus_lib
from train import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
SOURCES = ("default", "files", "tfds")
# Bump when the token-stream layout changes, so stale caches are not reused.
_STREAM_VERSION = "stream-v1"
# Documents tokenized per call: bounds memory while letting the Rust encoder use all cores.
_ENCODE_CHUNK = 4096


def default_data_config() -> ml_collections.ConfigDict:
    """The data section of a training config, with every supported field."""
    return ml_collections.ConfigDict(
        {
            # 'default' (offline GCIDE dictionary corpus), 'files' (paths) or 'tfds' (e.g. C4).
            "source": "default",
            # Files or directories of .txt / .jsonl / .parquet (source='files').
            "paths": [],
            # JSON field / parquet column / TFDS feature holding the text.
            "text_field": "text",
            # .txt handling: 'file' (one document per file) or 'blank_lines' (per paragraph).
            "txt_split": "file",
            # TFDS dataset, split and prepared data directory (source='tfds').
            "tfds_name": "c4/en",
            "tfds_split": "train",
            "data_dir": ml_collections.FieldReference(None, field_type=str),
            # 'bpe' trains a byte-level BPE on the corpus; or a tokenizer.json / .model path.
            "tokenizer": "bpe",
            "vocab_size": 8192,
            # Megabytes of corpus text the BPE trainer reads (keeps training to seconds).
            "tokenizer_train_mb": 8.0,
            # End-of-sequence token of a user tokenizer.json (None: detect a usual one).
            "eos_token": ml_collections.FieldReference(None, field_type=str),
            # Fraction of documents held out for evaluation.
            "eval_fraction": 0.01,
            # Cache root for tokenizers and token streams (None: ~/.cache/golore_jax).
            "cache_dir": ml_collections.FieldReference(None, field_type=str),
            # Read at most this many megabytes of corpus text (None: all of it).
            "max_corpus_mb": ml_collections.FieldReference(None, field_type=float),
        }
    )


def check_vocab(tokenizer_vocab: int, model_vocab: int) -> None:
    """Raises ValueError when the tokenizer can emit ids the model's embedding cannot hold."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"Tokenizer vocabulary size {tokenizer_vocab} exceeds the model vocab_size "
            f"{model_vocab}: set the model's vocab_size to at least {tokenizer_vocab}"
        )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """Reads an optional config field, so partial configs work too."""
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None and default is not None else value


# --------------------------------------------------------------------------- corpus selection


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """A corpus: how to read its documents and a string identifying its content."""

    identity: str
    description: str
    documents: Callable[[float | None], Iterator[str]]  # max_mb -> documents


def corpus_spec(cfg: Any) -> CorpusSpec:
    """Validates the corpus part of a data config and returns how to read it.

    Raises:
      ValueError: unknown ``source``; FileNotFoundError: a missing data path.
    """
    source = _get(cfg, "source", "default")
    max_mb = _get(cfg, "max_corpus_mb")
    text_field = _get(cfg, "text_field", "text")

    def limited(read: Callable[[float | None], Iterator[str]]) -> Callable:
        # The corpus limit and the tokenizer-training limit both apply; the smaller wins.
        def documents(mb: float | None) -> Iterator[str]:
            limit = min((m for m in (mb, max_mb) if m is not None), default=None)
            return read(limit)

        return documents

    if source == "default":
        files = corpus_lib.default_corpus_files()  # Fails early if the package is missing.
        version = corpus_lib.default_corpus_version()
        return CorpusSpec(
            identity=f"gcide-{version}|max_mb={max_mb}",
            description=(
                f"GCIDE dictionary corpus ({corpus_lib.DEFAULT_CORPUS_PACKAGE} {version}, "
                f"{len(files)} files)"
            ),
            documents=limited(lambda mb: corpus_lib.default_corpus_documents(mb)),
        )
    if source == "files":
        paths = list(_get(cfg, "paths", []) or [])
        files = corpus_lib.expand_paths(paths)
        txt_split = _get(cfg, "txt_split", "file")
        if txt_split not in corpus_lib.TXT_SPLITS:
            raise ValueError(f"Unknown txt_split {txt_split!r}; expected {corpus_lib.TXT_SPLITS}")
        fingerprint = corpus_lib.files_fingerprint(files)
        return CorpusSpec(
            identity=f"files-{fingerprint}|{text_field}|{txt_split}|max_mb={max_mb}",
            description=f"{len(files)} local file(s) starting with {files[0]}",
            documents=limited(
                lambda mb: corpus_lib.file_documents(
                    files, text_field=text_field, txt_split=txt_split, max_mb=mb
                )
            ),
        )
    if source == "tfds":
        name = _get(cfg, "tfds_name", "c4/en")
        split = _get(cfg, "tfds_split", "train")
        data_dir = _get(cfg, "data_dir")
        if data_dir is not None and not pathlib.Path(data_dir).expanduser().exists():
            raise FileNotFoundError(f"TFDS data_dir does not exist: {data_dir}")
        return CorpusSpec(
            identity=f"tfds-{name}|{split}|{data_dir}|{text_field}|max_mb={max_mb}",
            description=f"TFDS {name} split {split!r} from {data_dir}",
            documents=limited(
                lambda mb: corpus_lib.tfds_documents(
                    name, data_dir=data_dir, split=split, text_field=text_field, max_mb=mb
                )
            ),
        )
    raise ValueError(f"Unknown data source {source!r}; expected one of {SOURCES}")


def cache_root(cfg: Any) -> pathlib.Path:
    """The cache directory of a data config (default ``~/.cache/golore_jax``)."""
    raw = _get(cfg, "cache_dir")
    return pathlib.Path(raw).expanduser() if raw else pathlib.Path.home() / ".cache" / "golore_jax"


def build_tokenizer(cfg: Any, spec: CorpusSpec) -> tokenizer_lib.Tokenizer:
    """Loads the configured tokenizer file, or the cached/freshly trained corpus BPE."""
    name = _get(cfg, "tokenizer", "bpe")
    if name != "bpe":
        return tokenizer_lib.load_tokenizer(name, eos_token=_get(cfg, "eos_token"))
    vocab_size = _get(cfg, "vocab_size", 8192)
    train_mb = float(_get(cfg, "tokenizer_train_mb", 8.0))
    _check_positive(vocab_size=vocab_size)
    return tokenizer_lib.load_or_train(
        cache_dir=cache_root(cfg),
        corpus_id=spec.identity,
        vocab_size=vocab_size,
        train_mb=train_mb,
        texts=lambda: spec.documents(train_mb),
    )


# --------------------------------------------------------------------------- token streams


def _doc_hash(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Whether a document is held out: a hash of its text, mapped to [0, 1), < eval_fraction."""
    return _doc_hash(text) / 2.0**64 < eval_fraction


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_to_streams(
    documents: Iterable[str], tok: tokenizer_lib.Tokenizer, eval_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes documents into (train, eval) streams, each document followed by EOS.

    If no document hashes into the held-out split (tiny corpora), the train document with the
    smallest hash is moved there, so evaluation always has data when ``eval_fraction > 0``.
    """
    dtype = _token_dtype(tok.vocab_size)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    smallest: tuple[int, int] | None = None  # (hash, index into train parts)

    def flush(chunk: list[str]) -> None:
        nonlocal smallest
        for text, ids in zip(chunk, tok.encode_batch(chunk), strict=True):
            if not ids:
                continue
            h = _doc_hash(text)
            held_out = h / 2.0**64 < eval_fraction
            arr = np.asarray([*ids, tok.eos_id], dtype=dtype)
            if not held_out and eval_fraction > 0 and (smallest is None or h < smallest[0]):
                smallest = (h, len(parts[False]))
            parts[held_out].append(arr)

    chunk: list[str] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == _ENCODE_CHUNK:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    if eval_fraction > 0 and not parts[True] and smallest is not None and len(parts[False]) > 1:
        parts[True].append(parts[False].pop(smallest[1]))

    def concat(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays) if arrays else np.zeros((0,), dtype)

    return concat(parts[False]), concat(parts[True])


def _atomic_save(path: pathlib.Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def load_or_tokenize(
    cfg: Any, spec: CorpusSpec, tok: tokenizer_lib.Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the (train, eval) token streams, from the cache when present (memory-mapped)."""
    eval_fraction = float(_get(cfg, "eval_fraction", 0.01))
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    key = hashlib.sha256(
        f"{_STREAM_VERSION}|{spec.identity}|{tok.identity}|{eval_fraction}".encode()
    ).hexdigest()[:20]
    base = cache_root(cfg) / "tokens"
    train_path, eval_path = base / f"{key}.train.npy", base / f"{key}.eval.npy"
    if train_path.is_file() and eval_path.is_file():
        return np.load(train_path, mmap_mode="r"), np.load(eval_path, mmap_mode="r")
    train, held_out = tokenize_to_streams(spec.documents(None), tok, eval_fraction)
    if train.size == 0:
        raise ValueError(f"Empty corpus: no tokens after tokenizing {spec.description}")
    _atomic_save(eval_path, held_out)
    _atomic_save(train_path, train)  # Written last: its presence marks a complete cache entry.
    return train, held_out


# --------------------------------------------------------------------------- packing/batching


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Views a token stream as [num_sequences, seq_len + 1], dropping the remainder."""
    n = stream.shape[0] // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def _to_batch(rows: np.ndarray) -> Batch:
    rows = np.asarray(rows, dtype=np.int32)
    return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


def host_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch that belong to this host (contiguous, equal parts)."""
    _check_positive(global_batch_size=global_batch_size, process_count=process_count)
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by "
            f"process_count {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_host = global_batch_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class TrainIterator(Iterator[Batch]):
    """Endless, resumable iterator over shuffled training batches.

    The position is ``{"epoch": e, "index": i}``: the next batch is batch ``i`` of epoch ``e``.
    Epoch ``e`` uses the permutation of sequences seeded by ``(seed, e)``, so the batch at any
    position depends only on (data, seed, position), never on how the iterator got there.
    """

    def __init__(
        self,
        sequences: np.ndarray,
        *,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        start_step: int = 0,
    ) -> None:
        self._seqs = sequences
        self._batch = global_batch_size
        self._seed = int(seed)
        self._slice = host_slice(global_batch_size, process_index, process_count)
        self.batches_per_epoch = sequences.shape[0] // global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"Too little training data: {sequences.shape[0]} sequences cannot fill one "
                f"global batch of {global_batch_size}"
            )
        self._perm_epoch = -1
        self._perm = np.zeros((0,), np.int64)
        self.set_state(self.state_at_step(start_step))

    def state_at_step(self, step: int) -> dict[str, int]:
        """The state of an iterator that has already yielded ``step`` batches."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return {"epoch": step // self.batches_per_epoch, "index": step % self.batches_per_epoch}

    def get_state(self) -> dict[str, int]:
        """The position as a small dict of ints (store it in the checkpoint)."""
        return {"epoch": self._epoch, "index": self._index}

    def set_state(self, state: dict[str, int]) -> None:
        """Moves to a position returned by ``get_state`` or ``state_at_step``."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(
                f"Invalid data iterator state {dict(state)}: need epoch >= 0 and "
                f"0 <= index < {self.batches_per_epoch}"
            )
        self._epoch, self._index = epoch, index

    @property
    def step(self) -> int:
        """Number of batches yielded so far (counting from the start of epoch 0)."""
        return self._epoch * self.batches_per_epoch + self._index

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self._seqs.shape[0]), epoch
        return self._perm

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        perm = self._permutation(self._epoch)
        start = self._index * self._batch
        rows = perm[start : start + self._batch][self._slice]
        # Sorted reads are faster on a memory-mapped stream; the original order is restored.
        order = np.argsort(rows)
        gathered = np.empty((rows.shape[0], self._seqs.shape[1]), self._seqs.dtype)
        gathered[order] = self._seqs[rows[order]]
        self._index += 1
        if self._index == self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return _to_batch(gathered)


@dataclasses.dataclass
class Datasets:
    """What the trainer gets from ``build_datasets``."""

    tokenizer: tokenizer_lib.Tokenizer
    vocab_size: int
    train: TrainIterator
    eval_sequences: np.ndarray  # [num_eval_sequences, seq_len + 1], in stream order
    global_batch_size: int
    process_slice: slice
    num_train_tokens: int
    num_eval_tokens: int
    description: str

    @property
    def num_eval_batches(self) -> int:
        """How many full global eval batches the held-out split holds."""
        return self.eval_sequences.shape[0] // self.global_batch_size

    def eval_batches(self, n: int | None = None) -> list[Batch]:
        """The first ``n`` held-out batches (all when None), the same on every call and run.

        Raises ValueError when the held-out split cannot fill one global batch; returns fewer
        than ``n`` batches when it cannot fill ``n``.
        """
        if self.num_eval_batches == 0:
            raise ValueError(
                f"Too little held-out data: {self.eval_sequences.shape[0]} eval sequences cannot "
                f"fill one global batch of {self.global_batch_size}; raise data.eval_fraction"
            )
        count = self.num_eval_batches if n is None else min(n, self.num_eval_batches)
        b = self.global_batch_size
        return [
            _to_batch(self.eval_sequences[i * b : (i + 1) * b][self.process_slice])
            for i in range(count)
        ]


def build_datasets(
    data_config: Any,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    model_vocab_size: int | None = None,
) -> Datasets:
    """Builds tokenizer, training iterator and held-out batches from a data config.

    Args:
      data_config: a ConfigDict shaped like ``default_data_config()``.
      seq_len: tokens per example (each packed sequence holds ``seq_len + 1``).
      global_batch_size: examples per step over all hosts.
      seed: shuffling seed (epoch ``e`` is shuffled with ``(seed, e)``).
      process_index, process_count: this host and the number of hosts; each host's batches hold
        its contiguous ``global_batch_size // process_count`` rows of the global batch.
      start_step: position the training iterator as if this many batches were already taken.
      model_vocab_size: when given, ``check_vocab`` runs against it before any tokenization.

    Raises:
      ValueError / FileNotFoundError / ImportError with a message naming the offending input.
    """
    _check_positive(seq_len=seq_len, global_batch_size=global_batch_size)
    slc = host_slice(global_batch_size, process_index, process_count)
    spec = corpus_spec(data_config)
    tok = build_tokenizer(data_config, spec)
    if model_vocab_size is not None:
        check_vocab(tok.vocab_size, model_vocab_size)
    train_stream, eval_stream = load_or_tokenize(data_config, spec, tok)
    train_seqs, eval_seqs = pack(train_stream, seq_len), pack(eval_stream, seq_len)
    if train_seqs.shape[0] == 0:
        raise ValueError(
            f"Too little training data: {train_stream.shape[0]} tokens cannot fill one sequence "
            f"of seq_len + 1 = {seq_len + 1} tokens"
        )
    train = TrainIterator(
        train_seqs,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_step=start_step,
    )
    description = (
        f"{spec.description}: {train_stream.shape[0]:,} train / {eval_stream.shape[0]:,} eval "
        f"tokens, vocab {tok.vocab_size}, {train_seqs.shape[0]:,} train sequences of "
        f"{seq_len} (+1), {train.batches_per_epoch:,} batches of {global_batch_size} per epoch"
    )
    return Datasets(
        tokenizer=tok,
        vocab_size=tok.vocab_size,
        train=train,
        eval_sequences=eval_seqs,
        global_batch_size=global_batch_size,
        process_slice=slc,
        num_train_tokens=int(train_stream.shape[0]),
        num_eval_tokens=int(eval_stream.shape[0]),
        description=description,
    )
