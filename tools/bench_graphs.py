"""Per-call cost of two bundles' target graphs on the same weights (e.g. the standard kind vs the fused kind), and
end-to-end decoding with each, interleaved in one process.

    python tools/bench_graphs.py OLD_BUNDLE NEW_BUNDLE [--past 128] [--repeats 200] [--threads 2] [--generate N]
                                 [--algos ar,sps,mtad] [--spinning 0,1]

Per call, after a past of --past tokens (median ms, calls alternating between the bundles): B1T1 (AR, one draft
beam step), B4T1 (4 beams x 1 token), B1T5 (SpS/MTAD verification of gamma 4), a 5-node tree (MMTAD, MCSD tree),
and the cache's 4-row gather (beam reorder). The cache is cropped back after each call, so every call sees the same
past. --generate N: AR/SpS/MTAD generations of 64 tokens on N built-in prompts with each bundle, interleaved prompt by
prompt (runtime/bench.py run_bench), tokens/s and per-call model time. The old bundle runs with --old-spinning (off:
the policy before the fused graphs), the new one with each of --spinning (session.py; "on" spins between calls and
slows every other engine in the process: measure it alone, tools/bench_threads.py). Wrap in `flock /tmp/mjsd-bench.lock`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import time

import numpy as np

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.session import ModelSession

TREE = [-1, 0, 0, 1, 2]


def cases(past: int):
    """name -> (setup(session, cache) -> cache, timed call(session, cache)); the cache holds `past` tokens."""
    def four_rows(s, _):
        c4 = s.new_cache()
        s.forward(_context(past), c4)
        c4.repeat(4)
        return c4

    return {
        "B1T1 (AR, 1 token)": (None, lambda s, c: s.forward([[7]], c)),
        "B4T1 (4 beams x 1 token)": (four_rows, lambda s, c: s.forward([[7]] * 4, c)),
        "B1T5 (verify gamma 4)": (None, lambda s, c: s.forward([[7] * 5], c)),
        "tree of 5 nodes (4-D bias)": (None, lambda s, c: s.forward_tree([7] * 5, TREE, c)),
        "beam reorder (4-row gather)": (four_rows, lambda s, c: c.gather([3, 2, 1, 0])),
    }


def _context(past: int) -> list[int]:
    return np.random.default_rng(0).integers(4, 200, past).tolist()


def per_call(paths: dict[str, str], args) -> dict[str, dict[str, float]]:
    sessions = {k: ModelSession(load_bundle(p).target, threads=args.threads,
                                spinning=args.spinning[0] if k == "new" else args.old_spinning)
                for k, p in paths.items()}
    results = {}
    for case, (setup, call) in cases(args.past).items():
        caches = {}
        for k, s in sessions.items():
            c = s.new_cache()
            s.forward(_context(args.past), c)
            caches[k] = setup(s, c) if setup else c
        times = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for k, s in sessions.items():
                c = caches[k]
                rows, length = c.batch, c.length
                t0 = time.perf_counter()
                call(s, c)
                times[k].append(time.perf_counter() - t0)
                if c.batch != rows:  # undo the gather's row order (same content: every row holds the context)
                    c.batch = rows
                c.crop(length)
        results[case] = {k: round(1e3 * float(np.median(v)), 3) for k, v in times.items()}
        a, b = (results[case][k] for k in paths)
        print(f"{case:<30} " + "  ".join(f"{k} {v:7.3f} ms" for k, v in results[case].items())
              + f"  ({a / b:.2f}x)", flush=True)
    return results


def generate(paths: dict[str, str], args) -> list[dict]:
    """Each algorithm on each bundle (and spinning setting), interleaved over the built-in prompts."""
    from mjsd.runtime.bench import format_table, load_prompts, run_bench
    from mjsd.runtime.config import GenerationConfig
    from mjsd.runtime.engine import Engine

    engines, configs = {}, []
    for k, p in paths.items():
        for spin in args.spinning if k == "new" else [args.old_spinning]:
            name = f"{k} spin={spin}"
            engines[name] = Engine.from_bundle(p, threads=args.threads, meter=None, spinning=spin)
            # fixed work per configuration (no online tuning); SpS at its best fixed gamma here
            configs += [(f"{algo} {name}", GenerationConfig(algo=algo, max_new_tokens=64, seed=0, ignore_eos=True,
                                                            tune=False, **({"gamma": 4} if algo == "sps" else {})))
                        for algo in args.algos]
    summaries = run_bench(next(iter(engines.values())), load_prompts(limit=args.generate), configs,
                          engines={name: engines[name.split(" ", 1)[1]] for name, _ in configs})
    print(format_table(summaries))
    rows = [{k: s.get(k) for k in ("name", "tokens_per_s", "mean_accepted_length", "perplexity")} for s in summaries]
    print(draft_time_per_round(engines, load_prompts(limit=args.generate)))
    return rows


def draft_time_per_round(engines: dict, prompts: list[str]) -> str:
    """MTAD's whole draft phase per round (draft_beams: beam steps and beam reorders, wall time), and the draft
    model's time per call, engines alternating per prompt."""
    from mjsd.runtime.config import GenerationConfig
    mjsd = importlib.import_module("mjsd.runtime.decoding.mjsd")  # the package exports a function of that name

    spent, inner = [0.0], mjsd.draft_beams

    def timed(ctx, sampling):
        t0 = time.perf_counter()
        try:
            return inner(ctx, sampling)
        finally:
            spent[0] += time.perf_counter() - t0

    cfg = GenerationConfig(algo="mtad", max_new_tokens=64, seed=0, ignore_eos=True, tune=False)
    totals = {name: [0.0, 0, 0.0, 0] for name in engines}
    mjsd.draft_beams = timed
    try:
        for text in prompts:
            for name, engine in engines.items():
                spent[0] = 0.0
                st = engine.generate(text, cfg).stats
                t = totals[name]
                totals[name] = [t[0] + spent[0], t[1] + st.rounds, t[2] + st.draft_time_s, t[3] + st.draft_calls]
    finally:
        mjsd.draft_beams = inner
    return "\n".join(f"mtad {name}: draft phase {1e3 * w / r:.2f} ms per round ({r / len(prompts):.1f} rounds), "
                     f"draft model {1e3 * t / c:.3f} ms per call" for name, (w, r, t, c) in totals.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generate", type=int, default=0, help="prompts for the end-to-end comparison")
    ap.add_argument("--algos", type=lambda s: s.split(","), default=["ar", "sps", "mtad"])
    ap.add_argument("--spinning", type=lambda s: s.split(","), default=["run"],
                    help="intra-op spinning policies of the new bundle's sessions (run, on, off; session.py)")
    ap.add_argument("--old-spinning", default="off", help="the old bundle's policy (before the fused graphs: off)")
    args = ap.parse_args()
    paths = {"old": args.old, "new": args.new}
    out = {"past": args.past, "repeats": args.repeats, "threads": args.threads,
           "median_ms": per_call(paths, args) if args.repeats else None}
    if args.generate:
        out["generate"] = generate(paths, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
