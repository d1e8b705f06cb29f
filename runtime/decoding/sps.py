"""SpS: exact speculative sampling (Leviathan et al. 2022, Chen et al. 2023).

The draft samples gamma tokens; the target scores all gamma + 1 positions in one call; draft token y_j is accepted
with probability min(1, p_j(y_j) / q_j(y_j)); the first rejection resamples from norm(max(0, p_j - q_j)); if all
are accepted a bonus token comes from p_{gamma+1}. The output follows the target's distribution exactly.
At T = 0 p and q are one-hot, which makes this greedy verification (token-identical to AR greedy); that case takes
an argmax fast path instead of building one-hot distributions over the vocabulary.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..sampling import greedy, sample, shared_vocab
from .common import DecodeContext


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)), unnormalised (sample() normalises). Falls back to p where p == q up to rounding."""
    r = np.maximum(p - q, 0.0)
    return r if r.sum() > 0 else p


def sps_verify(p: Sequence[np.ndarray], q: Sequence[np.ndarray], draft_tokens: Sequence[int],
               rng: np.random.Generator) -> tuple[int, int]:
    """Speculative-sampling acceptance. p: gamma + 1 target distributions (rows of an array, or LazyRows),
    q: the gamma draft distributions draft_tokens[j] was drawn from. Returns (accepted count, the next token)."""
    for j, y in enumerate(draft_tokens):
        pj = p[j]
        if rng.random() * q[j][y] >= pj[y]:  # reject with probability 1 - min(1, p/q)
            return j, sample(residual(pj, q[j]), rng)
    return len(draft_tokens), sample(p[len(draft_tokens)], rng)


def greedy_verify(target_argmax: Sequence[int], draft_tokens: Sequence[int]) -> tuple[int, int]:
    """sps_verify for one-hot p and q: accept the drafts matching the target's argmax, then take its next argmax."""
    n = 0
    while n < len(draft_tokens) and draft_tokens[n] == target_argmax[n]:
        n += 1
    return n, int(target_argmax[n])


class LazyRows:
    """fn(rows[j]) computed on first access: verification usually stops before needing every position."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], rows: np.ndarray):
        self.fn, self.rows, self.done = fn, rows, {}

    def __getitem__(self, j: int) -> np.ndarray:
        if j not in self.done:
            self.done[j] = self.fn(self.rows[j])
        return self.done[j]


def sps(ctx: DecodeContext) -> Iterator[list[int]]:
    while True:
        gamma, is_greedy = ctx.draft_len(), ctx.cfg.temperature == 0  # per round: a controller may retune gamma
        base = len(ctx.ids)  # accepted text incl. the pending token
        drafts, q = [], []
        feed = ctx.unfed(ctx.draft_cache)
        for _ in range(gamma):
            logits = ctx.no_repeat(ctx.draft.forward(feed, ctx.draft_cache, last=1)[0, -1], [drafts])
            if is_greedy:
                feed = [greedy(shared_vocab(logits, ctx.vocab_size))]
            else:
                q.append(ctx.dist(logits))
                feed = [sample(q[-1], ctx.rng)]
            drafts += feed
        logits = ctx.target.forward(ctx.unfed(ctx.target_cache) + drafts, ctx.target_cache)[0, -(gamma + 1):]
        logits = ctx.no_repeat_prefixes(logits, drafts)
        if is_greedy:
            n, token = greedy_verify(greedy(shared_vocab(logits, ctx.vocab_size)), drafts)
        else:
            n, token = sps_verify(LazyRows(ctx.dist, logits), q, drafts, ctx.rng)
        # keep the accepted prefix; the draft never saw its last token, so its cache may be shorter already
        ctx.target_cache.crop(base + n)
        ctx.draft_cache.crop(min(ctx.draft_cache.length, base + n))
        ctx.stats.record_round(gamma, n)
        new = drafts[:n] + [token]
        ctx.ids += new
        yield new
