"""Multi-token joint decoding math (MJGD, MJSD/MTAD): pure NumPy, no ONNX Runtime.

A draft y_1..y_gamma is scored by joint log-likelihoods logP(y_1..s) = sum_{j<=s} log p~_j(y_j) (and logQ alike);
the draft side picks it by beam search (deterministic) or beam sampling (MTAD) over cumulative logQ.
Beam steps work on a flattened (beam, token) table: index i stands for beam i // V extended by token i % V.
"""
from __future__ import annotations

import bisect
import itertools

import numpy as np

from .errors import ConfigError
from .sampling import log_probs

# The draft scores its beam one token at a time in a W-row batch, the target in one call: float32 noise between the
# two (measured up to 3.5e-5 over 4 tokens, 32000-wide logits) must not reject a draft equal to the target at tau = 1.
# Allowed per scored token; negligible beside any useful log(tau) (log 0.9 = -0.105).
LOG_TOL = 1e-3
# MJGD scores every sequence of V^k; beyond this it is no longer a test oracle but a hang.
MAX_JOINT_SEQUENCES = 1 << 16


def scoring_logprobs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
                     compact: bool = False):
    """The log-likelihoods joint decoding scores with: the filtered distribution, at temperature 1 in deterministic
    mode (T = 0 only chooses tokens; one-hot scores would collapse the rule into plain greedy verification).
    compact: (log-likelihoods [..., k], token ids [..., k]) of the top-k support, or (dense, None) without top-k."""
    return log_probs(logits, temperature or 1.0, top_k, top_p, compact)


def token_logprobs(logprobs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log p(token) at each position: logprobs [..., S, V], tokens [..., S] -> [..., S]."""
    return np.take_along_axis(logprobs, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def accept_length(logp: np.ndarray, logq: np.ndarray, tau: float) -> int:
    """The longest s with logP(y_1..s) - logQ(y_1..s) > log(tau), 0 if none; a shorter failing prefix does not stop
    the search. logp, logq: per-position log-likelihoods [gamma] of the draft tokens."""
    with np.errstate(invalid="ignore"):  # -inf - -inf is NaN, which fails like -inf
        margin = np.cumsum(logp, dtype=np.float64) - np.cumsum(logq, dtype=np.float64)
        passing = np.flatnonzero(margin > np.log(tau) - LOG_TOL * np.arange(1, margin.size + 1))
    return int(passing[-1]) + 1 if passing.size else 0


def _keep_greedy(picked: list[int], greedy_beam: int, greedy_pair: int) -> tuple[list[int], int]:
    """Make sure the greedy chain's extension (greedy_pair: the greedy beam's argmax token, as a flat index) is among
    the picked pairs (replacing the last pick); returns the pairs and the greedy chain's new beam index (-1 once
    lost). A single beam is left alone: beam search of width 1 is the greedy chain anyway, and beam sampling of width
    1 is a sampled chain."""
    if greedy_beam < 0:
        return picked, -1
    if greedy_pair in picked:
        return picked, picked.index(greedy_pair)
    if len(picked) < 2:
        return picked, -1
    return picked[:-1] + [greedy_pair], len(picked) - 1


def top_indices(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest entries along the last axis, largest first (the first index on ties); n must not
    exceed the number of entries above -inf. For the few beams or children a draft keeps, repeated argmax is far
    cheaper than a partition (0.01 ms vs 2 ms over 4 x 32000 entries)."""
    if n > 32:
        return np.argsort(-x, axis=-1, kind="stable")[..., :n]
    x, out = np.array(x, dtype=np.float64), np.empty(x.shape[:-1] + (n,), dtype=np.int64)
    for j in range(n):
        out[..., j] = np.argmax(x, axis=-1)
        np.put_along_axis(x, out[..., j, None], -np.inf, axis=-1)
    return out


