"""Thread policy: tokens/s of AR, SpS and MTAD under each intra-op thread policy and thread count.

    python tools/bench_threads.py [--bundle B] [--policies shared,off,run,on] [--threads 1,2] [--prompts 8] [--rounds 3]

Policies: "shared" (one process-wide pool spinning between calls, the CLI's default) and the per-session "run",
"on" and "off" (session.py). A spinning session slows every other session in its process (and on its cores), so
each (policy, threads) runs in its own process, one at a time; the combinations are cycled `--rounds` times in
order (A B C A B C ...) so slow drift of the machine hits all of them alike, and the median tokens/s per
combination is printed. Greedy, 64 tokens, EOS ignored, online tuning off (fixed work per configuration). Wrap in `flock /tmp/mjsd-bench.lock`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

ALGOS = ("ar", "sps", "mtad")


def child(bundle: str | None, policy: str, threads: int, prompts: int) -> dict[str, float]:
    from mjsd.runtime.bench import load_prompts
    from mjsd.runtime.engine import Engine

    if policy == "shared":  # the CLI's default: one process-wide pool (session.share_thread_pool)
        from mjsd.runtime.session import share_thread_pool

        share_thread_pool()
    engine = Engine.from_bundle(bundle, threads=threads, meter=None,
                                spinning="run" if policy == "shared" else policy)
    texts = load_prompts(limit=prompts)
    out = {}
    for algo in ALGOS:
        params = dict(algo=algo, max_new_tokens=64, ignore_eos=True, tune=False)
        engine.generate(texts[0], max_new_tokens=8, **{k: v for k, v in params.items() if k != "max_new_tokens"})
        tokens = seconds = 0.0
        for text in texts:
            r = engine.generate(text, **params)
            tokens, seconds = tokens + r.stats.generated_tokens, seconds + r.stats.wall_time_s
        out[algo] = tokens / seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle")
    ap.add_argument("--policies", default="shared,off,run,on")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.bundle, args.child[0], int(args.child[1]), args.prompts)))
        return
    combos = [(p, int(t)) for p in args.policies.split(",") for t in args.threads.split(",")]
    runs: dict[tuple, list[dict]] = {c: [] for c in combos}
    for _ in range(args.rounds):
        for policy, threads in combos:
            cmd = [sys.executable, __file__, "--prompts", str(args.prompts), "--child", policy, str(threads)]
            if args.bundle:
                cmd += ["--bundle", args.bundle]
            runs[(policy, threads)].append(json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                                     text=True).stdout.splitlines()[-1]))
    print("| spinning | threads | " + " | ".join(f"{a} tokens/s" for a in ALGOS) + " |")
    print("|---|---|" + "---|" * len(ALGOS))
    table = {}
    for (policy, threads), results in runs.items():
        med = {a: statistics.median(r[a] for r in results) for a in ALGOS}
        table[f"{policy}/{threads}"] = med
        print(f"| {policy} | {threads} | " + " | ".join(f"{med[a]:.1f}" for a in ALGOS) + " |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
