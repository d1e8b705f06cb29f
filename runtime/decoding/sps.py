"""SpS: exact speculative sampling (Leviathan et al. 2022, Chen et al. 2023).

The draft samples gamma tokens; the target scores all gamma + 1 positions in one call; draft token y_j is accepted
with probability min(1, p_j(y_j) / q_j(y_j)); the first rejection resamples from norm(max(0, p_j - q_j)); if all
are accepted a bonus token comes from p_{gamma+1}. The output follows the target's distribution exactly; at T = 0
(one-hot p and q) it is greedy verification, token-identical to AR greedy.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from ..sampling import sample
from .common import DecodeContext


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)), unnormalised (sample() normalises). Falls back to p where p == q up to rounding."""
    r = np.maximum(p - q, 0.0)
    return r if r.sum() > 0 else p


def sps_verify(p: np.ndarray, q: np.ndarray, draft_tokens: Sequence[int],
               rng: np.random.Generator) -> tuple[int, int]:
    """Speculative-sampling acceptance: p [gamma+1, V] target, q [gamma, V] draft distributions, draft_tokens[j]
    drawn from q[j]. Returns (number of accepted draft tokens, the token that follows them)."""
    for j, y in enumerate(draft_tokens):
        if rng.random() * q[j, y] >= p[j, y]:  # reject with probability 1 - min(1, p/q)
            return j, sample(residual(p[j], q[j]), rng)
    return len(draft_tokens), sample(p[len(draft_tokens)], rng)


def sps(ctx: DecodeContext) -> Iterator[list[int]]:
    while True:
        gamma = ctx.cfg.gamma  # read every round: the power controller may change it between rounds
        base = len(ctx.ids)  # accepted text incl. the pending token
        drafts, q = [], []
        feed = ctx.unfed(ctx.draft_cache)
        for _ in range(gamma):
            qj = ctx.dist(ctx.draft.forward(feed, ctx.draft_cache)[0, -1])
            feed = [sample(qj, ctx.rng)]
            drafts += feed
            q.append(qj)
        logits = ctx.target.forward(ctx.unfed(ctx.target_cache) + drafts, ctx.target_cache)
        n, token = sps_verify(ctx.dist(logits[0, -(gamma + 1):]), np.stack(q), drafts, ctx.rng)
        # keep the accepted prefix; the draft never saw its last token, so its cache may be shorter already
        ctx.target_cache.crop(base + n)
        ctx.draft_cache.crop(min(ctx.draft_cache.length, base + n))
        ctx.stats.record_round(gamma, n)
        new = drafts[:n] + [token]
        ctx.ids += new
        yield new