def beam_search_step(cum_logq: np.ndarray, logq: np.ndarray, width: int, greedy_beam: int):
    """One deterministic beam-search step on cumulative logQ.

    cum_logq [B]: the beams' joint log-likelihoods; logq [B, V]: each beam's next-token log-likelihoods;
    greedy_beam: the beam that is the greedy chain (-1: none), kept among the results.
    Returns (parents [W'], tokens [W'], new cum_logq [W'], new greedy beam), best first, W' = min(width, finite pairs).
    """
    # The `width` best pairs lie among each beam's `width` best children: find those by argmax passes over a copy
    # (each pass blanks its pick), then rank the B x width candidates as Python floats: a draft step runs this 16
    # times a round, and a handful of candidates sort faster in Python than through a dozen NumPy calls. Same result
    # as ranking the whole table (tests/test_joint.py).
    b, v = logq.shape
    rows, work = np.arange(b)[:, None], np.array(logq)
    kids = np.empty((b, min(width, v)), np.int64)
    for j in range(kids.shape[1]):
        kids[:, j] = work.argmax(axis=1)
        work[rows[:, 0], kids[:, j]] = -np.inf
    vals = logq[rows, kids].tolist()
    kid_rows = kids.tolist()
    # best first, the lower (beam, token) index on ties; a set, since a row with fewer finite children than passes
    # repeats one of them
    cand = sorted({(-(c + x), r * v + k) for r, (c, ks, xs) in enumerate(zip(cum_logq.tolist(), kid_rows, vals))
                   for k, x in zip(ks, xs) if x != -np.inf})
    picked, greedy = _keep_greedy([i for _, i in cand[:width]], greedy_beam, greedy_beam * v + kid_rows[greedy_beam][0])
    pairs = [divmod(i, v) for i in picked]
    parents, tokens = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    return parents, tokens, np.array([cum_logq.item(r) + logq.item(r, k) for r, k in pairs]), greedy


