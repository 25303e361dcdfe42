"""The streaming pipeline on real prepared TFDS copies (train/data.py, train/corpus.py).

A tiny ``GeneratorBasedBuilder`` is prepared offline into a tmp data_dir in both file formats
tfds writes (ArrayRecord, TFRecord), then read through ``build_datasets(source='tfds')``:
per-epoch shuffle, per-process shards, exact resume through a JSON round trip, held-out data.

Without TensorFlow, tfds can prepare ArrayRecord copies but its TFRecord writer is
``tf.io.TFRecordWriter``; there the test swaps in a pure-Python writer of the same record
format (length, masked CRC-32C, data, masked CRC-32C) for that one call, so the copy is
otherwise tfds's own (split files, shuffling, dataset_info.json). With TensorFlow installed the
real writer runs. Reading never needs TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
import re
import struct

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from configs.base import data_config  # noqa: E402
from train import corpus as corpus_lib  # noqa: E402
from train import data  # noqa: E402

VOCAB = 300
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "seven", "wizards")
NUM_TRAIN, NUM_VALIDATION, NUM_SHARDS = 240, 24, 4
SEQ_LEN, BATCH = 16, 8
_DOC_ID = re.compile(r"^doc (\d+):")


def _text(i: int) -> str:
    if i == 3:  # Multi-byte UTF-8 and JSON escapes.
        return 'doc 3: naïve café, 漢字 🙂 and a quote " \\ inside'
    rng = random.Random(i)
    return f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))


class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    """Numbered pseudo-sentences in a ``text`` feature (as C4's), plus a ``url`` feature."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds derives this from the module's package, which needs importlib_resources for tests/.
    code_path = pathlib.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "url": tfds.features.Text()}
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(range(NUM_TRAIN)),
            "validation": self._generate_examples(range(10_000, 10_000 + NUM_VALIDATION)),
        }

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"text": _text(i), "url": f"https://example.org/{i}"}


# --------------------------------------------------------------------------- TFRecord writing


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(payload: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in payload:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_masked_crc32c_known_value() -> None:
    # CRC-32C("123456789") = 0xE3069283 (the standard check value), then TFRecord's mask.
    crc = 0xE3069283
    assert (
        _masked_crc32c(b"123456789")
        == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    )


def _write_tfrecord(cls, path, iterator) -> None:
    """TFRecordWriter's format: per record u64 length, masked CRC of it, data, masked CRC."""
    del cls
    with open(path, "wb") as f:
        for _, serialized in iterator:
            length = struct.pack("<Q", len(serialized))
            f.write(length + struct.pack("<I", _masked_crc32c(length)))
            f.write(serialized + struct.pack("<I", _masked_crc32c(serialized)))


def _prepare(data_dir: pathlib.Path, file_format: str) -> None:
    builder = TinyCorpus(data_dir=str(data_dir), file_format=file_format)
    config = tfds.download.DownloadConfig(num_shards=NUM_SHARDS)
    if file_format == "tfrecord" and importlib.util.find_spec("tensorflow") is None:
        adapter = tfds.core.file_adapters.TfRecordFileAdapter
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(adapter, "write_examples", classmethod(_write_tfrecord))
            builder.download_and_prepare(download_config=config)
    else:
        builder.download_and_prepare(download_config=config)


@pytest.fixture(scope="module", params=["array_record", "tfrecord"])
def prepared(request, tmp_path_factory) -> tuple[str, pathlib.Path]:
    data_dir = tmp_path_factory.mktemp(request.param)
    _prepare(data_dir, request.param)
    return request.param, data_dir


def _config(data_dir: pathlib.Path, **overrides):
    cfg = data_config()
    cfg.source = "tfds"
    cfg.tfds_name = "tiny_corpus"
    cfg.data_dir = str(data_dir)
    cfg.vocab_size = VOCAB
    cfg.eval_fraction = 0.1
    cfg.cache_dir = str(data_dir / "cache")
    cfg.read_threads = 2
    cfg.shuffle_window = 16
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _build(cfg, **kwargs) -> data.Datasets:
    kwargs = {"seq_len": SEQ_LEN, "global_batch_size": BATCH, "seed": 0, **kwargs}
    return data.build_datasets(cfg, **kwargs)


def _stream(batches: list[dict]) -> np.ndarray:
    """The token stream a host's rows were cut from: rows are consecutive pieces of it."""
    return np.concatenate(
        [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).reshape(-1) for b in batches]
    )


