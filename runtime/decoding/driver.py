"""The generation driver: prefill, the round loop of one algorithm, EOS / max_new_tokens / stop strings, timing.

`stream_ids` yields each round's new tokens (already cut at EOS, the token limit or a stop string) and fills a
GenerationStats; `generate_ids` collects them.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from ..config import GenerationConfig
from ..errors import ConfigError, ContextLengthError
from ..session import ModelSession
from ..stats import GenerationStats
from .common import DecodeContext

TARGET_ONLY = ("ar", "mjgd")  # algorithms that need no draft model


def check_context(prompt_len: int, cfg: GenerationConfig, max_context: int) -> None:
    """Refuse up front a generation that could outgrow the context: the last round may start with
    prompt + max_new_tokens - 1 tokens and then fill `cfg.lookahead` more positions."""
    need = prompt_len + cfg.max_new_tokens - 1 + cfg.lookahead
    if need > max_context:
        fits = max_context - prompt_len - cfg.lookahead + 1
        longest = max_context - cfg.lookahead  # prompt tokens that leave room for one new token
        if fits >= 1:
            hint = f"at most max_new_tokens={fits} fit with this prompt"
        elif longest >= 1:
            hint = f"shorten the prompt to at most {longest} tokens"
        else:
            hint = (f"{cfg.algo}'s lookahead alone exceeds the context: lower gamma / beam_width / k_config or "
                    "use algo='ar'")
        raise ContextLengthError(
            f"prompt of {prompt_len} tokens + max_new_tokens={cfg.max_new_tokens} (+{cfg.lookahead} lookahead "
            f"positions for {cfg.algo}) needs {need} positions but the model context is {max_context}: {hint}")


def stream_ids(target: ModelSession, prompt_ids: Sequence[int], cfg: GenerationConfig, stats: GenerationStats, *,
               draft: ModelSession | None = None, vocab_size: int | None = None, eos_id: int | None = None,
               decode: Callable[[list[int]], str] | None = None, phase: Callable[[str], None] | None = None,
               tune: Callable[[DecodeContext, list[int] | None], None] | None = None) -> Iterator[list[int]]:
    """Generate with `cfg.algo`, yielding the new token ids of each round.

    vocab_size: the shared vocabulary (bundle.vocab_size; default the target's logit width). eos_id: stop after
    this token (kept in the output) unless cfg.ignore_eos. decode: ids -> text, required for cfg.stop.
    phase: called with "prefill" and "decode" as they begin (energy accounting). tune: called before the first
    round (with None) and after each round (with its tokens); it may replace ctx.cfg's gamma / beam_width, which
    the algorithms read at the start of every round (the power controller).
    """
    from . import ALGORITHMS

    vocab_size = vocab_size or target.spec.vocab_size
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token (e.g. the BOS token)")
    if not all(0 <= t < vocab_size for t in prompt):
        raise ConfigError(f"prompt token ids must lie in 0..{vocab_size - 1} (the shared vocabulary)")
    if cfg.algo not in TARGET_ONLY and draft is None:
        raise ConfigError(f"algo={cfg.algo!r} needs a draft model; use algo='ar' for the target alone")
    if cfg.stop and decode is None:
        raise ConfigError("stop strings need a decode function (a tokenizer) to find them in the output")
    models = _models(cfg, target, draft)
    check_context(len(prompt), cfg, min(m.spec.max_context for m in models))

    stats.algo, stats.prompt_tokens = cfg.algo, len(prompt)
    t_start = time.perf_counter()
    if phase:
        phase("prefill")
    timed_draft = draft if len(models) == 2 and draft is not target else None
    mark = _mark(target, timed_draft)
    try:
        ctx = prefill(target, prompt, cfg, stats, draft=draft, vocab_size=vocab_size)
        ctx.eos_id = None if cfg.ignore_eos else eos_id
    finally:
        _charge(stats, target, timed_draft, mark)
    stats.prefill_time_s = time.perf_counter() - t_start
    if phase:
        phase("decode")
    if tune:
        tune(ctx, None)
    rounds = ALGORITHMS[cfg.algo](ctx)
    out: list[int] = []
    try:
        while not stats.finish_reason:
            ctx.remaining = cfg.max_new_tokens - len(out)
            mark = _mark(target, timed_draft)
            try:
                new = next(rounds)
            finally:
                _charge(stats, target, timed_draft, mark)
            new, stats.finish_reason = _cut(new, out, cfg, None if cfg.ignore_eos else eos_id, decode)
            if not out:
                stats.ttft_s = time.perf_counter() - t_start
            out += new
            stats.generated_tokens = len(out)
            if tune:
                tune(ctx, new)
            yield new
    finally:
        rounds.close()
        stats.wall_time_s = time.perf_counter() - t_start
        stats.decode_time_s = stats.wall_time_s - stats.prefill_time_s
        for model, cache in ((ctx.target, ctx.target_cache), (ctx.draft, ctx.draft_cache)):
            if cache is not None:  # the next generation reuses the buffers
                model.release(cache)


def _mark(target: ModelSession, draft: ModelSession | None) -> tuple:
    return target.time_s, target.calls, (draft.time_s, draft.calls) if draft is not None else None


def _charge(stats: GenerationStats, target: ModelSession, draft: ModelSession | None, mark: tuple) -> None:
    """Add the sessions' run time and calls since `mark` to stats. Counted per round, not over the whole
    generation: other generations' rounds may run between two of ours (Engine turns) on the same sessions."""
    stats.target_time_s += target.time_s - mark[0]
    stats.target_calls += target.calls - mark[1]
    if draft is not None:
        stats.draft_time_s += draft.time_s - mark[2][0]
        stats.draft_calls += draft.calls - mark[2][1]


def _models(cfg: GenerationConfig, target: ModelSession, draft: ModelSession | None) -> list[ModelSession]:
    return [target] + ([draft] if draft is not None and cfg.algo not in TARGET_ONLY else [])


def prefill(target: ModelSession, prompt: list[int], cfg: GenerationConfig, stats: GenerationStats, *,
            draft: ModelSession | None = None, vocab_size: int | None = None) -> DecodeContext:
    """New caches holding all prompt tokens but the last, which is the first round's pending token. For AR the target
    takes the whole prompt instead, and its last logits give the first token (one call fewer, as every AR runtime)."""
    cfg = cfg.resolved()
    ctx = DecodeContext(target=target, target_cache=target.new_cache(), cfg=cfg, stats=stats,
                        rng=np.random.default_rng(cfg.seed), vocab_size=vocab_size or target.spec.vocab_size,
                        ids=list(prompt))
    if len(_models(cfg, target, draft)) == 2:
        ctx.draft, ctx.draft_cache = draft, draft.new_cache()
    # A prompt pass needs AR's last logits row, and none for the others: last=1 (a fused graph then runs its lm_head
    # on one position) and copy=False (copying [1, S, V], ~2 MB for 115 tokens, cost ~1 ms of a ~14 ms pass)
    if cfg.algo == "ar":
        ctx.next_logits = target.forward(prompt, ctx.target_cache, copy=False, last=1)[0, -1].copy()
        return ctx
    for m, c in ((ctx.target, ctx.target_cache), (ctx.draft, ctx.draft_cache)):
        if m is not None and len(prompt) > 1:
            m.forward(prompt[:-1], c, copy=False, last=1)
    return ctx


def _cut(new: list[int], out: list[int], cfg: GenerationConfig, eos_id: int | None,
         decode: Callable[[list[int]], str] | None) -> tuple[list[int], str]:
    """Cut a round's tokens at EOS (kept), at max_new_tokens, or after the token that completes a stop string."""
    reason = ""
    if eos_id is not None and eos_id in new:
        new, reason = new[: new.index(eos_id) + 1], "eos"
    if len(out) + len(new) >= cfg.max_new_tokens:
        new, reason = new[: cfg.max_new_tokens - len(out)], reason or "length"
    if cfg.stop:
        # a stop string spans at most len(stop) tokens, so decoding a tail that long before the round suffices
        tail = out[max(0, len(out) - max(map(len, cfg.stop))):]
        for n in range(1, len(new) + 1):
            if any(s in decode(tail + new[:n]) for s in cfg.stop):
                return new[:n], "stop"
    return new, reason


def generate_ids(target: ModelSession, prompt_ids: Sequence[int], cfg: GenerationConfig, *,
                 draft: ModelSession | None = None, vocab_size: int | None = None, eos_id: int | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> tuple[list[int], GenerationStats]:
    """Generate and return (new token ids, statistics)."""
    stats = GenerationStats()
    ids = [t for new in stream_ids(target, prompt_ids, cfg, stats, draft=draft, vocab_size=vocab_size,
                                   eos_id=eos_id, decode=decode) for t in new]
    return ids, stats
