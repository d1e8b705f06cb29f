"""GPU check: per-call latency and tokens/s of every algorithm on CUDA (and TensorRT when present), for a person with
an NVIDIA GPU and onnxruntime-gpu.

    python tools/gpu_check.py [--bundle B] [--providers cuda,tensorrt] [--prompts 8] [-n 64] [--out gpu.json]
    python tools/gpu_check.py --providers cpu --prompts 2 -n 16 --repeats 10     # a dry run without a GPU

GOAL: the built-in target's B1T1 call (one token after a past of 128) <= 1 ms on a data-center GPU (it was 6.1 ms
on an H200 with the standard optimum graph: ~2000 launch-bound nodes; the fused graph has ~150). A float32 fused
bundle runs as its fp16 copy on CUDA (runtime/fp16.py). Checks: SpS and MCSD token-identical to AR at T=0 on the
GPU, and GPU AR tokens vs CPU AR tokens. Prints a table and writes JSON (--out). Setup on a machine without network:
platform-notes ("A lent GPU machine"); `PYTHONPATH=<dir with onnxruntime-gpu>`.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_graphs import TREE, _context  # noqa: E402

GOAL_MS = 1.0
ALGOS = ("ar", "sps", "mtad", "mmtad", "mcsd")


def per_call(session, past: int, repeats: int) -> dict[str, float]:
    """Median ms of the algorithms' call shapes after `past` tokens (cache cropped back after each call)."""
    shapes = {"B1T1": lambda c: session.forward([[7]], c), "B1T5": lambda c: session.forward([[7] * 5], c),
              "B4T1": lambda c: session.forward([[7]] * 4, c)}
    if session.spec.tree_attention:
        shapes["tree5"] = lambda c: session.forward_tree([7] * 5, TREE, c)
    if session.beam_head:  # a greedy MTAD draft step: two beams on the draft's beam graph
        shapes["B2T1 beam"] = lambda c: session.forward_top([[7]] * 2, c, 2)
    out = {}
    for name, call in shapes.items():
        c = session.new_cache()
        session.forward(_context(past), c)
        if name == "B4T1":
            c.repeat(4)
        elif name == "B2T1 beam":
            c.repeat(2)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(c)
            times.append(time.perf_counter() - t0)
            c.crop(past)
        out[name] = round(1e3 * float(np.median(times[repeats // 5:])), 3)
    return out


def environment() -> dict:
    import onnxruntime as ort

    env = {"python": platform.python_version(), "onnxruntime": ort.__version__,
           "providers": ort.get_available_providers()}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        env["gpu"] = pynvml.nvmlDeviceGetName(h)
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as e:  # no NVML: still measure
        env["gpu"] = f"unknown ({type(e).__name__})"
    return env


def main() -> None:
    from mjsd.runtime.bench import format_table, load_prompts, run_bench
    from mjsd.runtime.config import GenerationConfig
    from mjsd.runtime.decoding import generate_ids
    from mjsd.runtime.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="default: the built-in bundle")
    ap.add_argument("--providers", default="cuda,tensorrt", help="cuda, tensorrt, and cpu for a dry run")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # onnxruntime-gpu wheels built for CUDA 12/13 find their libraries this way
    report = {"environment": environment(), "goal": f"built-in target B1T1 <= {GOAL_MS} ms", "providers": {}}
    print(json.dumps(report["environment"]))
    prompts = load_prompts(limit=args.prompts)
    cpu = Engine.from_bundle(args.bundle, provider="cpu", meter=None)
    # the exactness checks run without the n-gram ban, which AR and SpS apply and MCSD does not
    exact = dict(max_new_tokens=args.max_new_tokens, ignore_eos=True, seed=0, no_repeat_ngram_size=0)
    greedy = GenerationConfig(algo="ar", **exact)
    cpu_ar = [generate_ids(cpu.target, cpu.encode(p), greedy)[0] for p in prompts]
    for name in args.providers.split(","):
        ep = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}
        if ep.get(name) not in ort.get_available_providers():
            print(f"{name}: not available in this onnxruntime, skipped")
            continue
        t0 = time.perf_counter()
        try:  # (cpu: a dry run of this script on a machine without a GPU)
            engine = Engine.from_bundle(args.bundle, provider=[name] if name == "cpu" else [name, "cpu"],
                                        meter="auto", fp16=name != "cpu")
        except Exception as e:
            report["providers"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {e}")
            continue
        res = {"load_s": round(time.perf_counter() - t0, 1), "session_providers": engine.target.providers,
               "graph_kind": engine.target.spec.graph_kind, "dtype": engine.target.spec.dtype,
               "target_ms": per_call(engine.target, args.past, args.repeats),
               "draft_ms": per_call(engine.draft, args.past, args.repeats)}
        res["goal_met"] = res["target_ms"]["B1T1"] <= GOAL_MS
        ar = [generate_ids(engine.target, engine.encode(p), greedy)[0] for p in prompts]
        res["gpu_ar_equals_cpu_ar"] = sum(a == b for a, b in zip(ar, cpu_ar))
        for algo in ("sps", "mcsd"):
            cfg = GenerationConfig(algo=algo, **exact)
            same = [generate_ids(engine.target, engine.encode(p), cfg, draft=engine.draft,
                                 vocab_size=engine.bundle.vocab_size)[0] == a for p, a in zip(prompts, ar)]
            res[f"{algo}_equals_ar"] = f"{sum(same)}/{len(same)}"
        configs = [(f"{a} T={t}", GenerationConfig(algo=a, temperature=t, top_k=10 if t else 0, top_p=0.9 if t else 1.0,
                                                   max_new_tokens=args.max_new_tokens, seed=0))
                   for t in (0.0, 1.0) for a in ALGOS]
        summaries = run_bench(engine, prompts, configs)
        print(f"== {name} ({engine.target.providers[0]}, {res['graph_kind']} {res['dtype']}) ==")
        print(format_table(summaries))
        res["bench"] = [{k: s.get(k) for k in ("name", "tokens_per_s", "speedup", "mean_accepted_length",
                                               "j_per_token", "energy_source")} for s in summaries]
        print(f"target per call (ms): {res['target_ms']}   draft: {res['draft_ms']}")
        print(f"GOAL B1T1 <= {GOAL_MS} ms: {'MET' if res['goal_met'] else 'MISSED'} ({res['target_ms']['B1T1']} ms); "
              f"AR GPU==CPU {res['gpu_ar_equals_cpu_ar']}/{len(prompts)}; SpS==AR {res['sps_equals_ar']}; "
              f"MCSD==AR {res['mcsd_equals_ar']}")
        report["providers"][name] = res
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
