"""MJSD / MTAD: multi-token joint speculative decoding (Qin et al. 2024, 2025), algorithms.md section 4.

The draft decodes gamma tokens with W beams (the draft KV cache fanned out to W rows, reordered by parent beam each
step) and keeps the beam with the highest joint Q. One target call scores it; the longest prefix with
logP - logQ > log(tau) is accepted, followed by one target token (argmax at T = 0, else a sample of the filtered
target distribution, not the residual). Not distribution-preserving by design: it trades exactness for a higher
joint likelihood. `mjsd` runs beam search; `mtad` beam sampling, or beam search in deterministic mode (T = 0).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..joint import (accept_length, beam_sample_step, beam_sample_top, beam_search_step, beam_search_top,
                     scoring_logprobs, token_logprobs)
from ..sampling import shared_vocab
from ..scoring import scorer
from .common import DecodeContext


def score(ctx: DecodeContext, logits: np.ndarray) -> np.ndarray:
    c = ctx.cfg
    return scoring_logprobs(shared_vocab(logits, ctx.vocab_size), c.temperature, c.top_k, c.top_p)


def beam_step(ctx: DecodeContext, logits: np.ndarray, cum: list[float], greedy: int, sampling: bool):
    """One beam step from the live beams' next-token logits [B, V']: beam search (deterministic), or beam sampling
    over each beam's scoring distribution. Scores each beam's best children (or its top-k support) in one ONNX
    Runtime call (scoring.py); top-p without top-k needs whole rows, in NumPy. Returns lists (parents, tokens, new
    cum, the picked children's logQ) and the new greedy beam."""
    c, width, vocab = ctx.cfg, ctx.cfg.beam_width, ctx.vocab_size
    if whole_vocab_search(ctx, sampling):  # deterministic scoring is at temperature 1 (joint.scoring_logprobs)
        values, tokens = scorer().beam(logits, vocab, width)
    elif 0 < c.top_k < vocab:
        values, tokens = scorer().top_k(logits, vocab, c.temperature or 1.0, c.top_k, c.top_p)
    else:
        logq = score(ctx, logits)
        if sampling:
            parents, toks, new_cum, greedy = beam_sample_step(ctx.rng, np.array(cum), np.exp(logq), width, greedy)
        else:
            parents, toks, new_cum, greedy = beam_search_step(np.array(cum), logq, width, greedy)
        return parents.tolist(), toks.tolist(), new_cum.tolist(), logq[parents, toks].tolist(), greedy
    if sampling:
        return beam_sample_top(ctx.rng, cum, values, tokens, width, greedy)
    return beam_search_top(cum, values, tokens, width, greedy)


def draft_logprobs(ctx: DecodeContext, logits: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """The target's scoring log-likelihood of each draft token [S], given its logits at those positions [S, V']."""
    c, vocab = ctx.cfg, ctx.vocab_size
    if 0 < c.top_k < vocab:  # a token outside a row's top-k support scores -inf
        values, tokens = scorer().top_k(logits, vocab, c.temperature or 1.0, c.top_k, c.top_p)
        return np.array([dict(zip(ids, v)).get(t, -np.inf) for v, ids, t in zip(values, tokens, draft.tolist())])
    if c.top_p >= 1.0:
        return np.array(scorer().token_logprobs(logits, vocab, c.temperature or 1.0, draft))
    return token_logprobs(score(ctx, logits), draft)


def draft_beams(ctx: DecodeContext, sampling: bool) -> tuple[np.ndarray, np.ndarray]:
    """Beam-decode up to gamma (ctx.draft_len()) draft tokens; returns the best beam [n] and its per-position logQ [n].
    Stops early (adaptive draft length) once the best beam's last token had draft probability below
    cfg.draft_p_min: acceptance of what would follow is unlikely. Leaves the draft cache at that beam's row (its last
    token unfed). The beams are Python lists: a few short rows update faster as lists than as NumPy arrays."""
    cache, p_min, width = ctx.draft_cache, ctx.cfg.draft_p_min, ctx.cfg.beam_width
    head = uses_beam_head(ctx, sampling)
    feed = [ctx.unfed(cache)]
    beams, logqs, cum, greedy = [[]], [[]], [0.0], 0  # the live beams: tokens, their logQ, joint logQ
    for n in range(ctx.draft_len()):
        if n:
            cache.gather(parents)
        if head:  # the draft call returns each beam's best children itself
            values, ids = ctx.draft.forward_top(feed, cache, min(width, ctx.vocab_size), ctx.banned(beams))
            parents, tokens, cum, picked, greedy = beam_search_top(cum, values, ids, width, greedy)
        else:  # the session's own logits (copy=False): banned in place and scored before the next draft call
            logits = ctx.no_repeat(ctx.draft.forward(feed, cache, copy=False, last=1)[:, -1], beams)
            parents, tokens, cum, picked, greedy = beam_step(ctx, logits, cum, greedy, sampling)
        beams = [beams[p] + [t] for p, t in zip(parents, tokens)]
        logqs = [logqs[p] + [x] for p, x in zip(parents, picked)]
        feed = [[t] for t in tokens]
        if p_min and draft_should_stop(cum, picked, p_min):
            break
    best = cum.index(max(cum))
    cache.gather([parents[best]])
    return np.array(beams[best], np.int64), np.array(logqs[best])


def whole_vocab_search(ctx: DecodeContext, sampling: bool) -> bool:
    """Beam search over the log-softmax of the whole vocabulary (no top-k / top-p filter): what the scoring graph's
    beam route and the draft's beam head compute."""
    c = ctx.cfg
    return not sampling and c.top_p >= 1.0 and not 0 < c.top_k < ctx.vocab_size


def uses_beam_head(ctx: DecodeContext, sampling: bool) -> bool:
    """Whether beam steps run on the draft graph's beam head (export/fused_graph.py): a whole-vocabulary beam search
    on a draft whose logits are exactly the shared vocabulary."""
    return (ctx.draft.beam_head and whole_vocab_search(ctx, sampling)
            and ctx.draft.spec.vocab_size == ctx.vocab_size)


def draft_should_stop(cum_logq: list[float], last_logq: list[float], p_min: float) -> bool:
    """Adaptive draft length: stop when the best beam (highest joint Q) drew its last token with probability below
    p_min (llama.cpp's --draft-p-min, on the beam the target will score)."""
    return last_logq[cum_logq.index(max(cum_logq))] < math.log(p_min)


def joint_rounds(ctx: DecodeContext, sampling: bool) -> Iterator[list[int]]:
    while True:
        base = len(ctx.ids)  # accepted text incl. the pending token
        draft, logq = draft_beams(ctx, sampling)  # cfg is read every round: a tuner may change it between rounds
        gamma = len(draft)
        fed = ctx.unfed(ctx.target_cache) + draft.tolist()
        # the session's own logits (copy=False): banned in place and read before the next target call
        logits = ctx.target.forward(fed, ctx.target_cache, copy=False)[0, -(gamma + 1):]
        logits = ctx.no_repeat_prefixes(logits, draft)
        n = accept_length(draft_logprobs(ctx, logits[:gamma], draft), logq, ctx.cfg.tau)
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
