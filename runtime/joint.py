"""Multi-token joint decoding math (MJGD, MJSD/MTAD): pure NumPy, no ONNX Runtime.

A draft y_1..y_gamma is scored by joint log-likelihoods logP(y_1..s) = sum_{j<=s} log p~_j(y_j) (and logQ alike);
the draft side picks it by beam search (deterministic) or beam sampling (MTAD) over cumulative logQ.
Beam steps rank or draw (beam, token) pairs: over each beam's few best children or top-k support as Python floats
(`beam_search_top`, `beam_sample_top`), or over a dense [B, V] table (`beam_search_step`, `beam_sample_step`).
"""
from __future__ import annotations

import bisect
import itertools
import math

import numpy as np

from .errors import ConfigError
from .sampling import log_probs

# The draft scores its beam one token at a time in a W-row batch, the target in one call: float32 noise between the
# two (measured up to 3.5e-5 over 4 tokens, 32000-wide logits) must not reject a draft equal to the target at tau = 1.
# Allowed per scored token; negligible beside any useful log(tau) (log 0.9 = -0.105).
LOG_TOL = 1e-3
# MJGD scores every sequence of V^k; beyond this it is no longer a test oracle but a hang.
MAX_JOINT_SEQUENCES = 1 << 16


def scoring_logprobs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The log-likelihoods joint decoding scores with: the filtered distribution, at temperature 1 in deterministic
    mode (T = 0 only chooses tokens; one-hot scores would collapse the rule into plain greedy verification)."""
    return log_probs(logits, temperature or 1.0, top_k, top_p)


def token_logprobs(logprobs: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log p(token) at each position: logprobs [..., S, V], tokens [..., S] -> [..., S]."""
    return np.take_along_axis(logprobs, np.asarray(tokens)[..., None], axis=-1)[..., 0]


def accept_length(logp, logq, tau: float) -> int:
    """The longest s with logP(y_1..s) - logQ(y_1..s) > log(tau) - LOG_TOL * s, 0 if none; a shorter failing prefix
    does not stop the search. logp, logq: per-position log-likelihoods [gamma] of the draft tokens. Python floats:
    the same float64 running sums as NumPy's cumsum, without its ~80 us of small-array calls on cold caches."""
    p, q = np.asarray(logp).tolist(), np.asarray(logq).tolist()
    threshold, sum_p, sum_q, n = float(np.log(tau)), 0.0, 0.0, 0
    for s in range(len(p)):
        sum_p += p[s]
        sum_q += q[s]
        if sum_p - sum_q > threshold - LOG_TOL * (s + 1):  # -inf - -inf is NaN, which fails like -inf
            n = s + 1
    return n


