"""MJSD / MTAD: multi-token joint speculative decoding (Qin et al. 2024, 2025), algorithms.md section 4.

The draft decodes gamma tokens with W beams (the draft KV cache fanned out to W rows, reordered by parent beam each
step) and keeps the beam with the highest joint Q. One target call scores it; the longest prefix with
logP - logQ > log(tau) is accepted, followed by one target token (argmax at T = 0, else a sample of the filtered
target distribution, not the residual). Not distribution-preserving by design: it trades exactness for a higher
joint likelihood. `mjsd` runs beam search; `mtad` beam sampling, or beam search in deterministic mode (T = 0).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..joint import accept_length, beam_sample_step, beam_search_step, scoring_logprobs, token_logprobs
from ..sampling import shared_vocab
from .common import DecodeContext


def score(ctx: DecodeContext, logits: np.ndarray, compact: bool = False):
    c = ctx.cfg
    return scoring_logprobs(shared_vocab(logits, ctx.vocab_size), c.temperature, c.top_k, c.top_p, compact)


def draft_beams(ctx: DecodeContext, sampling: bool) -> tuple[np.ndarray, np.ndarray]:
    """Beam-decode up to gamma (ctx.draft_len()) draft tokens; returns the best beam [n] and its per-position logQ [n].
    Stops early (adaptive draft length) once the best beam's last token had draft probability below
    cfg.draft_p_min: acceptance of what would follow is unlikely. Leaves the draft cache at that beam's row (its last
    token unfed)."""
    cache, width, p_min, gamma = ctx.draft_cache, ctx.cfg.beam_width, ctx.cfg.draft_p_min, ctx.draft_len()
    feed = [ctx.unfed(cache)]
    beams, logq_hist = np.zeros((width, gamma), np.int64), np.zeros((width, gamma))  # rows: the live beams
    cum, greedy, n = np.zeros(1), 0, 0
    while n < gamma:
        if n:
            cache.gather(parents)
        logits = ctx.no_repeat(ctx.draft.forward(feed, cache)[:, -1], beams[: len(cum), :n])
        if sampling:  # over each beam's top-k support when top-k filters (ids: its columns' tokens)
            logq, ids = score(ctx, logits, compact=True)
            parents, cols, cum, greedy = beam_sample_step(ctx.rng, cum, np.exp(logq), width, greedy)
            tokens = cols if ids is None else ids[parents, cols]
        else:
            logq = score(ctx, logits)
            parents, cols, cum, greedy = beam_search_step(cum, logq, width, greedy)
            tokens = cols
        k = len(parents)
        beams[:k, :n], logq_hist[:k, :n] = beams[parents, :n], logq_hist[parents, :n]
        beams[:k, n], logq_hist[:k, n] = tokens, logq[parents, cols]
        feed, n = tokens[:, None], n + 1
        if p_min and draft_should_stop(cum, logq_hist[:k, n - 1], p_min):
            break
    best = int(np.argmax(cum))
    cache.gather([parents[best]])
    return beams[best, :n], logq_hist[best, :n]


def draft_should_stop(cum_logq: np.ndarray, last_logq: np.ndarray, p_min: float) -> bool:
    """Adaptive draft length: stop when the best beam (highest joint Q) drew its last token with probability below
    p_min (llama.cpp's --draft-p-min, on the beam the target will score)."""
    return bool(last_logq[int(np.argmax(cum_logq))] < np.log(p_min))


def joint_rounds(ctx: DecodeContext, sampling: bool) -> Iterator[list[int]]:
    while True:
        base = len(ctx.ids)  # accepted text incl. the pending token
        draft, logq = draft_beams(ctx, sampling)  # cfg is read every round: a tuner may change it between rounds
        gamma = len(draft)
        logits = ctx.target.forward(ctx.unfed(ctx.target_cache) + draft.tolist(), ctx.target_cache)[0, -(gamma + 1):]
        logits = ctx.no_repeat(logits, [draft[:j] for j in range(gamma + 1)])
        n = accept_length(token_logprobs(score(ctx, logits[:gamma]), draft), logq, ctx.cfg.tau)
        token = ctx.pick(logits[n])
        ctx.target_cache.crop(base + n)
        ctx.draft_cache.crop(min(ctx.draft_cache.length, base + n))
        ctx.stats.record_round(gamma, n)
        new = draft[:n].tolist() + [token]
        ctx.ids += new
        yield new


def mjsd(ctx: DecodeContext) -> Iterator[list[int]]:
    return joint_rounds(ctx, sampling=False)


def mtad(ctx: DecodeContext) -> Iterator[list[int]]:
    return joint_rounds(ctx, sampling=ctx.cfg.temperature > 0)
