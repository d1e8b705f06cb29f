"""AR: plain autoregressive decoding with the target alone (greedy or sampled); the baseline.

The prompt pass's last logits give the first token, alone in the first round (time to first token). After it a
round decodes up to cfg.stream_interval tokens before yielding them, so the driver's and the Engine's work per round
(turns, statistics, stop checks) is paid once per few tokens instead of per token (~6 us of Python a token on this
CPU, measured). A round also ends at EOS, at the token limit, and after AR_ROUND_S, so a model slower than that per
token still streams every token as it comes.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from .common import DecodeContext

AR_ROUND_S = 0.01  # the longest a round goes on before it yields its tokens


def ar(ctx: DecodeContext) -> Iterator[list[int]]:
    logits, ctx.next_logits = ctx.next_logits, None
    if logits is not None:
        yield [emit(ctx, logits)]
    while True:
        new, n, end = [], min(ctx.cfg.stream_interval, ctx.remaining), time.perf_counter() + AR_ROUND_S
        while True:
            token = emit(ctx, ctx.target.step(ctx.ids[-1], ctx.target_cache))
            new.append(token)
            if len(new) >= n or token == ctx.eos_id or time.perf_counter() > end:
                break
        yield new


def emit(ctx: DecodeContext, logits: np.ndarray) -> int:
    """The next token from the target's logits after ctx.ids, appended to them: one AR step."""
    token = ctx.pick(ctx.no_repeat(logits, [()]))
    ctx.stats.record_round(0, 0)
    ctx.ids.append(token)
    return token
