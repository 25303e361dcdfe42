"""The sampled corpus (train/sampled.py): its floor, its sampler and its pipeline."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from configs.base import data_config
from train import data as data_lib
from train import sampled


def tiny_source(vocab: int = 4, length: int = 80, min_count: int = 2, seed: int = 0):
    """A source fitted on a random stream with some structure (token 0 every 7th: EOS)."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, vocab, length)
    stream[::7] = 0
    return sampled.fit(stream, vocab_size=vocab, eos_id=0, min_count=min_count)


def test_every_line_is_a_distribution_and_entropies_match_dense_lines():
    src = tiny_source()
    assert src.num_contexts > 0  # both kinds of state exist
    h2, h3 = src.state_entropies()
    for state in range(src.vocab_size + src.num_contexts):
        p = src.probs(state)
        assert np.all(p > 0)
        assert abs(p.sum() - 1) < 1e-12  # fp64 sums of <= 4 terms
        h = -np.sum(p * np.log(p))
        got = h2[state] if state < src.vocab_size else h3[state - src.vocab_size]
        assert abs(got - h) < 1e-12


def test_floor_equals_brute_force_over_every_sequence():
    """Every sequence of 5 tokens over a 4-token vocabulary (1,024), with its probability from
    the dense lines: the exact mean per-token entropy of a row equals the floor, which comes
    from the sparse entropies and the propagated state distribution."""
    src = tiny_source()
    length = 6  # EOS + 5 sampled tokens
    entropy, total = 0.0, 0.0
    for seq in itertools.product(range(src.vocab_size), repeat=length - 1):
        state, log_p = src.eos_id, 0.0
        for c in seq:
            log_p += math.log(src.probs(state)[c])
            state = int(src.next_state(np.array([state]), np.array([c]))[0])
        total += math.exp(log_p)
        entropy -= math.exp(log_p) * log_p
    assert abs(total - 1) < 1e-12
    floor = src.floor(length)
    # fp64 over 1,024 terms of size <= 1: error << 1e-12.
    assert abs(floor["floor"] - entropy / (length - 1)) < 1e-12
    assert len(floor["per_position"]) == length - 1


def test_rows_depend_only_on_seed_stream_and_index():
    src = tiny_source(vocab=6, length=200)
    a = src.sample_rows(3, 0, np.arange(10), 30)
    assert a.shape == (10, 30) and a.dtype == np.int32
    assert np.all(a[:, 0] == src.eos_id)
    np.testing.assert_array_equal(a, src.sample_rows(3, 0, np.arange(10), 30))
    # Row 7 alone, or among other rows, is the same row.
    np.testing.assert_array_equal(a[7:8], src.sample_rows(3, 0, np.array([7]), 30))
    np.testing.assert_array_equal(a[[9, 2]], src.sample_rows(3, 0, np.array([9, 2]), 30))
    # Another seed or stream gives other rows (30 tokens of 6 symbols: equal with p ~ 6^-29).
    assert not np.array_equal(a, src.sample_rows(4, 0, np.arange(10), 30))
    assert not np.array_equal(a, src.sample_rows(3, 1, np.arange(10), 30))


def _chi_square_quantile(df: int, z: float) -> float:
    """Wilson-Hilferty: the chi-square(df) quantile at the standard normal quantile z
    (relative error below 1% in the upper tail for df >= 10)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def _chi_square(observed: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom over one state's cells, cells expected
    fewer than 5 times lumped together (into the smallest other cell if still < 5)."""
    small = expected < 5
    obs, exp = list(observed[~small]), list(expected[~small])
    if small.any():
        rest_o, rest_e = observed[small].sum(), expected[small].sum()
        if rest_e >= 5 or not exp:
            obs.append(rest_o)
            exp.append(rest_e)
        else:
            i = int(np.argmin(exp))
            obs[i] += rest_o
            exp[i] += rest_e
    obs, exp = np.array(obs, float), np.array(exp, float)
    return float(np.sum((obs - exp) ** 2 / exp)), len(exp) - 1


def test_sampled_transitions_follow_the_source():
    """Pearson's chi-square over every (state, next token) cell of 1,500 rows x 40 tokens,
    against each state's line; rejecting at the chi-square quantile of 1 - 1e-6 (z = 4.753),
    a correct sampler fails for a random seed with probability ~1e-6 (the seed is fixed, so
    the test is deterministic). The same counts against a wrong line (every trigram state
    given its bigram line) must be rejected: the test has power at this size."""
    src = tiny_source(vocab=5, length=300, min_count=3, seed=1)
    rows = src.sample_rows(11, 0, np.arange(1500), 41)
    states = src.row_states(rows).ravel()
    tokens = rows[:, 1:].ravel().astype(np.int64)
    v = src.vocab_size
    stat = wrong = 0.0
    df = wrong_df = 0
    for state in np.unique(states):
        mask = states == state
        observed = np.bincount(tokens[mask], minlength=v).astype(float)
        n = observed.sum()
        s, d = _chi_square(observed, n * src.probs(int(state)))
        stat, df = stat + s, df + d
        bigram = int(state) if state < v else int(src.ctx_b[state - v])
        s, d = _chi_square(observed, n * src.probs(bigram))
        wrong, wrong_df = wrong + s, wrong_df + d
    assert df >= 20
    assert stat < _chi_square_quantile(df, 4.753), (stat, df)
    assert wrong > _chi_square_quantile(wrong_df, 4.753), (wrong, wrong_df)


