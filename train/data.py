"""Language-model data pipeline: corpus -> tokenizer -> packed, shuffled, resumable batches.

Entry point: ``build_datasets(data_config, seq_len=..., global_batch_size=..., seed=...)``.
Both pipelines below are grain datasets; the training iterator's position (``get_state``) is a
small JSON dict saved in every checkpoint, so a restored run yields exactly the batches of an
uninterrupted one.

* Streaming (``source='tfds'``, or ``'files'`` with ``stream_files``; corpora of any size):
  documents are read lazily from a prepared TFDS copy (ArrayRecord through tfds's random-access
  data source; TFRecord through grain's file reader) or local .jsonl/.txt files (through a
  byte-offset index), shuffled per epoch with a seeded index shuffle (ArrayRecord: over the whole
  split; TFRecord: file order per epoch, then a window of documents), dealt round-robin to the
  processes (each reads only its own documents), tokenized on the fly, each followed by EOS,
  and packed into rows of ``seq_len + 1`` tokens by concatenate-then-split. Host memory stays
  flat: nothing is held beyond prefetch buffers (and, for local files, 24 bytes of index a
  document).
* Cached (``source='default'`` or ``'files'``, corpora whose tokens fit in memory once): the
  documents are tokenized once into a token stream cached as ``.npy`` (uint16 when the
  vocabulary fits) under the cache directory and memory-mapped; the stream is cut into rows of
  ``seq_len + 1`` tokens, visited in a permutation seeded by ``(seed, epoch)``,
  ``global_batch_size`` rows at a time, each process reading its contiguous
  ``1 / process_count`` slice of every global batch.

``inputs`` are the first ``seq_len`` tokens of a row and ``targets`` the last ``seq_len``.
Held-out documents: those whose text hash falls below ``eval_fraction`` (never trained on), or
for TFDS a separate ``tfds_eval_split`` (e.g. C4's ``validation``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from train import atomic
from train import corpus as corpus_lib
from train import sampled as sampled_lib
from train import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
SOURCES = ("default", "files", "tfds", "sampled")
# Bump when the token-stream layout changes, so stale caches are not reused. v2: a corpus of
# fewer than 1 / eval_fraction documents holds out by tokens (v1 cached an empty held-out
# stream for a single .txt file).
_STREAM_VERSION = "stream-v2"
# Documents tokenized per call: bounds memory while letting the Rust encoder use all cores.
_ENCODE_CHUNK = 4096
# Batches prepared ahead of the training step, in a background thread.
_PREFETCH_BATCHES = 2


# The fields of a data config (configs/base.py's ``data_config()`` declares them with their
# defaults): ``build_datasets`` reads each of them and nothing else.
FIELDS = (
    "source",
    "paths",
    "text_field",
    "txt_split",
    "stream_files",
    "tfds_name",
    "tfds_split",
    "data_dir",
    "tfds_eval_split",
    "read_threads",
    "shuffle_window",
    "tokenizer",
    "vocab_size",
    "tokenizer_train_mb",
    "eos_token",
    "eval_fraction",
    "cache_dir",
    "max_corpus_mb",
    "ngram_min_count",
)


def resolve_config(data_config: Any) -> ml_collections.ConfigDict:
    """``data_config`` (a ConfigDict, dict or namespace) as a ConfigDict holding exactly
    :data:`FIELDS`; an unknown or missing field is an error (defaults live in configs/)."""
    items = dict(data_config.items() if hasattr(data_config, "items") else vars(data_config))
    unknown = sorted(set(items) - set(FIELDS))
    if unknown:
        raise ValueError(
            f"Unknown data config field data.{unknown[0]}; expected one of {sorted(FIELDS)}"
        )
    missing = [key for key in FIELDS if key not in items]
    if missing:
        raise ValueError(
            f"Data config lacks data.{missing[0]} (every field of configs/base.py's "
            "data_config() must be given)"
        )
    return ml_collections.ConfigDict(items)


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


# --------------------------------------------------------------------------- corpus selection


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """A corpus: how to read its documents and a string identifying its content."""

    identity: str
    description: str
    documents: Callable[[float | None], Iterator[str]]  # max_mb -> documents
    # The streamed documents (source='tfds', or 'files' with stream_files) and a separate
    # held-out split (tfds_eval_split); None for the cached sources.
    stream: corpus_lib.TfdsCorpus | corpus_lib.FileDocuments | None = None
    stream_eval: corpus_lib.TfdsCorpus | None = None


def corpus_spec(cfg: ml_collections.ConfigDict) -> CorpusSpec:
    """Validates the corpus part of a (resolved) data config and returns how to read it.

    Raises:
      ValueError: unknown ``source``; FileNotFoundError: a missing data path.
    """
    max_mb = cfg.max_corpus_mb

    def limited(read: Callable[[float | None], Iterator[str]]) -> Callable:
        # The corpus limit and the tokenizer-training limit both apply; the smaller wins.
        def documents(mb: float | None) -> Iterator[str]:
            limit = min((m for m in (mb, max_mb) if m is not None), default=None)
            return read(limit)

        return documents

    if cfg.source in ("default", "sampled"):  # 'sampled' fits its source on this corpus
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
    if cfg.source == "files":
        files = corpus_lib.expand_paths(list(cfg.paths or []))
        if cfg.txt_split not in corpus_lib.TXT_SPLITS:
            raise ValueError(
                f"Unknown data.txt_split {cfg.txt_split!r}; expected {corpus_lib.TXT_SPLITS}"
            )
        fingerprint = corpus_lib.files_fingerprint(files)
        stream = None
        if cfg.stream_files:
            if max_mb is not None:
                raise ValueError("data.max_corpus_mb applies to cached files, not stream_files")
            stream = corpus_lib.FileDocuments(
                files, text_field=cfg.text_field, txt_split=cfg.txt_split
            )
        return CorpusSpec(
            identity=f"files-{fingerprint}|{cfg.text_field}|{cfg.txt_split}|max_mb={max_mb}",
            description=(
                stream.description
                if stream is not None
                else f"{len(files)} local file(s) starting with {files[0]}"
            ),
            documents=limited(
                lambda mb: corpus_lib.file_documents(
                    files, text_field=cfg.text_field, txt_split=cfg.txt_split, max_mb=mb
                )
            ),
            stream=stream,
        )
    if cfg.source == "tfds":
        if max_mb is not None:
            raise ValueError(
                "data.max_corpus_mb applies to the cached sources; to stream part of a TFDS "
                "split, slice it, e.g. data.tfds_split='train[:1%]' (ArrayRecord copies)"
            )
        corpus = corpus_lib.TfdsCorpus(
            cfg.tfds_name, data_dir=cfg.data_dir, split=cfg.tfds_split, text_field=cfg.text_field
        )
        held_out = None
        if cfg.tfds_eval_split is not None:
            held_out = corpus_lib.TfdsCorpus(
                cfg.tfds_name,
                data_dir=cfg.data_dir,
                split=cfg.tfds_eval_split,
                text_field=cfg.text_field,
            )
        return CorpusSpec(
            identity=f"tfds-{cfg.tfds_name}|{cfg.tfds_split}|{cfg.data_dir}|{cfg.text_field}",
            description=corpus.description,
            documents=lambda mb: corpus_lib.take_mb(corpus.documents(), mb),
            stream=corpus,
            stream_eval=held_out,
        )
    raise ValueError(f"Unknown data source {cfg.source!r}; expected one of {SOURCES}")


def cache_root(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """The cache directory of a data config (default ``~/.cache/golore_jax``)."""
    raw = cfg.cache_dir
    return pathlib.Path(raw).expanduser() if raw else pathlib.Path.home() / ".cache" / "golore_jax"


def build_tokenizer(cfg: ml_collections.ConfigDict, spec: CorpusSpec) -> tokenizer_lib.Tokenizer:
    """Loads the configured tokenizer file, or the cached/freshly trained corpus BPE."""
    if cfg.tokenizer != "bpe":
        return tokenizer_lib.load_tokenizer(cfg.tokenizer, eos_token=cfg.eos_token)
    _check_positive(vocab_size=cfg.vocab_size)
    train_mb = float(cfg.tokenizer_train_mb)
    return tokenizer_lib.load_or_train(
        cache_dir=cache_root(cfg),
        corpus_id=spec.identity,
        vocab_size=cfg.vocab_size,
        train_mb=train_mb,
        texts=lambda: spec.documents(train_mb),
    )


def _check_eval_fraction(cfg: ml_collections.ConfigDict) -> float:
    eval_fraction = float(cfg.eval_fraction)
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    return eval_fraction


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

    Documents are held out by hash (about ``eval_fraction`` of them). With fewer than
    ``1 / eval_fraction`` documents (e.g. one .txt file, which is one document with
    ``txt_split='file'``) a document split cannot hold out about that fraction: the last
    ``ceil(eval_fraction * tokens)`` tokens of the corpus are held out instead. If no document
    hashes into the held-out split otherwise, the train document with the smallest hash is
    moved there, so evaluation always has data when ``eval_fraction > 0``.
    """
    dtype = _token_dtype(tok.vocab_size)
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    smallest: tuple[int, int] | None = None  # (hash, index into train parts)
    in_order: list[np.ndarray] = []  # every document, in corpus order (no copies)

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
            in_order.append(arr)

    chunk: list[str] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == _ENCODE_CHUNK:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)

    def concat(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays) if arrays else np.zeros((0,), dtype)

    if eval_fraction > 0 and eval_fraction * len(in_order) < 1:
        stream = concat(in_order)
        cut = stream.size - min(math.ceil(eval_fraction * stream.size), stream.size)
        return stream[:cut], stream[cut:]
    if eval_fraction > 0 and not parts[True] and smallest is not None and len(parts[False]) > 1:
        parts[True].append(parts[False].pop(smallest[1]))
    return concat(parts[False]), concat(parts[True])


