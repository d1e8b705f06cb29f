"""onnxruntime-genai side of tools/bench_peers.py; runs in the separate venv (onnxruntime-genai 0.18 + transformers 5).

Builds the target and the draft with onnxruntime-genai's model builder (fp32, CPU) into --cache once, assembles a
speculative model folder (genai_config.json model.type "speculative", model.draft = the draft's decoder section),
then serves JSON lines on stdin/stdout: {"mode": "ar"|"spec", "ids": [...], "n": N, "k": K} ->
{"tokens": [...], "seconds": wall time of append_tokens + decode, "prefill_seconds": that of append_tokens (the
prompt), "stats": get_speculative_stats() for spec}.
Greedy, batch 1, exactly N new tokens (min_length = max_length, so EOS cannot end a run early).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def build(checkpoint: Path, out: Path, cache: Path) -> None:
    if (out / "genai_config.json").exists():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(tmp),
                    "-p", "fp32", "-e", "cpu", "-c", str(cache / "hf")], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    tmp.rename(out)


def configure(folder: Path, threads: int, draft: Path | None = None) -> None:
    """Set the sessions' intra-op threads; with a draft, make the folder a speculative model."""
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    decoders = [cfg["model"]["decoder"]]
    if draft is not None:
        dec = json.loads((draft / "genai_config.json").read_text())["model"]["decoder"]
        dec["filename"] = f"draft/{dec['filename']}"
        cfg["model"]["type"], cfg["model"]["draft"] = "speculative", dec
        decoders.append(dec)
    for dec in decoders:  # target and draft must carry identical session options (same provider)
        dec["session_options"]["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=Path, required=True, help="folder with target/ and draft/ (HF)")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import onnxruntime_genai as og

    args.cache.mkdir(parents=True, exist_ok=True)
    for role in ("target", "draft"):
        build(args.checkpoints / role, args.cache / role, args.cache)
    ar_dir, spec_dir = args.cache / "ar", args.cache / "spec"
    for d in (ar_dir, spec_dir):
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(args.cache / "target", d)
    shutil.copytree(args.cache / "draft", spec_dir / "draft")
    configure(ar_dir, args.threads)
    configure(spec_dir, args.threads, draft=spec_dir / "draft")
    models = {"ar": og.Model(str(ar_dir)), "spec": og.Model(str(spec_dir))}
    print(json.dumps({"ready": True, "version": og.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        model, ids, n = models[req["mode"]], req["ids"], req["n"]
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        if req["mode"] == "spec":
            params.set_speculative_options(max_draft_tokens=req["k"])
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        prefill = time.perf_counter() - t0
        while not gen.is_done():
            gen.generate_next_token()
        seconds = time.perf_counter() - t0
        tokens = [int(t) for t in gen.get_sequence(0)][len(ids):]
        stats = gen.get_speculative_stats() if req["mode"] == "spec" else None
        print(json.dumps({"tokens": tokens, "seconds": seconds, "prefill_seconds": prefill, "stats": stats}),
              flush=True)


if __name__ == "__main__":
    main()
