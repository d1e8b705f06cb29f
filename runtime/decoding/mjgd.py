"""MJGD: multi-token joint greedy decoding, the exhaustive oracle (algorithms.md section 3).

Each round appends argmax over y in V^k of prod_j p(y_j | x, y_<j), k = gamma, scored with the target's real
(temperature 1, filtered) likelihoods. One target call covers all V^k sequences: V^(k-1) batch rows feed the pending
token and every (k-1)-token prefix; the last position's full distribution scores the k-th token. Tiny vocabularies
only (tests): larger V^k is refused.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import ConfigError
from ..joint import best_joint, joint_prefixes
from .common import DecodeContext
from .mjsd import score


def mjgd(ctx: DecodeContext) -> Iterator[list[int]]:
    # checked when the driver creates the generator, before any round
    if ctx.cfg.temperature != 0:
        raise ConfigError(f"mjgd is the deterministic joint-greedy oracle: set temperature=0 "
                          f"(got {ctx.cfg.temperature}), or use mtad to sample")
    return _rounds(ctx, joint_prefixes(ctx.vocab_size, ctx.cfg.gamma))


def _rounds(ctx: DecodeContext, prefixes: np.ndarray) -> Iterator[list[int]]:
    k, rows = prefixes.shape[1] + 1, len(prefixes)  # fixed for the whole generation, like the prefix table
    while True:
        feed = np.column_stack([np.tile(ctx.unfed(ctx.target_cache), (rows, 1)), prefixes])
        ctx.target_cache.repeat(rows)
        logits = ctx.target.forward(feed, ctx.target_cache)[:, -k:]
        row, tokens, _ = best_joint(score(ctx, logits), prefixes)
        ctx.target_cache.gather([row])  # holds the pending token and y_1..y_{k-1}; y_k is the new pending token
        ctx.stats.record_round(0, 0)
        new = tokens.tolist()
        ctx.ids += new
        yield new
