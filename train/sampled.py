"""An endless corpus sampled from a trigram source, with its exact loss floor.

``data.source='sampled'`` trains on token rows drawn on the fly from a trigram model fitted on
the tokenized default corpus (GCIDE). The stream never repeats, has the corpus's statistics up
to three tokens (nothing longer: it is not natural text beyond that), and its Bayes-optimal
next-token loss is computed exactly, so a run's held-out loss has a known floor.

**The source.** Interpolated absolute discounting (Ney, Essen & Kneser 1994), with Kneser-Ney's
continuation unigram at the base, over the cyclic token stream (each document followed by EOS;
the stream wraps so that every token has a successor):

    p(c | a b) = max(n(abc) - D3, 0) / n(ab)  +  l(ab) p2(c | b)       if n(ab) >= min_count
    p2(c | b)  = max(n(bc) - D2, 0) / n(b)    +  l(b)  pc(c)
    pc(c)      = N1+(. c) / N1+(. .)                                 (distinct predecessors)

with ``l(ab) = D3 N1+(ab .) / n(ab)`` and ``l(b) = D2 N1+(b .) / n(b)`` (the discounted mass,
so each line sums to one), ``D = n1 / (n1 + 2 n2)`` per order from the counts of n-grams seen
once and twice, and ``l(b) = 1`` for a token never seen as a context. Trigram contexts seen
fewer than ``min_count`` times are pruned: there the bigram line is used. This defines a
finite-state chain whose state is the longest kept suffix of the history: the trigram context
``(a, b)`` when kept, else the bigram context ``(b)``; it is a function of the last two tokens.

**The rows.** Every row of ``seq_len + 1`` tokens starts with EOS in state ``(EOS)`` (a
document start) and then samples ``seq_len`` tokens. Row ``i`` of stream ``s`` under seed
``seed`` draws its uniforms from a counter-based hash of ``(seed, s, i, position, draw)``
(splitmix64), so a row depends on nothing but its index: global batch ``j`` holds rows
``[j B, (j + 1) B)``, each process samples its own contiguous part of them (disjoint), and a
restored run continues exactly. Training uses stream 0 under ``config.seed``; the held-out rows
are stream 1 under seed 0 for every run (the same evaluation for every seed and method).

**The floor.** Given the row's tokens up to position ``t`` the optimal predictor knows the
state ``s_t`` exactly, so the least expected loss at target position ``t`` is
``E[H(p(. | s_t))]``, the state distribution being propagated forward from ``(EOS)``. The
floor of a row is the mean of these over its ``seq_len`` targets (exact for what is sampled,
start transient included); the last position's value approaches the stationary entropy rate.
Entropies of the smoothed lines are computed without touching all ``V`` tokens: a line equals
``l * (lower line)`` outside its observed support, whose entropy is known.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import time
from collections.abc import Callable

import numpy as np

from train import atomic

# Bump when the fit, the sampler or the cached layout changes.
SOURCE_VERSION = "trigram-kn-v1"
TRAIN_STREAM, EVAL_STREAM = 0, 1
EVAL_SEED = 0
_U53 = 2.0**-53
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a bijective 64-bit mixer."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniforms(
    seed: int, stream: int, indices: np.ndarray, length: int, draws: int
) -> np.ndarray:
    """Uniforms in [0, 1) of shape ``[len(indices), length, draws]``: entry ``(r, t, j)`` is a
    hash of ``(seed, stream, indices[r], t, j)`` alone (a counter-based generator)."""
    key = _splitmix(_splitmix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF)) ^ np.uint64(stream))
    rows = _splitmix(key ^ _splitmix(np.asarray(indices, np.uint64)))
    counters = np.arange(length * draws, dtype=np.uint64).reshape(1, length, draws)
    with np.errstate(over="ignore"):
        bits = _splitmix(rows[:, None, None] ^ _splitmix(counters + np.uint64(0x632BE59BD9B4E019)))
    return (bits >> np.uint64(11)).astype(np.float64) * _U53


def _kn_discount(counts: np.ndarray) -> float:
    """Ney's estimate D = n1 / (n1 + 2 n2), clipped into [0.1, 0.9] (tiny corpora)."""
    n1, n2 = int(np.sum(counts == 1)), int(np.sum(counts == 2))
    d = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    return float(min(max(d, 0.1), 0.9))


