"""Quantized targets side by side: size, held-out perplexity, speed per call, exactness and SpS == AR at T=0.

The built-in bundle's target and draft are rebuilt as Hugging Face checkpoints (tools/bundle_to_hf.py), then exported
once per target quantization (fp32, int8 and int4 weight-only MatMulNBits, int8-dynamic; the draft stays fp32) with
the export's own validation. Then, in one run on the same machine:
- size of the target graph;
- perplexity per token on held-out Python stdlib files (the built-in bundle's validation split, train_builtin.py),
  windows of --window tokens from an empty context, and top-1 agreement with the fp32 graph;
- calls: median ms of a 1-token and a 5-token call after a past of 128, --repeats each, kinds interleaved round
  by round so drift hits all alike (absolute times drift ~15% on this machine: compare ratios);
- call size: max |logit diff| between 5 tokens in one call and 5 one-token calls (the export's check);
- SpS (gamma 4) == AR greedy: identical continuations out of --prompts held-out prompts of --new tokens.

    .venv/bin/python tools/quant_quality.py --work /tmp/quant [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = (None, "int8", "int4", "int8-dynamic")
VAL_PERCENT = 5  # tools/train_builtin.py's held-out split: sha256(relative path) % 100 < 5
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def held_out_text(limit_chars: int) -> list[str]:
    stdlib = Path(os.__file__).parent
    texts, total = [], 0
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.name.startswith(("test_", "_sysconfigdata")):
            continue
        if int(hashlib.sha256(rel.as_posix().encode()).hexdigest()[:8], 16) % 100 >= VAL_PERCENT:
            continue
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
        total += len(texts[-1])
        if total >= limit_chars:
            break
    return texts


def export_all(work: Path) -> dict:
    from mjsd.export import export_bundle

    hf = work / "hf"
    if not (hf / "target" / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "tools" / "bundle_to_hf.py"), str(ROOT / "runtime" / "builtin_bundle"),
                        str(hf)], check=True)
    # the standard graph kind where the exporter offers kinds: MatMulNBits quantizes its MatMuls
    extra = {"graph_kind": "standard"} if "graph_kind" in inspect.signature(export_bundle).parameters else {}
    out = {}
    for q in KINDS:
        name = q or "fp32"
        if not (work / name / "bundle.json").is_file():
            export_bundle(hf / "target", hf / "draft", work / name, quantize={"target": q}, progress=False,
                          force=True, **extra)
        out[name] = work / name
    return out


def _feeds(spec, ids, past):
    p = past[0][0].shape[2]
    f = {"input_ids": ids, "attention_mask": np.ones((1, p + ids.shape[1]), np.int64),
         "position_ids": np.arange(p, p + ids.shape[1], dtype=np.int64)[None], "logits_to_keep": np.zeros(1, np.int64),
         "beam_k": np.ones(1, np.int64), "beam_bias": np.zeros((1, spec.vocab_size), np.float32)}
    for (kn, vn), (k, v) in zip(spec.past_names(), past):
        f[kn], f[vn] = k, v
    return {k: v for k, v in f.items() if k in spec.inputs}


def _run(sess, spec, ids, past):
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, _feeds(spec, ids, past))))
    return out["logits"][0], [(out[k], out[v]) for k, v in spec.present_names()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from mjsd.runtime.bundle import load_bundle
    from mjsd.runtime.config import GenerationConfig
    from mjsd.runtime.decoding import generate_ids
    from mjsd.runtime.session import ModelSession

    args.work.mkdir(parents=True, exist_ok=True)
    paths = export_all(args.work)
    bundles = {k: load_bundle(p) for k, p in paths.items()}
    tok = bundles["fp32"].load_tokenizer()
    stream = np.array([t for text in held_out_text(args.window * args.windows * 6)
                       for t in tok.encode(text).ids], np.int64)
    windows = [stream[i:i + args.window + 1] for i in range(0, len(stream) - args.window - 1, args.window)]
    windows = windows[:args.windows]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sess = {k: ort.InferenceSession(str(b.target.path), opts, providers=["CPUExecutionProvider"])
            for k, b in bundles.items()}
    rows = {k: {"size_mb": b.target.entry["size_bytes"] / 1e6,
                "exact_verification": b.target.entry["exact_verification"],
                "call_size_max_diff": b.target.entry["validation"]["call_size"]["max_abs_diff"],
                "validation_rel": b.target.entry["validation"]["rel"]} for k, b in bundles.items()}

    # perplexity and agreement with fp32
    for k, b in bundles.items():
        spec, nll, agree, count = b.target, 0.0, 0, 0
        empty = [(np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32),) * 2] * spec.num_layers
        for w in windows:
            logits, _ = _run(sess[k], spec, w[None, :-1], empty)
            logits = logits[:, :bundles["fp32"].vocab_size].astype(np.float64)
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            nll += float((lse - logits[np.arange(len(w) - 1), w[1:]]).sum())
            count += len(w) - 1
            if k == "fp32":
                rows[k].setdefault("_argmax", []).append(logits.argmax(-1))
            else:
                agree += int((logits.argmax(-1) == rows["fp32"]["_argmax"][len(rows[k].get("_seen", []))]).sum())
                rows[k].setdefault("_seen", []).append(1)
        rows[k]["ppl"] = float(np.exp(nll / count))
        rows[k]["top1_vs_fp32"] = 1.0 if k == "fp32" else agree / count
        rows[k]["eval_tokens"] = count
    for r in rows.values():
        r.pop("_argmax", None), r.pop("_seen", None)

    # speed per call, interleaved
    rng = np.random.default_rng(0)
    past_ids = rng.integers(4, bundles["fp32"].vocab_size, (1, 128))
    pasts = {k: _run(sess[k], bundles[k].target, past_ids, [(np.zeros((1, bundles[k].target.num_kv_heads, 0,
                                                                         bundles[k].target.head_dim), np.float32),) * 2]
                                                           * bundles[k].target.num_layers)[1] for k in bundles}
    times = {k: {1: [], 5: []} for k in bundles}
    for _ in range(args.repeats):
        for n in (1, 5):
            ids = rng.integers(4, 100, (1, n))
            for k in bundles:
                t0 = time.perf_counter()
                _run(sess[k], bundles[k].target, ids, pasts[k])
                times[k][n].append(time.perf_counter() - t0)
    for k in bundles:
        rows[k]["ms_1_token"] = 1e3 * float(np.median(times[k][1]))
        rows[k]["ms_5_tokens"] = 1e3 * float(np.median(times[k][5]))

    # SpS == AR at T=0 on held-out prompts
    prompts = [w[:48].tolist() for w in windows[-args.prompts:]]
    for k, b in bundles.items():
        target, draft = ModelSession(b.target, threads=args.threads), ModelSession(b.draft, threads=args.threads)
        same, accepted = 0, []
        for p in prompts:
            ar, _ = generate_ids(target, p, GenerationConfig(algo="ar", max_new_tokens=args.new))
            sps, st = generate_ids(target, p, GenerationConfig(algo="sps", gamma=4, max_new_tokens=args.new),
                                   draft=draft)
            same += ar == sps
            accepted.append(st.mean_accepted_length)
        rows[k]["sps_equals_ar"] = f"{same}/{len(prompts)}"
        rows[k]["mean_accepted_length"] = float(np.mean(accepted))

    if args.json:
        print(json.dumps({"threads": args.threads, "window": args.window, "rows": rows}, indent=2))
        return
    base = rows["fp32"]
    print(f"target of the built-in bundle, {rows['fp32']['eval_tokens']} held-out tokens in windows of {args.window}, "
          f"{args.threads} threads, median of {args.repeats} calls after a past of 128\n")
    print("| target | size MB | ppl (vs fp32) | top-1 = fp32 | ms 1-tok call | ms 5-tok call | call-size max diff "
          "| exact | SpS == AR | accepted/round |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['size_mb']:.1f} | {r['ppl']:.2f} ({r['ppl'] / base['ppl'] - 1:+.1%}) | "
              f"{r['top1_vs_fp32']:.3f} | {r['ms_1_token']:.2f} ({r['ms_1_token'] / base['ms_1_token']:.2f}x) | "
              f"{r['ms_5_tokens']:.2f} ({r['ms_5_tokens'] / base['ms_5_tokens']:.2f}x) | "
              f"{r['call_size_max_diff']:.2g} | {r['exact_verification']} | {r['sps_equals_ar']} | "
              f"{r['mean_accepted_length']:.2f} |")


if __name__ == "__main__":
    main()
