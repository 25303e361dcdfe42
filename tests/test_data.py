"""Tests of the data pipeline (train/data.py, train/corpus.py, train/tokenizer.py).

All corpora except the default-corpus check are tiny files made in tmp_path, with a small
vocabulary, so the whole module runs in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import random

import numpy as np
import pytest

from configs.base import data_config
from train import corpus as corpus_lib
from train import data
from train import tokenizer as tokenizer_lib

VOCAB = 300  # 256 bytes + EOS + a few merges: trains in milliseconds.
WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"),
    *("wizards", "quietly", "hex", "every", "jolly", "king", "and", "many", "small", "birds"),
    *("sing", "in", "green", "trees", "near", "old", "rivers"),
]


def _documents(n: int, seed: int = 0) -> list[str]:
    """Distinct pseudo-sentences of varied length (distinct so the hash split sees n docs)."""
    rng = random.Random(seed)
    return [
        f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + "."
        for i in range(n)
    ]


def _jsonl(path: pathlib.Path, docs: list[str], field: str = "text") -> pathlib.Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _config(tmp_path: pathlib.Path, paths: list[pathlib.Path], **overrides):
    cfg = data_config()
    cfg.source = "files"
    cfg.paths = [str(p) for p in paths]
    cfg.vocab_size = VOCAB
    cfg.eval_fraction = 0.2
    cfg.cache_dir = str(tmp_path / "cache")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture
def corpus_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return _jsonl(tmp_path / "corpus.jsonl", _documents(400))


@pytest.fixture
def config(tmp_path: pathlib.Path, corpus_file: pathlib.Path):
    return _config(tmp_path, [corpus_file])


def _build(cfg, **kwargs) -> data.Datasets:
    kwargs.setdefault("seq_len", 16)
    kwargs.setdefault("global_batch_size", 8)
    kwargs.setdefault("seed", 0)
    return data.build_datasets(cfg, **kwargs)


# --------------------------------------------------------------------------- default corpus


def test_default_corpus_package_is_installed_and_large() -> None:
    files = corpus_lib.default_corpus_files()
    assert len(files) == 26  # words_A.json .. words_Z.json
    assert sum(f.stat().st_size for f in files) > 50e6  # JSON; about 18 MB of it is text.
    docs = list(corpus_lib.default_corpus_documents(max_mb=1.0))
    size = sum(len(d.encode()) for d in docs)
    assert 1.0e6 <= size < 1.1e6  # max_mb cuts at a document boundary.
    assert docs[0].startswith("1 (adj.): used of a single unit")  # Plain text, not JSON.
    assert all("Webster]" not in d for d in docs)


def test_gcide_entry_rendering() -> None:
    entry = {
        "pos": [
            {
                "etymology": "[AS. l.]",
                "part_of_speech": "n.",
                "definitions": [
                    {"text": "Travail; toil.", "examples": ["Hard labor. Milton.1913 Webster]"]}
                ],
            }
        ]
    }
    text = corpus_lib.gcide_entry_to_text("labor", entry)
    assert text == 'labor (n.): Travail; toil. "Hard labor. Milton."'


# --------------------------------------------------------------------------- file readers


def test_txt_jsonl_parquet_readers(tmp_path: pathlib.Path) -> None:
    (tmp_path / "a.txt").write_text("First para.\n\nSecond para.\n")
    _jsonl(tmp_path / "b.jsonl", ["json one", "json two"], field="body")
    per_file = list(
        corpus_lib.file_documents([tmp_path / "a.txt"], txt_split="file", text_field="body")
    )
    assert per_file == ["First para.\n\nSecond para.\n"]
    docs = list(corpus_lib.file_documents([tmp_path], txt_split="blank_lines", text_field="body"))
    assert docs == ["First para.", "Second para.", "json one", "json two"]  # Sorted file order.
    if importlib.util.find_spec("pyarrow") is None:
        pytest.skip("pyarrow not installed")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["pq one", None, "pq two"]}), tmp_path / "c.parquet")
    assert list(corpus_lib.file_documents([tmp_path / "c.parquet"])) == ["pq one", "pq two"]


# --------------------------------------------------------------------------- tokenizer


def test_bpe_roundtrip_and_determinism() -> None:
    docs = _documents(200)
    tok = tokenizer_lib.train_bpe(docs, 320)
    again = tokenizer_lib.train_bpe(docs, 320)
    assert tok.hf.to_str() == again.hf.to_str()  # Deterministic training.
    assert tok.vocab_size == 320
    for text in [*docs[:5], "  Unseen: naïve café, 漢字 & emoji 🙂\n\ttabs  ", ""]:
        ids = tok.encode_batch([text])[0]
        assert tok.decode(ids) == text
        assert tok.eos_id not in ids


def test_user_tokenizer_json(tmp_path: pathlib.Path, corpus_file: pathlib.Path) -> None:
    trained = tokenizer_lib.train_bpe(_documents(100), VOCAB)
    path = tmp_path / "tokenizer.json"
    trained.save(path)
    ds = _build(_config(tmp_path, [corpus_file], tokenizer=str(path)))
    assert ds.vocab_size == VOCAB
    assert ds.tokenizer.eos_id == trained.eos_id
    assert ds.tokenizer.identity == trained.identity


# --------------------------------------------------------------------------- packing


def test_packing_shift_eos_and_lengths(tmp_path: pathlib.Path) -> None:
    docs = _documents(60)
    ds = _build(_config(tmp_path, [_jsonl(tmp_path / "c.jsonl", docs)], eval_fraction=0.0))
    tok = ds.tokenizer
    expected = np.concatenate([np.array([*ids, tok.eos_id]) for ids in tok.encode_batch(docs)])
    assert ds.num_train_tokens == expected.size
    seqs = data.pack(expected, 16)
    assert seqs.shape == (expected.size // 17, 17)
    np.testing.assert_array_equal(seqs.reshape(-1), expected[: seqs.size])
    seen = set()
    for _ in range(ds.train.batches_per_epoch):
        batch = next(ds.train)
        assert batch["inputs"].shape == batch["targets"].shape == (8, 16)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        full = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
        for row in full:
            matches = np.flatnonzero((seqs == row).all(axis=1))
            assert matches.size >= 1
            seen.add(int(matches[0]))
    # One epoch visits batches_per_epoch * B distinct sequences, EOS separates documents.
    assert len(seen) == ds.train.batches_per_epoch * 8
    assert (expected == tok.eos_id).sum() == len(docs)


def test_shuffle_depends_on_seed_and_epoch(config) -> None:
    def first_batches(seed: int, n: int = 3) -> list[np.ndarray]:
        ds = _build(config, seed=seed)
        return [next(ds.train)["inputs"] for _ in range(n)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # Each epoch visits every row once, and is reshuffled: epoch 1 does not repeat epoch 0's
    # order. Batches run on across the epoch boundary, so rows [0, n) are epoch 0.
    ds = _build(config)
    it, n = ds.train, ds.num_train_tokens // 17  # rows of seq_len + 1 = 17 tokens per epoch
    rows = np.concatenate([next(it)["inputs"] for _ in range(2 * it.batches_per_epoch + 2)])
    assert len({r.tobytes() for r in rows}) == n  # Distinct rows: each one is seen.
    epoch0, epoch1 = rows[:n], rows[n : 2 * n]
    assert len({r.tobytes() for r in epoch0}) == len({r.tobytes() for r in epoch1}) == n
    assert {r.tobytes() for r in epoch0} == {r.tobytes() for r in epoch1}
    assert not np.array_equal(epoch0, epoch1)


def test_eval_split_is_disjoint_and_fixed(tmp_path: pathlib.Path) -> None:
    docs = _documents(300)
    cfg = _config(tmp_path, [_jsonl(tmp_path / "c.jsonl", docs)], eval_fraction=0.25)
    held = [d for d in docs if data.is_eval_document(d, 0.25)]
    train = [d for d in docs if not data.is_eval_document(d, 0.25)]
    assert held and train and not set(held) & set(train)
    ds = _build(cfg)
    tok = ds.tokenizer
    n_train = sum(len(ids) + 1 for ids in tok.encode_batch(train))
    n_eval = sum(len(ids) + 1 for ids in tok.encode_batch(held))
    assert (ds.num_train_tokens, ds.num_eval_tokens) == (n_train, n_eval)
    first, second = ds.eval_batches(2), _build(cfg, seed=5).eval_batches(2)
    assert len(first) == 2
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_tiny_corpus_still_gets_an_eval_document(tmp_path: pathlib.Path) -> None:
    docs = _documents(5)
    streams = data.tokenize_to_streams(docs, tokenizer_lib.train_bpe(docs, VOCAB), 0.001)
    assert streams[0].size > 0 and streams[1].size > 0


# --------------------------------------------------------------------------- resume/multi-host


def test_resume_matches_uninterrupted_run(config) -> None:
    reference = _build(config).train
    batches_per_epoch = reference.batches_per_epoch
    total = batches_per_epoch + 4  # Crosses an epoch boundary.
    expected = [next(reference)["inputs"] for _ in range(total)]

    for k in (0, 3, batches_per_epoch - 1, batches_per_epoch + 1):
        it = _build(config).train
        for _ in range(k):
            next(it)
        state = it.get_state()
        assert state["step"] == k
        assert len(json.dumps(state)) < 200  # Small and serialisable, for the checkpoint.
        resumed = _build(config).train
        resumed.set_state(state)
        assert resumed.step == k
        for i in range(k, total):
            np.testing.assert_array_equal(next(resumed)["inputs"], expected[i])
        from_step = _build(config, start_step=k).train
        np.testing.assert_array_equal(next(from_step)["inputs"], expected[k])


def test_multi_host_slices_concatenate_to_global_batch(config) -> None:
    global_it = _build(config, global_batch_size=8).train
    hosts = [
        _build(config, global_batch_size=8, process_index=i, process_count=4).train
        for i in range(4)
    ]
    for _ in range(3):
        full = next(global_it)
        parts = [next(h) for h in hosts]
        assert parts[0]["inputs"].shape == (2, 16)
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    ds0 = _build(config, process_index=1, process_count=2)
    evals = _build(config).eval_batches(1)[0]["inputs"]
    np.testing.assert_array_equal(ds0.eval_batches(1)[0]["inputs"], evals[4:8])


# --------------------------------------------------------------------------- caching


def test_second_build_uses_caches(config, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _build(config)
    cache = pathlib.Path(config.cache_dir)
    tok_files = list((cache / "tokenizers").glob("*.json"))
    token_files = sorted((cache / "tokens").glob("*.npy"))
    assert len(tok_files) == 1 and len(token_files) == 2
    mtimes = {p: p.stat().st_mtime_ns for p in [*tok_files, *token_files]}

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: retrained or re-tokenized")

    monkeypatch.setattr(tokenizer_lib, "train_bpe", fail)
    monkeypatch.setattr(data, "tokenize_to_streams", fail)
    second = _build(config)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert second.tokenizer.identity == first.tokenizer.identity
    np.testing.assert_array_equal(next(second.train)["inputs"], next(first.train)["inputs"])
    # A different vocabulary size is a different cache entry.
    config.vocab_size = VOCAB + 10
    with pytest.raises(AssertionError, match="cache miss"):
        _build(config)


def test_token_cache_dtype(config) -> None:
    _build(config)
    arrays = [np.load(p) for p in (pathlib.Path(config.cache_dir) / "tokens").glob("*.npy")]
    assert all(a.dtype == np.uint16 for a in arrays)


# --------------------------------------------------------------------------- bad input


def test_missing_path_is_named(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        _build(_config(tmp_path, [missing]))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.txt", b"\xff\xfe\xfa not utf-8", "bad.txt: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{broken\n', "bad.jsonl, line 2: invalid JSON"),
        ("field.jsonl", b'{"body": "no text field"}\n', "field.jsonl, line 1: .*'text'"),
        ("bad.csv", b"a,b\n", "Unsupported data file .*bad.csv"),
    ],
)
def test_unreadable_files_are_named(tmp_path: pathlib.Path, name, content, match) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        _build(_config(tmp_path, [path]))


def test_empty_corpus(tmp_path: pathlib.Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="Empty corpus"):
        _build(_config(tmp_path, [tmp_path / "empty.txt"]))


def test_unknown_source(config) -> None:
    config.source = "s3"
    with pytest.raises(ValueError, match="Unknown data source 's3'"):
        _build(config)


def test_check_vocab() -> None:
    data.check_vocab(8192, 8192)
    with pytest.raises(ValueError, match=r"32000 exceeds the model vocab_size 8192"):
        data.check_vocab(32000, 8192)


def test_model_vocab_checked_in_build(config) -> None:
    with pytest.raises(ValueError, match=f"{VOCAB} exceeds the model vocab_size 256"):
        _build(config, model_vocab_size=256)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, "seq_len must be a positive integer, got 0"),
        ({"global_batch_size": -2}, "global_batch_size must be a positive integer, got -2"),
        ({"global_batch_size": 6, "process_count": 4}, "6 is not divisible by process_count 4"),
        ({"seq_len": 100_000}, "cannot fill one sequence of seq_len"),
        ({"global_batch_size": 100_000}, "cannot fill one global batch of 100000"),
    ],
)
def test_bad_shapes(config, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _build(config, **kwargs)


def test_too_little_eval_data(config) -> None:
    config.eval_fraction = 0.001  # Only the one fallback document is held out.
    ds = _build(config, seq_len=64, global_batch_size=2)
    assert ds.num_eval_batches == 0
    with pytest.raises(ValueError, match="Too little held-out data"):
        ds.eval_batches(1)


def test_invalid_iterator_state(config) -> None:
    it = _build(config).train
    state = it.get_state()
    for bad in (
        {"epoch": 0, "index": 0},  # The layout before the grain pipeline.
        {**state, "step": -1},
        {"step": 3, "pipeline": {"no_such_field": 1}},
    ):
        with pytest.raises(ValueError, match="Invalid data iterator state"):
            it.set_state(bad)


def test_bad_tokenizer_file(tmp_path: pathlib.Path, corpus_file: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        _build(_config(tmp_path, [corpus_file], tokenizer=str(tmp_path / "missing.json")))
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json"):
        _build(_config(tmp_path, [corpus_file], tokenizer=str(bad)))


# --------------------------------------------------------------------------- TFDS / C4
# Reading real prepared copies (ArrayRecord and TFRecord) is tested in test_streaming.py.


def _tfds_config(tmp_path: pathlib.Path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    cfg = data_config()
    cfg.source = "tfds"
    cfg.tfds_name = "c4/en"
    cfg.data_dir = str(data_dir)
    cfg.vocab_size = VOCAB
    cfg.eval_fraction = 0.2
    cfg.cache_dir = str(tmp_path / "cache")
    return cfg


def test_c4_not_prepared_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(
        ValueError, match=r"Cannot read TFDS dataset 'c4/en'.*data_dir=.*not prepared there"
    ):
        _build(_tfds_config(tmp_path))


def test_unregistered_tfds_builder_names_the_extra(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("tensorflow_datasets")
    cfg = _tfds_config(tmp_path)
    cfg.tfds_name = "no_such_dataset/en"
    with pytest.raises(ImportError, match=r"'no_such_dataset/en'.*golore-jax\[c4\]"):
        _build(cfg)


def test_tfds_missing_data_dir(tmp_path: pathlib.Path) -> None:
    cfg = _tfds_config(tmp_path)
    cfg.data_dir = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        _build(cfg)


# --------------------------------------------------------------------------- a single .txt file


@pytest.mark.parametrize("eval_fraction", [0.01, 0.05, 0.5])
def test_single_txt_file_holds_out_its_last_tokens(tmp_path: pathlib.Path, eval_fraction) -> None:
    """One .txt file is one document (txt_split='file', the default): fewer than
    1 / eval_fraction documents, so the last ceil(eval_fraction * tokens) tokens are held out
    and the rest trains. Before, the file went whole to one side: no held-out data, or (its
    hash below eval_fraction, e.g. after raising eval_fraction) an empty training set."""
    text = "\n".join(_documents(600))
    path = tmp_path / "book.txt"
    path.write_text(text)
    ds = _build(_config(tmp_path, [path], eval_fraction=eval_fraction), global_batch_size=2)
    ids = ds.tokenizer.encode_batch([text])[0]
    stream = np.asarray([*ids, ds.tokenizer.eos_id])
    held = math.ceil(eval_fraction * stream.size)
    assert (ds.num_train_tokens, ds.num_eval_tokens) == (stream.size - held, held)
    np.testing.assert_array_equal(ds.eval_rows(None), data.pack(stream[-held:], 16))
    trains_on = {tuple(r[:-1]) for r in data.pack(stream[:-held], 16)}
    assert {tuple(r) for _ in range(5) for r in next(ds.train)["inputs"]} <= trains_on
    assert len(ds.eval_batches(1)) == 1


def test_few_documents_hold_out_by_tokens_many_by_document(tmp_path: pathlib.Path) -> None:
    """The switch is at 1 / eval_fraction documents: 9 documents at eval_fraction 0.1 split by
    tokens (the tail of the corpus), 400 by document hash (whole documents)."""
    tok = tokenizer_lib.train_bpe(_documents(400), VOCAB)
    few = _documents(9)
    train, held = data.tokenize_to_streams(few, tok, 0.1)
    stream = np.concatenate([np.asarray([*ids, tok.eos_id]) for ids in tok.encode_batch(few)])
    np.testing.assert_array_equal(np.concatenate([train, held]), stream)
    assert held.size == math.ceil(0.1 * stream.size)
    many = _documents(400)
    train, held = data.tokenize_to_streams(many, tok, 0.1)
    expected = [d for d in many if data.is_eval_document(d, 0.1)]
    encoded = [np.asarray([*ids, tok.eos_id]) for ids in tok.encode_batch(expected)]
    np.testing.assert_array_equal(held, np.concatenate(encoded))


def test_streamed_single_txt_file_names_the_options_that_work(tmp_path: pathlib.Path) -> None:
    """Streaming holds out whole documents: with one document a side would be empty (training
    skipped every document, forever): one line naming the two options that work."""
    path = tmp_path / "book.txt"
    path.write_text("\n".join(_documents(50)))
    with pytest.raises(ValueError, match=r"1 document\(s\) are too few for data.eval_fraction=0.5"):
        _build(_config(tmp_path, [path], eval_fraction=0.5, stream_files=True))
    split = _config(tmp_path, [path], eval_fraction=0.5, stream_files=True, txt_split="blank_lines")
    path.write_text("\n\n".join(_documents(50)))
    assert len(_build(split, global_batch_size=2).eval_batches(1)) == 1


def test_single_txt_file_trains_with_the_default_data_keys(tmp_path: pathlib.Path) -> None:
    """The trainer on one .txt file with data.txt_split and data.eval_fraction (0.01) at their
    defaults: 2 steps, held-out loss at steps 0 and 2 from the file's last 1% of tokens."""
    from tests.train_fixtures import tiny_config, write_corpus
    from train import main as main_lib

    config = tiny_config(tmp_path, num_steps=2, eval_every=2, checkpoint_every=2, eval_batches=1)
    defaults = data_config()
    config.data.paths = [str(write_corpus(tmp_path / "one", documents=1000))]
    config.data.txt_split, config.data.eval_fraction = defaults.txt_split, defaults.eval_fraction
    assert (config.data.txt_split, config.data.eval_fraction) == ("file", 0.01)
    result = main_lib.train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == 2 and (result["first_eval_step"], result["eval_step"]) == (0, 2)
    assert math.isfinite(result["train_loss"]) and result["eval_loss"] < result["first_eval_loss"]