def _bincount(index: np.ndarray, weights: np.ndarray, length: int) -> np.ndarray:
    """``np.bincount`` with float output also when empty (numpy returns int64 then)."""
    return np.bincount(index, weights, length).astype(np.float64)


def _row_cumsum_keys(row_of_entry: np.ndarray, probs: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """``row + cumulative probability within the row``, rows normalised, each row's last key
    exactly ``row + 1``: one sorted array where ``searchsorted(keys, row + u, 'right')`` draws
    an entry of ``row`` for ``u`` in [0, 1)."""
    rows = ptr.shape[0] - 1
    row_sum = _bincount(row_of_entry, probs, rows)
    cum = np.cumsum(probs / np.where(row_sum > 0, row_sum, 1.0)[row_of_entry])
    before = np.concatenate([[0.0], cum])[ptr[:-1]]  # cumulative total before each row
    keys = row_of_entry + (cum - before[row_of_entry])
    nonempty = ptr[1:] > ptr[:-1]
    last = ptr[1:][nonempty] - 1
    keys[last] = row_of_entry[last] + 1.0
    return keys


@dataclasses.dataclass
class TrigramSource:
    """A fitted trigram source (the arrays of ``fit``); see the module docstring."""

    vocab_size: int
    eos_id: int
    d2: float
    d3: float
    pc: np.ndarray  # [V] continuation unigram
    ptr2: np.ndarray  # [V + 1] bigram lines (CSR over the context token b)
    col2: np.ndarray  # [E2] successor tokens, sorted within a line
    disc2: np.ndarray  # [E2] max(n(bc) - D2, 0) / n(b)
    lam2: np.ndarray  # [V] backoff weight l(b)
    ctx_a: np.ndarray  # [K] kept trigram contexts (a, b), sorted by a V + b
    ctx_b: np.ndarray  # [K]
    ptr3: np.ndarray  # [K + 1]
    col3: np.ndarray  # [E3]
    disc3: np.ndarray  # [E3] max(n(abc) - D3, 0) / n(ab)
    lam3: np.ndarray  # [K]

    # ------------------------------------------------------------------ derived tables

    def __post_init__(self) -> None:
        v = self.vocab_size
        self.row2 = np.repeat(np.arange(v), np.diff(self.ptr2))
        self.row3 = np.repeat(np.arange(self.ctx_a.shape[0]), np.diff(self.ptr3))
        self.ctx_key = self.ctx_a.astype(np.int64) * v + self.ctx_b
        self.key2 = self.row2.astype(np.int64) * v + self.col2  # sorted
        self.key3 = self.row3.astype(np.int64) * v + self.col3  # sorted
        # Sampling: the three levels' lines in one table of rows (trigram lines 0..K-1, bigram
        # lines K + b, the base line K + V), each row's entries keyed by ``row + cumulative
        # probability``; a guide table (Chen's indexed search) per row of m entries points
        # bucket j to the first entry whose key exceeds row + j / m, so a draw reads its
        # bucket and walks forward ~1 entry instead of a binary search over the whole table.
        k_count = self.ctx_a.shape[0]
        ptr_all = np.concatenate(
            [self.ptr3[:-1], self.ptr3[-1] + self.ptr2[:-1], [self.ptr3[-1] + self.ptr2[-1]]]
        )
        ptr_all = np.concatenate([ptr_all, [ptr_all[-1] + v]])
        row_all = np.repeat(np.arange(k_count + v + 1), np.diff(ptr_all))
        probs = np.concatenate([self.disc3, self.disc2, self.pc])
        self._keys = _row_cumsum_keys(row_all, probs, ptr_all)
        self._ptr = ptr_all
        self._len = np.diff(ptr_all)
        bucket = np.arange(ptr_all[-1]) - ptr_all[row_all]
        self._guide = np.searchsorted(
            self._keys, row_all + bucket / self._len[row_all], side="right"
        ).astype(np.int64)
        self._col = np.concatenate([self.col3, self.col2, np.arange(v)]).astype(np.int64)
        # Bigram entry of each trigram entry (b, c): (a b c) seen implies (b c) seen.
        self.tri_to_bi = self._find(
            self.key2, self.ctx_b[self.row3].astype(np.int64) * v + self.col3
        )
        if np.any(self.tri_to_bi < 0):
            raise ValueError("trigram entry without its bigram entry (corrupt source)")
        # The kept context reached by emitting c after a line's context: (b, c) or -1.
        self.bi_next = self._find(self.ctx_key, self.key2)
        # Per state (bigram states b, then trigram states V + k): its last token, its trigram
        # backoff weight (1 for bigram states: they always take the bigram line).
        self._last_token = np.concatenate([np.arange(v), self.ctx_b]).astype(np.int64)
        self._state_lam3 = np.concatenate([np.ones(v), self.lam3])
        self.tri_next = self._find(
            self.ctx_key, self.ctx_b[self.row3].astype(np.int64) * v + self.col3
        )
        self._next_all = np.concatenate([self.tri_next, self.bi_next, np.full(v, -1)])

    @staticmethod
    def _find(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Index of each query in ``sorted_keys``, or -1."""
        if sorted_keys.shape[0] == 0:
            return np.full(np.shape(queries), -1, np.int64)
        pos = np.searchsorted(sorted_keys, queries)
        pos_c = np.minimum(pos, sorted_keys.shape[0] - 1)
        return np.where(sorted_keys[pos_c] == queries, pos_c, -1).astype(np.int64)

    @property
    def num_contexts(self) -> int:
        return int(self.ctx_a.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}

    # ------------------------------------------------------------------ state transitions

    def next_state(self, state: np.ndarray, token: np.ndarray) -> np.ndarray:
        """States are ``b`` (the bigram context, in [0, V)) or ``V + k`` (kept trigram context
        ``k``); emitting ``token`` moves to ``(b, token)`` when kept, else to ``token``."""
        v = self.vocab_size
        last = np.where(state < v, state, self.ctx_b[np.maximum(state - v, 0)])
        k = self._find(self.ctx_key, last.astype(np.int64) * v + token)
        return np.where(k >= 0, v + k, token)

    def probs(self, state: int) -> np.ndarray:
        """The dense next-token distribution of one state (tests and small sources)."""
        v = self.vocab_size
        b = state if state < v else int(self.ctx_b[state - v])
        p2 = self.lam2[b] * self.pc.copy()
        lo, hi = self.ptr2[b], self.ptr2[b + 1]
        p2[self.col2[lo:hi]] += self.disc2[lo:hi]
        if state < v:
            return p2
        k = state - v
        p = self.lam3[k] * p2
        lo, hi = self.ptr3[k], self.ptr3[k + 1]
        p[self.col3[lo:hi]] += self.disc3[lo:hi]
        return p

    # ------------------------------------------------------------------ sampling

    def sample_rows(self, seed: int, stream: int, indices: np.ndarray, length: int) -> np.ndarray:
        """Rows ``indices`` of a stream: ``[len(indices), length]`` int32, each starting with
        EOS in state (EOS) and then sampled; row ``i`` depends only on ``(seed, stream, i)``."""
        indices = np.asarray(indices, np.int64)
        n, v = indices.shape[0], self.vocab_size
        # Uniforms, position-major so each step reads contiguous memory.
        u = np.ascontiguousarray(row_uniforms(seed, stream, indices, length, 3).transpose(1, 2, 0))
        out = np.empty((length, n), np.int32)
        out[0] = self.eos_id
        state = np.full(n, self.eos_id, np.int64)
        last, lam3, k_count = self._last_token, self._state_lam3, self.num_contexts
        keys, guide, ptr, size, col = self._keys, self._guide, self._ptr, self._len, self._col
        ctx_key, n_ctx = self.ctx_key, max(k_count - 1, 0)  # n_ctx: the last context index
        # next_all[e]: the kept context reached by the entry's token (-1: none; the base
        # line's entries are looked up, as their context token varies).
        next_all = self._next_all
        base_row = k_count + v
        for t in range(1, length):
            u3, u2, draw = u[t]
            b = last[state]
            use3 = u3 >= lam3[state]  # lam3 is 1 for bigram states: never true there
            use2 = u2 >= self.lam2[b]
            row = np.where(use3, state - v, np.where(use2, k_count + b, base_row))
            key = row + draw
            j = np.minimum((draw * size[row]).astype(np.int64), size[row] - 1)
            e = guide[ptr[row] + j]
            behind = keys[e] <= key
            while behind.any():  # ~1 step on average
                e += behind
                behind = keys[e] <= key
            token = col[e]
            out[t] = token
            nxt = next_all[e]
            base = row == base_row
            if base.any() and ctx_key.size:
                query = b[base] * v + token[base]
                pos = np.minimum(np.searchsorted(ctx_key, query), n_ctx)
                nxt[base] = np.where(ctx_key[pos] == query, pos, -1)
            state = np.where(nxt >= 0, v + nxt, token)
        return np.ascontiguousarray(out.T)

    def row_states(self, rows: np.ndarray) -> np.ndarray:
        """The state before each token of ``rows`` after the first (``[n, length - 1]``)."""
        n, length = rows.shape
        states = np.empty((n, length - 1), np.int64)
        state = np.full(n, self.eos_id, np.int64)
        for t in range(length - 1):
            states[:, t] = state
            state = self.next_state(state, rows[:, t + 1].astype(np.int64))
        return states

    def token_log_probs(self, rows: np.ndarray) -> np.ndarray:
        """``log p(rows[:, t + 1] | state_t)`` under the source: the oracle's loss on rows."""
        v = self.vocab_size
        states = self.row_states(rows)
        tokens = rows[:, 1:].astype(np.int64)
        tri = states >= v
        k = np.where(tri, states - v, 0)
        b = np.where(tri, self.ctx_b[k], states)
        j2 = self._find(self.key2, b * v + tokens)
        p2 = self.lam2[b] * self.pc[tokens] + np.where(j2 >= 0, self.disc2[np.maximum(j2, 0)], 0.0)
        j3 = self._find(self.key3, k * v + tokens)
        d3 = np.where(j3 >= 0, self.disc3[np.maximum(j3, 0)], 0.0)
        p = np.where(tri, d3 + self.lam3[k] * p2, p2)
        return np.log(p)

    # ------------------------------------------------------------------ entropy

    def state_entropies(self) -> tuple[np.ndarray, np.ndarray]:
        """(H of every bigram state [V], H of every trigram state [K]) in nats."""

        def plogp(p: np.ndarray) -> np.ndarray:
            return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)

        pc_log = plogp(self.pc)
        h_c = -pc_log.sum()
        v = self.vocab_size
        # Bigram line b: p2 = disc2 + l pc on its entries, l pc elsewhere.
        pc_e = self.pc[self.col2]
        p2_e = self.disc2 + self.lam2[self.row2] * pc_e
        in_p = _bincount(self.row2, pc_e, v)
        in_plogp = _bincount(self.row2, pc_log[self.col2], v)
        lam = self.lam2
        log_lam = np.log(np.where(lam > 0, lam, 1.0))
        outside = lam * (log_lam * (1.0 - in_p) + (-h_c - in_plogp))
        h2 = -_bincount(self.row2, plogp(p2_e), v) - outside
        # Trigram line k over context b: p3 = disc3 + l3 p2 on its entries, l3 p2 elsewhere.
        k_count = self.num_contexts
        p2_t = p2_e[self.tri_to_bi]
        p3_e = self.disc3 + self.lam3[self.row3] * p2_t
        in_p2 = _bincount(self.row3, p2_t, k_count)
        in_p2log = _bincount(self.row3, plogp(p2_t), k_count)
        lam3 = self.lam3
        log_lam3 = np.log(np.where(lam3 > 0, lam3, 1.0))
        outside3 = lam3 * (log_lam3 * (1.0 - in_p2) + (-h2[self.ctx_b] - in_p2log))
        h3 = -_bincount(self.row3, plogp(p3_e), k_count) - outside3
        return h2, h3

    def push(self, m2: np.ndarray, m3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One step of the state chain: masses over (bigram states, trigram states) -> next."""
        v, k_count = self.vocab_size, self.num_contexts
        f3 = m3[self.row3] * self.disc3  # sparse trigram flow into (b_k, c)
        lam_b = m2 + _bincount(self.ctx_b, m3 * self.lam3, v)  # mass reaching line b
        f2 = lam_b[self.row2] * self.disc2
        beta = lam_b * self.lam2  # mass reaching the base from line b
        total_beta = beta.sum()
        n3 = np.zeros(k_count)
        hit = self.tri_next >= 0
        n3 += _bincount(self.tri_next[hit], f3[hit], k_count)
        hit2 = self.bi_next >= 0
        n3 += _bincount(self.bi_next[hit2], f2[hit2], k_count)
        # Kept context (b, c) = (ctx_a, ctx_b) also receives the base's share from line b.
        n3 += beta[self.ctx_a] * self.pc[self.ctx_b]
        n2 = _bincount(self.col3[~hit], f3[~hit], v) + _bincount(self.col2[~hit2], f2[~hit2], v)
        base_to_kept = _bincount(self.ctx_b, beta[self.ctx_a], v)
        n2 += self.pc * (total_beta - base_to_kept)
        return np.maximum(n2, 0.0), n3

    def floor(self, length: int) -> dict[str, float | list[float]]:
        """The per-position least expected loss of rows of ``length`` tokens (``length - 1``
        targets), from the start state (EOS), and its mean: the loss floor in nats."""
        h2, h3 = self.state_entropies()
        m2 = np.zeros(self.vocab_size)
        m3 = np.zeros(self.num_contexts)
        m2[self.eos_id] = 1.0
        per_position = []
        for _ in range(length - 1):
            per_position.append(float(m2 @ h2 + m3 @ h3))
            m2, m3 = self.push(m2, m3)
        return {
            "floor": float(np.mean(per_position)),
            "last_position": per_position[-1],
            "per_position": per_position,
        }


def fit(stream: np.ndarray, *, vocab_size: int, eos_id: int, min_count: int) -> TrigramSource:
    """Fits the source on a token stream (treated as cyclic); see the module docstring."""
    if min_count < 1:
        raise ValueError(f"data.ngram_min_count must be >= 1, got {min_count}")
    x = np.asarray(stream, np.int64)
    if x.ndim != 1 or x.shape[0] < 3:
        raise ValueError(f"need a token stream of at least 3 tokens, got shape {x.shape}")
    if x.min() < 0 or x.max() >= vocab_size:
        raise ValueError(f"token ids outside [0, {vocab_size})")
    v = vocab_size
    y, z = np.roll(x, -1), np.roll(x, -2)
    # Bigram counts n(bc) and context counts n(b).
    key2, n_bc = np.unique(x * v + y, return_counts=True)
    b_of, c_of = key2 // v, key2 % v
    d2 = _kn_discount(n_bc)
    n_b = np.bincount(b_of, n_bc, v)
    types_b = np.bincount(b_of, minlength=v).astype(np.float64)
    pred_c = np.bincount(c_of, minlength=v).astype(np.float64)  # N1+(. c)
    pc = pred_c / pred_c.sum()
    safe_nb = np.where(n_b > 0, n_b, 1.0)
    disc2 = np.maximum(n_bc - d2, 0.0) / safe_nb[b_of]
    lam2 = np.where(n_b > 0, d2 * types_b / safe_nb, 1.0)
    ptr2 = np.concatenate([[0], np.cumsum(np.bincount(b_of, minlength=v))])
    # Trigram counts, on kept contexts only.
    keep_ctx = n_bc >= min_count
    ctx_keys = key2[keep_ctx]
    ctx_counts = n_bc[keep_ctx].astype(np.float64)
    ab = x * v + y
    kept_pos = np.isin(ab, ctx_keys, assume_unique=False)
    ctx_index = np.searchsorted(ctx_keys, ab[kept_pos])
    tri_keys, n_abc = np.unique(ctx_index * v + z[kept_pos], return_counts=True)
    k_of, c3 = tri_keys // v, tri_keys % v
    d3 = _kn_discount(n_abc) if n_abc.size else 0.5
    disc3 = np.maximum(n_abc - d3, 0.0) / ctx_counts[k_of]
    types_k = np.bincount(k_of, minlength=ctx_keys.shape[0]).astype(np.float64)
    lam3 = d3 * types_k / ctx_counts
    ptr3 = np.concatenate([[0], np.cumsum(np.bincount(k_of, minlength=ctx_keys.shape[0]))])
    return TrigramSource(
        vocab_size=v,
        eos_id=int(eos_id),
        d2=d2,
        d3=d3,
        pc=pc,
        ptr2=ptr2.astype(np.int64),
        col2=c_of.astype(np.int32),
        disc2=disc2,
        lam2=lam2,
        ctx_a=(ctx_keys // v).astype(np.int32),
        ctx_b=(ctx_keys % v).astype(np.int32),
        ptr3=ptr3.astype(np.int64),
        col3=c3.astype(np.int32),
        disc3=disc3,
        lam3=lam3,
    )


def _cache_key(stream_key: str, min_count: int) -> str:
    return hashlib.sha256(f"{SOURCE_VERSION}|{stream_key}|{min_count}".encode()).hexdigest()[:20]


def load_or_fit(
    cache_dir: pathlib.Path,
    stream_key: str,
    stream: Callable[[], np.ndarray],
    *,
    vocab_size: int,
    eos_id: int,
    min_count: int,
) -> TrigramSource:
    """The fitted source, from ``cache_dir/ngram/`` when cached (an .npz of its arrays);
    ``stream`` (called only when not cached) returns the tokens to fit on."""
    key = _cache_key(stream_key, min_count)
    path = cache_dir / "ngram" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            arrays = {name: f[name] for name in f.files}
        scalars = {n: arrays.pop(n).item() for n in ("vocab_size", "eos_id", "d2", "d3")}
        source = TrigramSource(**scalars, **arrays)
        source.cache_key = key
        return source
    start = time.perf_counter()
    source = fit(stream(), vocab_size=vocab_size, eos_id=eos_id, min_count=min_count)
    logging.info(
        "fitted the trigram source in %.1f s: %d kept contexts, %d trigram and %d bigram entries",
        time.perf_counter() - start,
        source.num_contexts,
        source.col3.shape[0],
        source.col2.shape[0],
    )
    atomic.write(path, lambda f: np.savez(f, **source.arrays()), binary=True)
    source.cache_key = key
    return source


def load_or_floor(cache_dir: pathlib.Path, source: TrigramSource, length: int) -> dict:
    """``source.floor(length)``, cached beside the source's arrays (a JSON file)."""
    key = getattr(source, "cache_key", None)
    path = cache_dir / "ngram" / f"{key}.floor{length}.json"
    if key is not None and path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    floor = source.floor(length)
    logging.info(
        "loss floor of rows of %d tokens: %.4f nats (%.1f s)",
        length,
        floor["floor"],
        time.perf_counter() - start,
    )
    if key is not None:
        atomic.write_text(path, json.dumps(floor))
    return floor
