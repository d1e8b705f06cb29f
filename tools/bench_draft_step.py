"""Where an MTAD draft step's time goes, measured inside real rounds (BENCHMARKS.md "Fifth pass", "Sixth pass").

    flock /tmp/mjsd-bench.lock python tools/bench_draft_step.py [--temperature 0] [--limit 16] [-n 64] [--bundle B]

Runs MTAD generations with the shipped defaults (online tuning off, so every run drafts alike) on the held-out
prompts, once to warm up and twice measured, and reports per draft step (us, wall clock, within draft phases only):
the draft model's ORT call (on the beam graph, its beam head included, where greedy steps run on it), the Python
around it (ModelSession.forward / forward_top minus the call), the beam reorder (KVCache.gather), the n-gram ban
(its banned lists, and writing them into the logits where the scoring graph scores them), the scoring graph call
(runtime/scoring.py), the ranking of the children (joint.beam_*_top) and the rest; and the target's ORT time per
round. Timings wrap the functions the loop calls, so the loop itself runs unchanged (the
wrappers add ~1 us a call).
"""
from __future__ import annotations

import argparse
import importlib
import time
from collections import Counter

from mjsd.runtime import scoring, session
from mjsd.runtime.bench import load_prompts
from mjsd.runtime.decoding import common
from mjsd.runtime.decoding.common import DecodeContext
from mjsd.runtime.engine import Engine
from mjsd.runtime.kvcache import KVCache


def timed(owner, name: str, key: str, totals: Counter, counts: Counter, inside: list | None = None) -> None:
    """Wrap owner.name so that its wall time adds to totals[key] and its calls to counts[key] (with `inside`: only
    while inside[0] is set, i.e. within a draft phase, not in a prompt pass)."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            if inside is None or inside[0]:
                totals[key] += time.perf_counter() - t0
                counts[key] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    session.share_thread_pool()  # as the CLI runs
    engine = Engine.from_bundle(args.bundle, threads=args.threads, meter=None)
    mjsd = importlib.import_module("mjsd.runtime.decoding.mjsd")
    totals, counts, inside = Counter(), Counter(), [False]
    draft_beams = mjsd.draft_beams

    def draft_phase(ctx, sampling):
        inside[0], t0, ort0 = True, time.perf_counter(), engine.draft.time_s
        try:
            return draft_beams(ctx, sampling)
        finally:
            inside[0] = False
            totals["draft phase"] += time.perf_counter() - t0
            totals["draft ORT"] += engine.draft.time_s - ort0

    mjsd.draft_beams = draft_phase
    timed(engine.draft, "forward", "draft forward", totals, counts, inside)
    timed(engine.draft, "forward_top", "draft forward", totals, counts, inside)
    timed(KVCache, "gather", "beam reorder", totals, counts, inside)
    timed(DecodeContext, "banned", "banned lists", totals, counts, inside)
    timed(common, "ban_tokens", "ban into logits", totals, counts, inside)
    timed(scoring.Scorer, "_run", "scoring graphs", totals, counts, inside)
    for name in ("beam_search_top", "beam_sample_top", "beam_search_step", "beam_sample_step"):
        timed(mjsd, name, "ranking", totals, counts, inside)
    kw = dict(algo="mtad", max_new_tokens=args.max_new_tokens, ignore_eos=True, tune=False,
              temperature=args.temperature, seed=1)
    if args.temperature:
        kw.update(top_k=10, top_p=0.9)
    prompts = load_prompts(limit=args.limit)
    for p in prompts:
        engine.generate(p, **kw)
    totals.clear()
    counts.clear()
    stats = [engine.generate(p, **kw).stats for _ in range(2) for p in prompts]

    steps, rounds = counts["draft forward"], sum(s.rounds for s in stats)
    per_step = {
        "draft ORT call": totals["draft ORT"],
        "around the call": totals["draft forward"] - totals["draft ORT"],
        "beam reorder": totals["beam reorder"],
        "n-gram ban: banned lists": totals["banned lists"],
        "n-gram ban: into the logits": totals["ban into logits"],
        "scoring graph": totals["scoring graphs"],
        "ranking the children": totals["ranking"],
    }
    per_step["the rest"] = totals["draft phase"] - sum(per_step.values())
    per_step["draft phase, all of it"] = totals["draft phase"]
    print(f"MTAD T={args.temperature:g}, {len(stats)} generations x {args.max_new_tokens} tokens: {rounds} rounds, "
          f"{steps / rounds:.1f} draft steps and {sum(s.generated_tokens for s in stats) / rounds:.2f} tokens a round")
    for name, seconds in per_step.items():
        print(f"  {name:30s} {seconds / steps * 1e6:7.1f} us a step")
    target_s = sum(s.target_time_s for s in stats) / rounds  # prompt passes included
    print(f"  target ORT time {target_s * 1e3:.2f} ms a round (its prompt passes included)")


if __name__ == "__main__":
    main()
