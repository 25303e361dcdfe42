"""Subword tokenizers: a byte-level BPE trained on the corpus, or a user-supplied file.

* ``train_bpe`` trains a byte-level BPE (HF ``tokenizers``) deterministically; ``load_or_train``
  caches the result as ``tokenizer.json`` under the cache directory, keyed by the corpus identity
  and the vocabulary size, so later runs load it instead of training again.
* ``load_tokenizer`` loads a HF ``tokenizer.json`` or a SentencePiece ``.model`` (T5/LLaMA style;
  needs the optional ``sentencepiece`` package).

Both kinds expose ``vocab_size``, ``eos_id``, ``encode_batch`` and ``decode``.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from train import atomic

EOS_TOKEN = "<|endoftext|>"
# Tokens tried, in order, as the document separator of a user-supplied tokenizer.json.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
# Bump when the BPE recipe changes, so stale cached tokenizers are not reused.
BPE_RECIPE_VERSION = "bytebpe-v1"


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def identity(self) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A HF ``tokenizers`` tokenizer with a chosen end-of-sequence token."""

    def __init__(self, tok, *, identity: str, eos_token: str | None = None) -> None:
        self._tok = tok
        self._identity = identity
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        for token in candidates:
            token_id = tok.token_to_id(token)
            if token_id is not None:
                self._eos_id = int(token_id)
                self.eos_token = token
                break
        else:
            raise ValueError(
                f"Tokenizer has none of the end-of-sequence tokens {list(candidates)}; "
                "set data.eos_token to one of its special tokens"
            )

    @property
    def vocab_size(self) -> int:
        """Number of ids, including special tokens."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_id(self) -> int:
        """Id appended after every document when packing."""
        return self._eos_id

    @property
    def identity(self) -> str:
        """A hash of the tokenizer definition (part of the token-cache key)."""
        return self._identity

    @property
    def hf(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes texts without adding special tokens (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Decodes ids back to text, skipping special tokens."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | pathlib.Path) -> None:
        """Writes tokenizer.json atomically (safe with several processes sharing a cache)."""
        atomic.write_text(pathlib.Path(path), self._tok.to_str())


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` (as used by T5 and LLaMA)."""

    def __init__(self, path: pathlib.Path) -> None:
        try:
            import sentencepiece as spm  # Optional dependency.
        except ImportError as e:
            raise ImportError(
                f"Loading the SentencePiece model {path} needs `pip install sentencepiece`"
            ) from e
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {path} defines no end-of-sequence token")
        self._identity = _file_sha(path)

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def identity(self) -> str:
        return self._identity

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


def _file_sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_tokenizer(path: str | pathlib.Path, *, eos_token: str | None = None) -> Tokenizer:
    """Loads a HF ``tokenizer.json`` or a SentencePiece ``.model`` file.

    Raises:
      FileNotFoundError: the file does not exist (named in the message).
      ValueError: the file cannot be parsed, or has an unknown suffix.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer file does not exist: {path}")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix != ".json":
        raise ValueError(f"Unknown tokenizer file {path}: expected tokenizer.json or a .model")
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors.
        raise ValueError(f"Cannot parse tokenizer file {path}: {e}") from e
    return HFTokenizer(tok, identity=_file_sha(path), eos_token=eos_token)


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Trains a byte-level BPE with ``vocab_size`` ids (including the EOS token ``<|endoftext|>``).

    Byte-level means every string round-trips exactly through encode/decode. Training is
    deterministic for the same texts in the same order.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 for a byte-level BPE, got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols, so any text is encodable even if unseen in training.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    identity = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
    return HFTokenizer(tok, identity=identity, eos_token=EOS_TOKEN)


def bpe_cache_path(
    cache_dir: pathlib.Path, corpus_id: str, vocab_size: int, train_mb: float
) -> pathlib.Path:
    """Where the BPE trained for this corpus and vocabulary size is cached."""
    key = hashlib.sha256(f"{BPE_RECIPE_VERSION}|{corpus_id}|{vocab_size}|{train_mb}".encode())
    return cache_dir / "tokenizers" / f"bpe-{vocab_size}-{key.hexdigest()[:16]}.json"


def load_or_train(
    *,
    cache_dir: pathlib.Path,
    corpus_id: str,
    vocab_size: int,
    train_mb: float,
    texts: Callable[[], Iterable[str]],
) -> HFTokenizer:
    """Loads the cached BPE for (corpus, vocab size), training and caching it on first use.

    Args:
      cache_dir: cache root; the tokenizer goes to ``cache_dir/tokenizers/``.
      corpus_id: a string identifying the corpus content (part of the cache key).
      vocab_size: target vocabulary size.
      train_mb: the megabytes of ``texts`` that training reads (bounds the time it takes).
      texts: returns the training texts, already limited to ``train_mb``; only called when
        no cached tokenizer exists.
    """
    path = bpe_cache_path(cache_dir, corpus_id, vocab_size, train_mb)
    if path.is_file():
        return load_tokenizer(path, eos_token=EOS_TOKEN)  # type: ignore[return-value]
    tok = train_bpe(texts(), vocab_size)
    tok.save(path)
    return tok