def test_oracle_loss_of_sampled_rows_matches_the_floor():
    """The source's mean log-loss on its own rows estimates the floor: within 5 standard
    errors (the rows are independent; the error is estimated from their per-row means)."""
    src = tiny_source(vocab=6, length=400, min_count=2, seed=2)
    rows = src.sample_rows(5, 0, np.arange(3000), 25)
    per_row = -src.token_log_probs(rows).mean(axis=1)
    stderr = per_row.std(ddof=1) / math.sqrt(per_row.shape[0])
    assert abs(per_row.mean() - src.floor(25)["floor"]) < 5 * stderr


def test_push_conserves_mass():
    src = tiny_source(vocab=6, length=400, min_count=2, seed=3)
    m2 = np.random.default_rng(0).random(src.vocab_size)
    m3 = np.random.default_rng(1).random(src.num_contexts)
    total = m2.sum() + m3.sum()
    n2, n3 = src.push(m2, m3)
    assert abs(n2.sum() + n3.sum() - total) < 1e-12 * total * 10


def _batches(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_train_pipeline_resumes_exactly_and_hosts_are_disjoint():
    src = tiny_source(vocab=6, length=200)
    one = data_lib.TrainIterator(
        data_lib.sampled_train_dataset(
            src, seq_len=8, global_batch_size=4, seed=5, rows=slice(0, 4)
        ),
        batches_per_epoch=None,
    )
    reference = _batches(one, 5)
    # Each of 2 hosts samples its half of every global batch, and nothing else.
    hosts = [
        data_lib.TrainIterator(
            data_lib.sampled_train_dataset(
                src, seq_len=8, global_batch_size=4, seed=5, rows=data_lib.host_slice(4, p, 2)
            ),
            batches_per_epoch=None,
        )
        for p in range(2)
    ]
    per_host = [_batches(h, 5) for h in hosts]
    for j in range(5):
        np.testing.assert_array_equal(
            np.concatenate([per_host[0][j]["inputs"], per_host[1][j]["inputs"]]),
            reference[j]["inputs"],
        )
        np.testing.assert_array_equal(
            reference[j]["inputs"][:, 1:], reference[j]["targets"][:, :-1]
        )
    # Resume: a fresh iterator set to the position after 2 batches yields batches 3..5.
    fresh = data_lib.TrainIterator(
        data_lib.sampled_train_dataset(
            src, seq_len=8, global_batch_size=4, seed=5, rows=slice(0, 4)
        ),
        batches_per_epoch=None,
    )
    again = data_lib.TrainIterator(
        data_lib.sampled_train_dataset(
            src, seq_len=8, global_batch_size=4, seed=5, rows=slice(0, 4)
        ),
        batches_per_epoch=None,
    )
    _batches(again, 2)
    fresh.set_state(again.get_state())
    for j, batch in enumerate(_batches(fresh, 3)):
        np.testing.assert_array_equal(batch["inputs"], reference[2 + j]["inputs"])


def test_build_datasets_sampled_on_a_slice_of_the_default_corpus(tmp_path):
    """The whole path on 0.05 MB of GCIDE: fit, cache, floor, held-out stream, batches."""
    pytest.importorskip("dictionary")
    cfg = data_config()
    cfg.source = "sampled"
    cfg.vocab_size = 300
    cfg.max_corpus_mb = 0.05
    cfg.tokenizer_train_mb = 0.05
    cfg.cache_dir = str(tmp_path)
    kwargs = dict(seq_len=16, global_batch_size=4, seed=0)
    ds = data_lib.build_datasets(cfg, **kwargs)
    assert ds.loss_floor is not None and 0 < ds.loss_floor < math.log(ds.vocab_size)
    assert list((tmp_path / "ngram").glob("*.npz"))
    eval_batches = ds.eval_batches(2)
    assert len(eval_batches) == 2 and eval_batches[0]["inputs"].shape == (4, 16)
    first = next(ds.train)
    # The held-out stream is another stream: not the training rows.
    assert not np.array_equal(first["inputs"], eval_batches[0]["inputs"])
    # A second build reads the cache and gives the same batches, floor and held-out rows.
    ds2 = data_lib.build_datasets(cfg, **kwargs)
    assert ds2.loss_floor == ds.loss_floor
    np.testing.assert_array_equal(next(ds2.train)["inputs"], first["inputs"])
    np.testing.assert_array_equal(ds2.eval_batches(2)[1]["targets"], eval_batches[1]["targets"])
    oracle = ds.oracle_loss(8)
    assert np.isfinite(oracle) and oracle > 0


def test_bad_min_count_names_the_key(tmp_path):
    cfg = data_config()
    cfg.source = "sampled"
    cfg.ngram_min_count = 0
    cfg.cache_dir = str(tmp_path)
    with pytest.raises(ValueError, match=r"data\.ngram_min_count"):
        data_lib.build_datasets(cfg, seq_len=8, global_batch_size=2, seed=0)


def test_figure3_sampled_config_is_the_papers_recipe():
    """configs/figure3_sampled.py passes the trainer's checks and is Appendix E's run."""
    from configs import figure3_sampled
    from train import main as main_lib

    c = figure3_sampled.get_config()
    main_lib.validate_config(c)
    assert (c.data.source, c.num_steps, c.batch_size, c.seq_len) == ("sampled", 10_000, 128, 256)
    assert (c.model.hidden_size, c.model.num_layers, c.model.vocab_size) == (512, 8, 32000)
    sub = c.optimizer.subspace
    assert (c.optimizer.learning_rate, sub.rank, sub.scale, sub.update_every) == (1e-3, 128, 1, 200)
    assert (c.optimizer.inner.name, c.model.dtype) == ("adamw", "bfloat16")
    assert c.mechanism.grad_noise_every % c.log_every == 0 and c.mechanism.subspace_overlap