def _doc_ids(stream: np.ndarray, ds: data.Datasets) -> list[int]:
    """The numbers of the documents whose text and EOS are whole in a stream (in order)."""
    ends = np.flatnonzero(stream == ds.tokenizer.eos_id)
    ids, start = [], 0
    for end in ends:
        text = ds.tokenizer.decode(stream[start:end].tolist())
        match = _DOC_ID.match(text)
        assert match and text == _text(int(match.group(1))), text  # Whole documents, intact.
        ids.append(int(match.group(1)))
        start = end + 1
    return ids


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _tokens_per_epoch(ds: data.Datasets, ids) -> int:
    return sum(len(t) + 1 for t in ds.tokenizer.encode_batch([_text(i) for i in ids]))


# --------------------------------------------------------------------------- reading


def test_reads_prepared_copy(prepared) -> None:
    file_format, data_dir = prepared
    ds = _build(_config(data_dir))
    assert f"tiny_corpus split 'train' ({file_format}, {NUM_TRAIN} documents)" in ds.description
    held = {i for i in range(NUM_TRAIN) if data.is_eval_document(_text(i), 0.1)}
    trained = sorted(set(range(NUM_TRAIN)) - held)
    assert held and trained
    # Enough batches for two epochs; each epoch is every non-held-out document exactly once.
    per_epoch = _tokens_per_epoch(ds, trained)
    batches = _take(ds.train, 2 * per_epoch // (BATCH * (SEQ_LEN + 1)) + 1)
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (BATCH, SEQ_LEN)
        assert b["inputs"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    ids = _doc_ids(_stream(batches), ds)
    # (TFRecord: 240 documents are 15 whole shuffle windows of 16, so no window spans epochs.)
    epoch0, epoch1 = ids[: len(trained)], ids[len(trained) : 2 * len(trained)]
    assert sorted(epoch0) == sorted(epoch1) == trained  # No held-out document is trained on.
    assert epoch0 != trained  # Shuffled, not in stored order...
    assert epoch0 != epoch1  # ...and reshuffled every epoch.


def test_versioned_name_reads_the_prepared_files(prepared) -> None:
    # As 'c4/en:3.0.1' (T5/seqio/MaxText copies): with a version, tfds reads the copy's files.
    _, data_dir = prepared
    plain, versioned = (
        _build(_config(data_dir, tfds_name=n)) for n in ("tiny_corpus", "tiny_corpus:1.0.0")
    )
    np.testing.assert_array_equal(next(plain.train)["inputs"], next(versioned.train)["inputs"])
    with pytest.raises(ValueError, match=r"'tiny_corpus:9.0.0'.*no prepared copy found"):
        _build(_config(data_dir, tfds_name="tiny_corpus:9.0.0"))


def test_shuffle_is_deterministic_and_seeded(prepared) -> None:
    _, data_dir = prepared
    cfg = _config(data_dir)
    first, again, other = (_take(_build(cfg, seed=s).train, 6) for s in (0, 0, 1))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert any(
        not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other, strict=True)
    )


@pytest.mark.parametrize("k", [1, 5, 12])
def test_resume_continues_exactly(prepared, k: int) -> None:
    _, data_dir = prepared
    cfg = _config(data_dir)
    total = 20
    straight = _take(_build(cfg).train, total)
    it = _build(cfg).train
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # As stored in the checkpoint's meta.
    assert state["step"] == k
    resumed = _build(cfg).train
    resumed.set_state(state)
    assert resumed.step == k
    for i in range(k, total):
        batch = next(resumed)
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(batch[key], straight[i][key])


def test_processes_read_disjoint_documents(prepared) -> None:
    file_format, data_dir = prepared
    # A separate held-out split: every training document is trained on, none filtered.
    cfg = _config(data_dir, tfds_eval_split="validation")
    one = _build(cfg)
    steps = _tokens_per_epoch(one, range(NUM_TRAIN)) // (BATCH * (SEQ_LEN + 1)) + 2
    single = _doc_ids(_stream(_take(one.train, steps)), one)
    assert sorted(single[:NUM_TRAIN]) == list(range(NUM_TRAIN))
    if file_format == "array_record":
        # Every epoch's shuffled documents are dealt round-robin: host h gets h, h + 2, ...
        shares = [NUM_TRAIN // 2] * 2
    else:
        # Host h reads TFRecord files h, h + 2, ... (4 files, in shard order).
        lengths = tfds.builder("tiny_corpus", data_dir=str(data_dir)).info.splits["train"]
        shares = [sum(lengths.shard_lengths[h::2]) for h in range(2)]
    read = []
    for index in range(2):
        host = _build(cfg, process_index=index, process_count=2)
        batches = _take(host.train, steps + 20)  # Past the end of its share.
        assert batches[0]["inputs"].shape == (BATCH // 2, SEQ_LEN)
        ids = _doc_ids(_stream(batches), host)
        assert len(ids) > shares[index]
        if file_format == "array_record":
            n = min(len(ids), len(single[index::2]))
            assert n > shares[index] // 2 and ids[:n] == single[index::2][:n]
            read.append(set(ids[: shares[index]]))  # Its first epoch.
        else:
            read.append(set(ids))  # Its own files in every epoch (windows span epochs).
    # No document on both hosts, and together every document.
    assert [len(r) for r in read] == shares
    assert not read[0] & read[1]
    assert read[0] | read[1] == set(range(NUM_TRAIN))


# --------------------------------------------------------------------------- held-out data


def test_eval_from_a_separate_split(prepared) -> None:
    _, data_dir = prepared
    ds = _build(_config(data_dir, tfds_eval_split="validation"))
    batches = ds.eval_batches(2)
    assert len(batches) == 2
    ids = _doc_ids(_stream(batches), ds)
    assert ids and set(ids) <= set(range(10_000, 10_000 + NUM_VALIDATION))
    # Fixed: the same rows in every run and for every seed; host 1 gets rows 4:8.
    np.testing.assert_array_equal(
        _build(_config(data_dir, tfds_eval_split="validation"), seed=3).eval_batches(2)[1][
            "inputs"
        ],
        batches[1]["inputs"],
    )
    host1 = _build(
        _config(data_dir, tfds_eval_split="validation"), process_index=1, process_count=2
    )
    np.testing.assert_array_equal(host1.eval_batches(1)[0]["inputs"], batches[0]["inputs"][4:])


def test_eval_held_out_by_hash(prepared) -> None:
    _, data_dir = prepared
    ds = _build(_config(data_dir, eval_fraction=0.3))
    rows = ds.eval_rows(None)
    ids = _doc_ids(rows[:, :].reshape(-1), ds)
    held = [i for i in range(NUM_TRAIN) if data.is_eval_document(_text(i), 0.3)]
    assert set(ids) <= set(held) and len(ids) >= len(held) - 2  # Stored order, all of them.
    assert ds.num_eval_batches == rows.shape[0] // BATCH > 0


# --------------------------------------------------------------------------- bad input


def test_bad_tfds_inputs_are_named(prepared) -> None:
    file_format, data_dir = prepared
    with pytest.raises(ValueError, match=r"split 'dev'.*no such split.*'train', 'validation'"):
        _build(_config(data_dir, tfds_split="dev"))
    with pytest.raises(ValueError, match=r"no 'body' feature.*\['text', 'url'\]"):
        _build(_config(data_dir, text_field="body"))
    with pytest.raises(ValueError, match=r"data.max_corpus_mb.*train\[:1%\]"):
        _build(_config(data_dir, max_corpus_mb=1.0))
    with pytest.raises(ValueError, match=r"Unknown data config field data.tfds_nmae"):
        data.build_datasets(
            {**_config(data_dir).to_dict(), "tfds_nmae": "c4/en"},
            seq_len=SEQ_LEN,
            global_batch_size=BATCH,
            seed=0,
        )
    if file_format == "tfrecord":
        many = _config(data_dir)
        with pytest.raises(ValueError, match=r"4 TFRecord file\(s\), fewer than the 8 processes"):
            _build(many, global_batch_size=8, process_index=0, process_count=8)


# --------------------------------------------------------------------------- local files


def _local_files(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    texts = [_text(i) for i in range(160)]
    jsonl = tmp_path / "a.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[:100])]
    jsonl.write_text("\n".join(lines[:50]) + "\n\n" + "\n".join(lines[50:]) + "\n")
    # Paragraphs separated by blank lines, some holding spaces, and a leading blank paragraph.
    body = "\n\n".join(texts[100:130]) + "\n \n\n" + "\n\n\n".join(texts[130:])
    (tmp_path / "b.txt").write_text("\n\n" + body + "\n")
    return [jsonl, tmp_path / "b.txt"]


def test_indexed_files_read_the_documents_of_the_cached_reader(tmp_path) -> None:
    files = _local_files(tmp_path)
    expected = list(corpus_lib.file_documents(files, txt_split="blank_lines"))
    indexed = corpus_lib.FileDocuments(files, text_field="text", txt_split="blank_lines")
    assert len(indexed) == len(expected) == 160
    assert list(indexed.documents()) == expected
    assert indexed[137] == expected[137]  # Random access.
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"Cannot stream .*c\.parquet"):
        corpus_lib.FileDocuments([tmp_path], text_field="text", txt_split="file")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        corpus_lib.FileDocuments([tmp_path / "bad.jsonl"], text_field="text", txt_split="file")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl, line 2: not valid UTF-8"):
        corpus_lib.FileDocuments([tmp_path / "latin1.jsonl"], text_field="text", txt_split="file")


def test_streamed_files_resume_and_shard(tmp_path) -> None:
    cfg = data_config()
    cfg.source, cfg.stream_files, cfg.txt_split = "files", True, "blank_lines"
    cfg.paths = [str(p) for p in _local_files(tmp_path)]
    cfg.vocab_size, cfg.eval_fraction, cfg.cache_dir = VOCAB, 0.1, str(tmp_path / "cache")
    one = _build(cfg)
    assert "local file(s)" in one.description and "160 documents" in one.description
    straight = _take(one.train, 40)
    ids = _doc_ids(_stream(straight), one)
    held = {i for i in range(160) if data.is_eval_document(_text(i), 0.1)}
    assert held and not held & set(ids)  # Held-out documents are never trained on.
    assert len(set(ids[:100])) == 100 and ids[:100] != sorted(ids[:100])  # Shuffled, no repeat.
    it = _build(cfg).train
    _take(it, 17)
    resumed = _build(cfg).train
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    for i in range(17, 40):
        np.testing.assert_array_equal(next(resumed)["inputs"], straight[i]["inputs"])
    # Without held-out filtering, host h gets documents h, h + 2, ... of the one-process order.
    cfg.eval_fraction = 0.0
    single = _doc_ids(_stream(_take(_build(cfg).train, 40)), one)
    for index in range(2):
        host = _build(cfg, process_index=index, process_count=2)
        ids = _doc_ids(_stream(_take(host.train, 30)), host)
        n = min(len(ids), len(single[index::2]))
        assert n > 30 and ids[:n] == single[index::2][:n]
