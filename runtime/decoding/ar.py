"""AR: plain autoregressive decoding with the target alone (greedy or sampled); the baseline."""
from __future__ import annotations

from collections.abc import Iterator

from .common import DecodeContext


def ar(ctx: DecodeContext) -> Iterator[list[int]]:
    while True:
        logits, ctx.next_logits = ctx.next_logits, None  # prefill's, for the first token
        if logits is None:
            logits = ctx.target.forward(ctx.unfed(ctx.target_cache), ctx.target_cache, copy=False, last=1)[0, -1]
        token = ctx.pick(ctx.no_repeat(logits, [()]))
        ctx.stats.record_round(0, 0)
        ctx.ids.append(token)
        yield [token]
