"""AR vs SpS vs MTAD tokens/s on the built-in bundle, with prompts from the held-out stdlib files.

Prompts: from each of the first N validation files (train_builtin's split), the lines from the first `def `/`class `
on, about 400 characters. Each prompt generates --new tokens (EOS ignored) with every algorithm in turn (interleaved,
so a change of machine load hits all of them alike), after one warm-up generation. Reported: generated tokens /
wall time summed over prompts, the speedup over AR at the same temperature, and acceptance.

    python tools/bench_builtin.py [--bundle runtime/builtin_bundle] [--prompts 6] [--new 128]
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_builtin import corpus_files, is_validation  # noqa: E402

from mjsd.runtime import Engine  # noqa: E402


def prompts(n: int, chars: int = 400) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for rel in (r for r in corpus_files(root) if is_validation(r)):
        lines = (root / rel).read_text(encoding="utf-8").splitlines(keepends=True)
        start = next((i for i, l in enumerate(lines) if l.startswith(("def ", "class "))), None)
        if start is None:
            continue
        text = ""
        for line in lines[start:]:
            if len(text) + len(line) > chars:
                break
            text += line
        if len(text) > chars // 2:
            out.append((rel, text))
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="default: the built-in bundle")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--algos", nargs="*", default=["ar", "sps", "mtad"])
    ap.add_argument("--temperatures", nargs="*", type=float, default=[0.0, 1.0])
    args = ap.parse_args()

    engine = Engine.from_bundle(args.bundle, threads=args.threads, meter=None)
    ps = prompts(args.prompts)
    engine.generate(ps[0][1], algo="mtad", max_new_tokens=16)  # warm-up
    totals = defaultdict(lambda: [0, 0.0, 0, 0, 0])  # tokens, seconds, accepted, drafted, rounds
    for temp in args.temperatures:
        for i, (rel, text) in enumerate(ps):
            for algo in args.algos:
                s = engine.generate(text, algo=algo, temperature=temp, seed=i, max_new_tokens=args.new,
                                    ignore_eos=True).stats
                t = totals[algo, temp]
                t[0] += s.generated_tokens
                t[1] += s.wall_time_s
                t[2] += s.accepted_tokens
                t[3] += s.draft_tokens
                t[4] += s.rounds
    print(f"{len(ps)} prompts from held-out files ({', '.join(r for r, _ in ps)}), {args.new} new tokens each, "
          f"{args.threads} threads")
    print("| algo | temperature | tokens/s | vs AR | acceptance | tokens per target call |")
    print("|---|---|---|---|---|---|")
    for temp in args.temperatures:
        ar_tps = totals["ar", temp][0] / totals["ar", temp][1] if "ar" in args.algos else None
        for algo in args.algos:
            tok, sec, acc, dra, rounds = totals[algo, temp]
            tps = tok / sec
            print(f"| {algo} | {temp:g} | {tps:.1f} | {tps / ar_tps:.2f}x | "
                  f"{acc / dra if dra else float('nan'):.2f} | {1 + acc / rounds if rounds else 1:.2f} |"
                  if ar_tps else f"| {algo} | {temp:g} | {tps:.1f} | - | - | - |")


if __name__ == "__main__":
    main()