def _atomic_save(path: pathlib.Path, array: np.ndarray) -> None:
    atomic.write(path, lambda f: np.save(f, array), binary=True)


def _stream_key(cfg: ml_collections.ConfigDict, spec: CorpusSpec, tok: tokenizer_lib.Tokenizer):
    eval_fraction = _check_eval_fraction(cfg)
    return hashlib.sha256(
        f"{_STREAM_VERSION}|{spec.identity}|{tok.identity}|{eval_fraction}".encode()
    ).hexdigest()[:20]


def load_or_tokenize(
    cfg: ml_collections.ConfigDict, spec: CorpusSpec, tok: tokenizer_lib.Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the (train, eval) token streams, from the cache when present (memory-mapped)."""
    eval_fraction = _check_eval_fraction(cfg)
    key = _stream_key(cfg, spec, tok)
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


def _shuffle_seed(seed: int) -> int:
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) for the data shuffle, got {seed}")
    return int(seed)


def _from_json(state: Any) -> Any:
    """Undoes JSON's tuple -> list where grain needs tuples: its concat-then-split packing
    compares the ``remainder_slices`` (start, stop) pairs with a tuple."""
    if isinstance(state, dict):
        return {
            k: {f: tuple(v) for f, v in value.items()}
            if k == "remainder_slices"
            else _from_json(value)
            for k, value in state.items()
        }
    if isinstance(state, list):
        return [_from_json(v) for v in state]
    return state


class TrainIterator(Iterator[Batch]):
    """Endless, resumable iterator over this host's training batches (a grain pipeline).

    The position is ``{"step": n, "pipeline": <grain iterator state>}``, JSON-serialisable:
    ``set_state`` on a fresh iterator of the same pipeline continues exactly where
    ``get_state`` was taken.
    """

    def __init__(self, dataset: grain.IterDataset, *, batches_per_epoch: int | None) -> None:
        self._dataset = dataset
        self._iterator = iter(dataset)
        self.step = 0  # Batches yielded so far.
        # Global batches per pass over the rows (cached pipeline; None when streaming).
        self.batches_per_epoch = batches_per_epoch

    def get_state(self) -> dict[str, Any]:
        """The position as a small JSON-compatible dict (store it in the checkpoint)."""
        return json.loads(json.dumps({"step": self.step, "pipeline": self._iterator.get_state()}))

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position returned by ``get_state`` (possibly through JSON)."""
        valid = (
            isinstance(state, dict)
            and set(state) == {"step", "pipeline"}
            and isinstance(state["step"], int)
            and state["step"] >= 0
            and isinstance(state["pipeline"], dict)
        )
        if not valid:
            raise ValueError(
                f"Invalid data iterator state {state!r}: expected {{'step': int >= 0, "
                "'pipeline': dict} from TrainIterator.get_state of the same data config"
            )
        try:
            self._iterator.set_state(_from_json(state["pipeline"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"Invalid data iterator state {state!r} for this data pipeline: "
                f"{type(e).__name__}: {e}"
            ) from e
        self.step = state["step"]

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        self.step += 1
        return batch


def cached_train_dataset(
    sequences: np.ndarray, *, global_batch_size: int, seed: int, rows: slice
) -> grain.IterDataset:
    """Batches of packed rows: epoch ``e`` visits the rows in an index shuffle seeded by
    ``seed + e``; global batch ``i`` holds shuffled positions ``[i B, (i + 1) B)`` (batches span
    epoch boundaries) and this host reads only its ``rows`` of it from the memory map."""

    def gather(indices: np.ndarray) -> Batch:
        indices = np.asarray(indices)[rows]
        # Sorted reads are faster on a memory-mapped stream; the original order is restored.
        order = np.argsort(indices)
        gathered = np.empty((indices.shape[0], sequences.shape[1]), sequences.dtype)
        gathered[order] = sequences[indices[order]]
        return _to_batch(gathered)

    order = grain.MapDataset.range(sequences.shape[0]).shuffle(seed=_shuffle_seed(seed)).repeat()
    batches = order.batch(global_batch_size, drop_remainder=True).map(gather)
    return _prefetched(batches.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def _prefetched(batches: grain.IterDataset) -> grain.IterDataset:
    """Produces the next batches in a background thread while the device runs a step (its
    checkpointed state is still that of the last batch handed out)."""
    return grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=_PREFETCH_BATCHES
    )


def _encoder(tok: tokenizer_lib.Tokenizer) -> Callable[[str], dict[str, np.ndarray]]:
    dtype = _token_dtype(tok.vocab_size)

    def encode(text: str) -> dict[str, np.ndarray]:
        return {"tokens": np.asarray([*tok.encode_batch([text])[0], tok.eos_id], dtype=dtype)}

    return encode


def streaming_train_dataset(
    corpus: corpus_lib.TfdsCorpus | corpus_lib.FileDocuments,
    tok: tokenizer_lib.Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    held_out_fraction: float,
    read_threads: int,
    shuffle_window: int,
) -> grain.IterDataset:
    """This host's batches of ``batch_size`` rows of ``seq_len + 1`` tokens, streamed.

    ArrayRecord (and indexed local files): the documents of the whole split are shuffled per
    epoch and dealt round-robin
    to the processes, so in every epoch they read disjoint documents that together are the
    documents one process would read. TFRecord: process ``i`` reads files ``i::process_count``
    (file order reshuffled per epoch, then a window of documents shuffled). Documents with
    ``is_eval_document(text, held_out_fraction)`` are skipped.
    """
    seed = _shuffle_seed(seed)
    _check_positive(read_threads=read_threads, shuffle_window=shuffle_window)

    def trained_on(text: str) -> bool:
        return bool(text.strip()) and not is_eval_document(text, held_out_fraction)

    encode = _encoder(tok)
    if corpus.random_access:
        records = grain.MapDataset.source(corpus.source()).shuffle(seed=seed).repeat()
        texts = records[process_index::process_count].map(corpus.text).filter(trained_on)
        documents = texts.map(encode).to_iter_dataset(
            grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads)
        )
    else:
        files = corpus.record_files()
        if len(files) < process_count:
            raise ValueError(
                f"{corpus.description} has {len(files)} TFRecord file(s), fewer than the "
                f"{process_count} processes that each read their own files"
            )

        def read_file(path: str) -> grain.IterDataset:
            return grain.experimental.TFRecordIterDataset(path).map(
                lambda raw: corpus.text(corpus.decode(raw))
            )

        # Each process keeps its own files; their order is reshuffled every epoch.
        own_files = grain.MapDataset.source(files[process_index::process_count])
        per_file = own_files.shuffle(seed=seed).repeat().map(read_file)
        texts = grain.experimental.InterleaveIterDataset(per_file, cycle_length=1)
        texts = grain.experimental.WindowShuffleIterDataset(
            texts, window_size=shuffle_window, seed=seed
        )
        documents = texts.filter(trained_on).map(encode)
    packed = grain.experimental.ConcatThenSplitIterDataset(
        documents, length_struct={"tokens": seq_len + 1}
    )
    rows = packed.map(lambda row: row["tokens"])
    return _prefetched(rows.batch(batch_size, drop_remainder=True).map(_to_batch))


def streaming_eval_rows(
    documents: Iterable[str],
    tok: tokenizer_lib.Tokenizer,
    *,
    seq_len: int,
    held_out: Callable[[str], bool],
    max_rows: int | None,
) -> np.ndarray:
    """The first ``max_rows`` rows (all when None) of the held-out documents in stored order,
    each followed by EOS, concatenated and cut into rows of ``seq_len + 1`` tokens."""
    encode = _encoder(tok)
    parts, total = [], 0
    for text in documents:
        if max_rows is not None and total >= max_rows * (seq_len + 1):
            break
        if held_out(text):
            parts.append(encode(text)["tokens"])
            total += parts[-1].size
    stream = np.concatenate(parts) if parts else np.zeros((0,), _token_dtype(tok.vocab_size))
    rows = pack(stream, seq_len)
    return rows if max_rows is None else rows[:max_rows]


@dataclasses.dataclass
class Datasets:
    """What the trainer gets from ``build_datasets``."""

    tokenizer: tokenizer_lib.Tokenizer
    vocab_size: int
    train: TrainIterator
    # Held-out rows [n, seq_len + 1] in a fixed order, the same on every host: the first
    # ``n`` of them for ``eval_rows(n)``, all of them for ``eval_rows(None)``.
    eval_rows: Callable[[int | None], np.ndarray]
    global_batch_size: int
    process_slice: slice
    description: str
    # Token counts of the cached pipeline (None when streaming: the corpus is never counted).
    num_train_tokens: int | None = None
    num_eval_tokens: int | None = None
    # source='sampled': the least expected loss of a row (nats; train/sampled.py) and the
    # source's own loss on the first n held-out rows (the oracle: paired with the model's).
    loss_floor: float | None = None
    oracle_loss: Callable[[int], float] | None = None

    @property
    def num_eval_batches(self) -> int:
        """How many full global eval batches the held-out data holds (reads all of it)."""
        return self.eval_rows(None).shape[0] // self.global_batch_size

    def eval_batches(self, n: int | None = None) -> list[Batch]:
        """The first ``n`` held-out batches (all when None), the same on every call and run;
        this host's slice of each.

        Raises ValueError when the held-out data cannot fill one global batch; returns fewer
        than ``n`` batches when it cannot fill ``n``.
        """
        b = self.global_batch_size
        rows = self.eval_rows(None if n is None else n * b)
        count = rows.shape[0] // b
        if count == 0:
            raise ValueError(
                f"Too little held-out data: {rows.shape[0]} eval sequences cannot fill one "
                f"global batch of {b}; raise data.eval_fraction (or set data.tfds_eval_split)"
            )
        return [_to_batch(rows[i * b : (i + 1) * b][self.process_slice]) for i in range(count)]


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
      data_config: every field of ``configs.base.data_config()`` (:data:`FIELDS`).
      seq_len: tokens per example (each packed row holds ``seq_len + 1``).
      global_batch_size: examples per step over all hosts.
      seed: shuffling seed.
      process_index, process_count: this host and the number of hosts; each host's batches
        hold ``global_batch_size // process_count`` rows, read from its own documents
        (streaming) or its contiguous slice of each global batch (cached).
      start_step: advance the training iterator past this many batches.
      model_vocab_size: when given, ``check_vocab`` runs against it before any tokenization.

    Raises:
      ValueError / FileNotFoundError / ImportError with a message naming the offending input.
    """
    _check_positive(seq_len=seq_len, global_batch_size=global_batch_size)
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    slc = host_slice(global_batch_size, process_index, process_count)
    cfg = resolve_config(data_config)
    _check_eval_fraction(cfg)
    if cfg.source == "sampled":  # before the tokenizer is trained
        _check_sampled(cfg)
    spec = corpus_spec(cfg)
    tok = build_tokenizer(cfg, spec)
    if model_vocab_size is not None:
        check_vocab(tok.vocab_size, model_vocab_size)
    if cfg.source == "sampled":
        datasets = _sampled_datasets(cfg, spec, tok, seq_len, global_batch_size, seed, slc)
    elif spec.stream is not None:
        datasets = _streaming_datasets(
            cfg, spec, tok, seq_len, global_batch_size, seed, slc, process_index, process_count
        )
    else:
        datasets = _cached_datasets(cfg, spec, tok, seq_len, global_batch_size, seed, slc)
    for _ in range(start_step):
        next(datasets.train)
    return datasets


def _cached_datasets(cfg, spec, tok, seq_len, global_batch_size, seed, slc) -> Datasets:
    train_stream, eval_stream = load_or_tokenize(cfg, spec, tok)
    train_seqs, eval_seqs = pack(train_stream, seq_len), pack(eval_stream, seq_len)
    if train_seqs.shape[0] == 0:
        raise ValueError(
            f"Too little training data: {train_stream.shape[0]} tokens cannot fill one sequence "
            f"of seq_len + 1 = {seq_len + 1} tokens"
        )
    batches_per_epoch = train_seqs.shape[0] // global_batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"Too little training data: {train_seqs.shape[0]} sequences cannot fill one "
            f"global batch of {global_batch_size}"
        )
    dataset = cached_train_dataset(
        train_seqs, global_batch_size=global_batch_size, seed=seed, rows=slc
    )
    description = (
        f"{spec.description}: {train_stream.shape[0]:,} train / {eval_stream.shape[0]:,} eval "
        f"tokens, vocab {tok.vocab_size}, {train_seqs.shape[0]:,} train sequences of "
        f"{seq_len} (+1), {batches_per_epoch:,} batches of {global_batch_size} per epoch"
    )
    return Datasets(
        tokenizer=tok,
        vocab_size=tok.vocab_size,
        train=TrainIterator(dataset, batches_per_epoch=batches_per_epoch),
        eval_rows=lambda n: eval_seqs if n is None else eval_seqs[:n],
        global_batch_size=global_batch_size,
        process_slice=slc,
        description=description,
        num_train_tokens=int(train_stream.shape[0]),
        num_eval_tokens=int(eval_stream.shape[0]),
    )


def _streaming_datasets(
    cfg, spec, tok, seq_len, global_batch_size, seed, slc, process_index, process_count
) -> Datasets:
    eval_fraction = _check_eval_fraction(cfg)
    # With a separate held-out split every document of the training split is trained on.
    held_out_fraction = 0.0 if spec.stream_eval is not None else eval_fraction
    documents = len(spec.stream) if isinstance(spec.stream, corpus_lib.FileDocuments) else None
    if held_out_fraction > 0 and documents is not None and held_out_fraction * documents < 1:
        # Held out by document hash, a document at a time: with so few, one side may get
        # none (and training would skip every document, forever).
        raise ValueError(
            f"data.stream_files=True holds out whole documents, and {documents} document(s) "
            f"are too few for data.eval_fraction={eval_fraction:g} (a .txt file is one document "
            "with data.txt_split='file'): set data.stream_files=False (holds out the corpus's "
            "last tokens) or data.txt_split='blank_lines' (a document per paragraph)"
        )
    dataset = streaming_train_dataset(
        spec.stream,
        tok,
        seq_len=seq_len,
        batch_size=slc.stop - slc.start,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        held_out_fraction=held_out_fraction,
        read_threads=cfg.read_threads,
        shuffle_window=cfg.shuffle_window,
    )
    if spec.stream_eval is not None:
        eval_corpus, held_out = spec.stream_eval, lambda text: True
    else:
        eval_corpus = spec.stream
        held_out = lambda text: is_eval_document(text, eval_fraction)  # noqa: E731
    cached: dict[int | None, np.ndarray] = {}

    def eval_rows(n: int | None) -> np.ndarray:
        if n not in cached:
            cached[n] = streaming_eval_rows(
                eval_corpus.documents(), tok, seq_len=seq_len, held_out=held_out, max_rows=n
            )
        return cached[n]

    held = (
        f"held out: split {spec.stream_eval.split!r}"
        if spec.stream_eval is not None
        else f"held out: {eval_fraction:g} of documents by hash"
    )
    description = (
        f"{spec.description}, streamed ({held}): vocab {tok.vocab_size}, rows of {seq_len} "
        f"(+1), {slc.stop - slc.start} of each global batch of {global_batch_size} per process"
    )
    return Datasets(
        tokenizer=tok,
        vocab_size=tok.vocab_size,
        train=TrainIterator(dataset, batches_per_epoch=None),
        eval_rows=eval_rows,
        global_batch_size=global_batch_size,
        process_slice=slc,
        description=description,
    )


# Held-out rows of the sampled source that ``eval_rows(None)`` returns (it is endless).
SAMPLED_EVAL_ROWS = 4096


def sampled_train_dataset(
    source: sampled_lib.TrigramSource,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    rows: slice,
) -> grain.IterDataset:
    """Endless batches sampled from ``source``: global batch ``j`` is rows
    ``[j B, (j + 1) B)`` of training stream 0 under ``seed``, this host samples its ``rows`` of
    it. The grain position is the batch index, so a restored run samples the same rows."""
    mine = np.arange(rows.start, rows.stop, dtype=np.int64)

    def batch(j: int) -> Batch:
        indices = int(j) * global_batch_size + mine
        return _to_batch(source.sample_rows(seed, sampled_lib.TRAIN_STREAM, indices, seq_len + 1))

    batches = grain.MapDataset.range(0, 2**62).map(batch)
    return _prefetched(batches.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def _check_sampled(cfg: ml_collections.ConfigDict) -> None:
    count = cfg.ngram_min_count
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ValueError(f"data.ngram_min_count must be an integer >= 1, got {count!r}")


def _sampled_datasets(cfg, spec, tok, seq_len, global_batch_size, seed, slc) -> Datasets:
    train_stream, eval_stream = load_or_tokenize(cfg, spec, tok)
    source = sampled_lib.load_or_fit(
        cache_root(cfg),
        _stream_key(cfg, spec, tok),
        lambda: np.concatenate([np.asarray(train_stream), np.asarray(eval_stream)]),
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        min_count=int(cfg.ngram_min_count),
    )
    floor = sampled_lib.load_or_floor(cache_root(cfg), source, seq_len + 1)
    dataset = sampled_train_dataset(
        source, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed, rows=slc
    )
    cached: dict[int, np.ndarray] = {}

    def eval_rows(n: int | None) -> np.ndarray:
        n = SAMPLED_EVAL_ROWS if n is None else n
        if n not in cached:
            cached[n] = source.sample_rows(
                sampled_lib.EVAL_SEED, sampled_lib.EVAL_STREAM, np.arange(n), seq_len + 1
            )
        return cached[n]

    def oracle_loss(n: int) -> float:
        return float(-np.mean(source.token_log_probs(eval_rows(n))))

    description = (
        f"trigram source sampled on the fly ({sampled_lib.SOURCE_VERSION}; fitted on "
        f"{spec.description}, {train_stream.shape[0] + eval_stream.shape[0]:,} tokens; "
        f"{source.num_contexts:,} trigram contexts seen >= {cfg.ngram_min_count} times, "
        f"{source.col3.shape[0]:,} trigram / {source.col2.shape[0]:,} bigram entries, "
        f"D3 {source.d3:.3f} D2 {source.d2:.3f}): vocab {tok.vocab_size}, rows of {seq_len} "
        f"(+1) starting at EOS, loss floor {floor['floor']:.4f} nats/token (last position "
        f"{floor['last_position']:.4f}); held out: stream {sampled_lib.EVAL_STREAM} seed "
        f"{sampled_lib.EVAL_SEED}"
    )
    return Datasets(
        tokenizer=tok,
        vocab_size=tok.vocab_size,
        train=TrainIterator(dataset, batches_per_epoch=None),
        eval_rows=eval_rows,
        global_batch_size=global_batch_size,
        process_slice=slc,
        description=description,
        loss_floor=float(floor["floor"]),
        oracle_loss=oracle_loss,
    )