def sample_distinct(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """n distinct indices drawn one after another from p [N] (unnormalised) without replacement, each draw
    renormalised over the rest. Draws with replacement and skips repeats (rejection: the same distribution), from one
    CDF; when repeats dominate, zeroes the drawn entries and rebuilds the CDF. Zero-probability indices are never
    drawn, so n must not exceed the number of nonzero entries."""
    p, picked = np.array(p, dtype=np.float64), []
    while len(picked) < n:
        cdf = np.cumsum(p)
        for i in np.searchsorted(cdf, rng.random(4 * n) * cdf[-1], side="right"):
            if i < p.size and i not in picked:  # i == size only when u * total rounds up to total
                picked.append(int(i))
                if len(picked) == n:
                    break
        p[picked] = 0.0
    return np.array(picked, dtype=np.int64)


def beam_sample_step(rng: np.random.Generator, cum_logq: np.ndarray, q: np.ndarray, width: int, greedy_beam: int):
    """One MTAD beam-sampling step: draw `width` distinct (beam, token) pairs from w(b, v) = pi_b * q(v | b), with
    pi = the beams' normalised joint Q (normalising Q, not log Q). The next step renormalises pi over the kept
    pairs, since it recomputes pi from their joint Q. Same arguments and results as `beam_search_step`, with
    q [B, V] the filtered draft probabilities (or [B, k] over each row's support, ascending token ids: the tokens
    returned are then columns); results come in sampled order."""
    v = q.shape[1]
    if q.size <= FEW:  # a draft step's W x top-k support: Python floats, the same draws and results as NumPy's
        pi = np.exp(cum_logq - cum_logq.max())
        picked, greedy_col = _draw_pairs_floats(rng, (pi / pi.sum()).tolist(), q.tolist(), width, greedy_beam)
    else:
        picked, greedy_col = _draw_pairs(rng, cum_logq, q, width, greedy_beam)
    picked, greedy = _keep_greedy(picked, greedy_beam, greedy_beam * v + greedy_col if greedy_beam >= 0 else -1)
    parents, tokens = np.divmod(np.array(picked, dtype=np.int64), v)
    return parents, tokens, cum_logq[parents] + np.log(q[parents, tokens]), greedy


FEW = 256  # at most this many (beam, token) pairs are drawn from on Python floats (a dozen NumPy calls cost more)


def _draw_pairs(rng: np.random.Generator, cum_logq: np.ndarray, q: np.ndarray, width: int,
                greedy_beam: int) -> tuple[list[int], int]:
    """beam_sample_step's draw: the picked flat (beam, token) indices and the greedy beam's argmax column."""
    pi = np.exp(cum_logq - cum_logq.max())
    w = ((pi / pi.sum())[:, None] * q).ravel()
    support = np.flatnonzero(w)  # filtered draft rows keep top-k tokens: draw over those (zeros never change a CDF)
    picked = support[sample_distinct(rng, w[support], min(width, support.size))].tolist()
    return picked, int(np.argmax(q[greedy_beam])) if greedy_beam >= 0 else -1


def _draw_pairs_floats(rng: np.random.Generator, pi: list[float], rows: list[list[float]], width: int,
                       greedy_beam: int) -> tuple[list[int], int]:
    """_draw_pairs on Python floats, given the normalised pi: the same IEEE operations in the same order (float32 q
    widened exactly, sequential cumulative sums), so the same random draws pick the same pairs."""
    v = len(rows[0])
    support = [(r * v + j, p * x) for r, (p, row) in enumerate(zip(pi, rows)) for j, x in enumerate(row)]
    support = [(i, x) for i, x in support if x]
    drawn = _sample_distinct_floats(rng, [x for _, x in support], min(width, len(support)))
    greedy_col = -1
    if greedy_beam >= 0:
        row = rows[greedy_beam]
        greedy_col = row.index(max(row))  # the first index on ties, as argmax
    return [support[i][0] for i in drawn], greedy_col


def _sample_distinct_floats(rng: np.random.Generator, p: list[float], n: int) -> list[int]:
    """sample_distinct on a list of floats (the same draws)."""
    p, picked = list(p), []
    while len(picked) < n:
        cdf = list(itertools.accumulate(p))
        for u in rng.random(4 * n).tolist():
            i = bisect.bisect_right(cdf, u * cdf[-1])
            if i < len(p) and i not in picked:
                picked.append(i)
                if len(picked) == n:
                    break
        for i in picked:
            p[i] = 0.0
    return picked


def joint_prefixes(vocab: int, k: int) -> np.ndarray:
    """Every sequence of k - 1 tokens, [V^(k-1), k-1]: with the last position's full distribution they cover V^k.
    Refuses (ConfigError) when V^k exceeds MAX_JOINT_SEQUENCES."""
    if vocab ** k > MAX_JOINT_SEQUENCES:
        raise ConfigError(f"mjgd would score {vocab}^{k} = {vocab ** k} sequences (vocabulary {vocab}, gamma {k}); "
                          f"it is an oracle for tiny vocabularies: keep vocab^gamma <= {MAX_JOINT_SEQUENCES} "
                          "(lower gamma, or use mjsd)")
    rows = list(itertools.product(range(vocab), repeat=k - 1))
    return np.array(rows, dtype=np.int64).reshape(len(rows), k - 1)


def best_joint(logprobs: np.ndarray, prefixes: np.ndarray) -> tuple[int, np.ndarray, float]:
    """argmax over y of sum_j log p(y_j | x, y_<j), given logprobs [N, k, V] of the N prefix rows [N, k-1].

    Returns (row, tokens [k], joint log-likelihood)."""
    head = token_logprobs(logprobs[:, :-1], prefixes).sum(axis=-1)  # [N]
    total = head[:, None] + logprobs[:, -1]  # [N, V]: prefix row r extended by token v
    row, last = np.unravel_index(int(np.argmax(total)), total.shape)
    return int(row), np.append(prefixes[row], last).astype(np.int64), float(total[row, last])
