"""Per-call cost of the tree-attention target graph vs the standard (optimum) graph of the same checkpoint.

    python tools/bench_tree_graph.py STANDARD_BUNDLE TREE_BUNDLE [--past 128] [--repeats 200] [--threads 2]
                                     [--generate N]

Both bundles must come from the same checkpoints (`mjsd export` with and without --tree-attention). Calls are
interleaved (standard, tree, standard, ...) after a past of --past tokens, and the median ms per call is printed for
the shapes the algorithms use: AR (1 token), SpS/MTAD verification (1 + gamma tokens in a row), MCSD batch (one row
per path) and the same work as one tree sequence, MMTAD (W x gamma nodes). --generate N adds end-to-end AR and SpS
generations (greedy, 64 tokens) on N built-in prompts with each bundle, interleaved by runtime/bench.py's run_bench.
Wrap in `flock /tmp/mjsd-bench.lock`.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mjsd.runtime import tree
from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.decoding.mcsd import node_parents
from mjsd.runtime.session import ModelSession


def mmtad_parents(width: int, gamma: int) -> np.ndarray:
    """A beam tree: every depth holds `width` nodes, each the child of one node of the depth above."""
    parents = [np.full(width, -1)] + [d * width + np.arange(width) % width for d in range(gamma - 1)]
    return np.concatenate(parents)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("standard")
    ap.add_argument("tree")
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generate", type=int, default=0, help="prompts for the end-to-end AR/SpS comparison")
    args = ap.parse_args()
    std, tre = (ModelSession(load_bundle(p).target, threads=args.threads) for p in (args.standard, args.tree))
    rng = np.random.default_rng(0)
    context = rng.integers(4, 200, args.past).tolist()
    caches = {}
    for name, s in (("standard", std), ("tree", tre)):
        caches[name] = s.new_cache()
        s.forward(context, caches[name])
    k_config = (2, 2, 1)
    paths = int(np.prod(k_config))
    cases = {  # name -> (standard call, tree-graph call)
        "AR: 1 token": (lambda s, c: s.forward([[7]], c), lambda s, c: s.forward([[7]], c)),
        "SpS/MTAD verify: 5 tokens": (lambda s, c: s.forward([[7] * 5], c), lambda s, c: s.forward([[7] * 5], c)),
        f"MCSD {k_config}: batch {paths}x{1 + len(k_config)} vs tree 1+{len(node_parents(k_config))}": (
            lambda s, c: (c.repeat(paths), s.forward(np.full((paths, 1 + len(k_config)), 7), c)),
            lambda s, c: s.forward_tree([7] * (1 + len(node_parents(k_config))),
                                        tree.after_chain(node_parents(k_config), 1), c)),
        "MMTAD W4 gamma4: tree 1+16 (MTAD: 5 in a row)": (
            lambda s, c: s.forward([[7] * 5], c),
            lambda s, c: s.forward_tree([7] * 17, tree.after_chain(mmtad_parents(4, 4), 1), c)),
    }
    results = {}
    for case, (f_std, f_tree) in cases.items():
        times = {"standard": [], "tree": []}
        for _ in range(args.repeats):
            for name, s, f in (("standard", std, f_std), ("tree", tre, f_tree)):
                c = _clone(caches[name])
                t0 = time.perf_counter()
                f(s, c)
                times[name].append(time.perf_counter() - t0)
        results[case] = {k: round(1e3 * float(np.median(v)), 3) for k, v in times.items()}
        print(f"{case:<55} standard {results[case]['standard']:7.3f} ms   tree graph {results[case]['tree']:7.3f} ms")
    out = {"past": args.past, "repeats": args.repeats, "threads": args.threads, "median_ms": results}
    if args.generate:
        out["generate"] = generate(args)
    print(json.dumps(out))


def generate(args) -> list[dict]:
    """AR and SpS on both bundles, interleaved over the built-in prompts; tokens/s per configuration."""
    from mjsd.runtime.bench import format_table, load_prompts, run_bench
    from mjsd.runtime.config import GenerationConfig
    from mjsd.runtime.engine import Engine

    engines = {graph: Engine.from_bundle(path, threads=args.threads, meter=None)
               for graph, path in (("standard", args.standard), ("tree", args.tree))}
    configs = [(f"{algo} {graph} graph", GenerationConfig(algo=algo, max_new_tokens=64, seed=0))
               for algo in ("ar", "sps") for graph in engines]
    summaries = run_bench(engines["standard"], load_prompts(limit=args.generate), configs,
                          engines={name: engines[name.split()[1]] for name, _ in configs})
    print(format_table(summaries))
    return [{k: s[k] for k in ("name", "tokens_per_s", "mean_accepted_length", "perplexity")} for s in summaries]


def _clone(cache):
    """A shallow copy of a cache (its tensors are never mutated in place)."""
    other = object.__new__(type(cache))
    other.__dict__.update(cache.__dict__)
    other.keys, other.values = list(cache.keys), list(cache.values)
    return other


if __name__ == "__main__":
    main()