def _keep_greedy(picked: list, greedy_beam: int, greedy_pair) -> tuple[list, int]:
    """Make sure the greedy chain's extension (greedy_pair: the greedy beam's argmax token, written like the picked
    pairs: a (beam, token) tuple or a flat index) is among the picked pairs (replacing the last pick); returns the
    pairs and the greedy chain's new beam index (-1 once lost). A single beam is left alone: beam search of width 1 is the greedy chain anyway, and beam sampling of width
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


def beam_search_top(cum: list[float], values: list[list[float]], tokens: list[list[int]], width: int,
                    greedy_beam: int):
    """One deterministic beam-search step on cumulative logQ, from each beam's best children only: the `width` best
    (beam, token) pairs lie among each beam's `width` best children, and a handful of candidates rank faster as
    Python floats than through NumPy (every draft step runs this).

    cum [B]: the beams' joint log-likelihoods; values[b], tokens[b]: beam b's best children (log-likelihoods and
    token ids, best first; -inf entries are skipped); greedy_beam: the beam that is the greedy chain (-1: none), kept
    among the results. Returns lists (parents, tokens, new cum, the picked children's logQ) and the new greedy beam,
    best first (the lower (beam, token) on ties), at most `width` pairs."""
    logq = {(r, t): x for r, (xs, ts) in enumerate(zip(values, tokens)) for x, t in zip(xs, ts) if x != -math.inf}
    ranked = sorted((-(cum[r] + x), r, t) for (r, t), x in logq.items())
    picked = [(r, t) for _, r, t in ranked[:width]]
    greedy_pair = (greedy_beam, tokens[greedy_beam][0]) if greedy_beam >= 0 else None
    picked, greedy = _keep_greedy(picked, greedy_beam, greedy_pair)
    return _results(picked, cum, logq) + (greedy,)


def beam_sample_top(rng: np.random.Generator, cum: list[float], values: list[list[float]], tokens: list[list[int]],
                    width: int, greedy_beam: int):
    """One MTAD beam-sampling step: draw `width` distinct (beam, token) pairs from w(b, v) = pi_b * q(v | b), with
    pi = the beams' normalised joint Q (normalising Q, not log Q); the next step renormalises pi over the kept
    pairs, since it recomputes pi from their joint Q. values[b], tokens[b]: beam b's support (log q and token ids;
    -inf entries are never drawn), in the order the draw accumulates them. Results as `beam_search_top`'s, in sampled
    order; the greedy chain extends by its beam's most likely token (the first on ties)."""
    top = max(cum)
    pi = [math.exp(c - top) for c in cum]
    total = sum(pi)
    support = [((r, t), x, p / total * math.exp(x)) for r, (p, xs, ts) in enumerate(zip(pi, values, tokens))
               for x, t in zip(xs, ts) if x != -math.inf]
    drawn = _sample_distinct_floats(rng, [w for *_, w in support], min(width, len(support)))
    greedy_pair = None
    if greedy_beam >= 0:
        row = values[greedy_beam]
        greedy_pair = (greedy_beam, tokens[greedy_beam][row.index(max(row))])
    picked, greedy = _keep_greedy([support[i][0] for i in drawn], greedy_beam, greedy_pair)
    return _results(picked, cum, {pair: x for pair, x, _ in support}) + (greedy,)


def _results(picked: list[tuple[int, int]], cum: list[float], logq: dict) -> tuple[list, list, list, list]:
    """(parents, tokens, new cum, the pairs' logQ) of the picked (beam, token) pairs."""
    x = [logq[pair] for pair in picked]
    return [r for r, _ in picked], [t for _, t in picked], [cum[r] + v for (r, _), v in zip(picked, x)], x


def beam_search_step(cum_logq: np.ndarray, logq: np.ndarray, width: int, greedy_beam: int):
    """`beam_search_top` over dense log-likelihoods logq [B, V], as arrays: (parents [W'], tokens [W'], new cum_logq
    [W'], new greedy beam), W' = min(width, finite pairs)."""
    kids = top_indices(logq, min(width, logq.shape[1]))
    vals = np.take_along_axis(logq, kids, axis=-1)
    parents, tokens, cum, _, greedy = beam_search_top(cum_logq.tolist(), vals.tolist(), kids.tolist(), width,
                                                      greedy_beam)
    return np.array(parents, np.int64), np.array(tokens, np.int64), np.array(cum), greedy


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


def _sample_distinct_floats(rng: np.random.Generator, p: list[float], n: int) -> list[int]:
    """sample_distinct on a list of floats (the same draws: the same IEEE operations in the same order)."""
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


def beam_sample_step(rng: np.random.Generator, cum_logq: np.ndarray, q: np.ndarray, width: int, greedy_beam: int):
    """`beam_sample_top` over dense draft probabilities q [B, V] (filtered, unnormalised rows are fine), in NumPy (a
    whole vocabulary per beam is too many pairs for Python floats). Results as `beam_search_step`'s."""
    pi = np.exp(cum_logq - cum_logq.max())
    w = ((pi / pi.sum())[:, None] * q).ravel()
    support = np.flatnonzero(w)  # filtered draft rows keep few tokens: draw over those (zeros never change a CDF)
    picked = support[sample_distinct(rng, w[support], min(width, support.size))].tolist()
    v = q.shape[1]
    greedy_pair = greedy_beam * v + int(np.argmax(q[greedy_beam])) if greedy_beam >= 0 else None
    picked, greedy = _keep_greedy(picked, greedy_beam, greedy_pair)
    parents, tokens = np.divmod(np.array(picked, dtype=np.int64), v)
    return parents, tokens, cum_logq[parents] + np.log(q[parents, tokens]), greedy


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
