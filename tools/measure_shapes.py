"""Measure ONNX Runtime CPU cost per call of candidate Llama shapes (random weights), to size the built-in pair.

Each shape is built from a config, exported with optimum-onnx (text-generation-with-past), optionally int8
dynamically quantized, and timed on 2 threads: a 1-token and a 5-token call on a past of 128 (median of N calls).

    python tools/measure_shapes.py --scratch /tmp/mjsd-shapes
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

# name: (layers, hidden, heads, kv_heads, intermediate)
SHAPES = {
    "d1x128": (1, 128, 2, 2, 352),
    "d1x192": (1, 192, 3, 3, 512),
    "t6x384": (6, 384, 6, 6, 1024),
    "t12x256": (12, 256, 4, 4, 704),
    "t16x256": (16, 256, 4, 4, 704),
    "t8x384": (8, 384, 6, 6, 1024),
    "t8x512": (8, 512, 8, 8, 1376),
}


def build(name: str, shape, vocab: int, scratch: Path, quantize: bool) -> tuple[Path, int]:
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, inter = shape
    ckpt, onnx_dir = scratch / name / "hf", scratch / name / "onnx"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    if not (onnx_dir / "model.onnx").exists():
        model.save_pretrained(ckpt)
        main_export(str(ckpt), str(onnx_dir), task="text-generation-with-past", no_post_process=True)
    path = onnx_dir / "model.onnx"
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        qpath = onnx_dir / "model.int8.onnx"
        if not qpath.exists():
            quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
        path = qpath
    return path, n_params


def time_calls(path: Path, shape, past: int, seq: int, n: int) -> float:
    import onnxruntime as ort

    layers, hidden, heads, kv, _ = shape
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    hd = hidden // heads
    feed = {"input_ids": np.ones((1, seq), np.int64),
            "attention_mask": np.ones((1, past + seq), np.int64),
            "position_ids": np.arange(past, past + seq, dtype=np.int64)[None], "logits_to_keep": np.zeros(1, np.int64)}
    for i in range(layers):
        for kvn in ("key", "value"):
            feed[f"past_key_values.{i}.{kvn}"] = np.random.default_rng(i).standard_normal(
                (1, kv, past, hd), dtype=np.float32)
    feed = {k: v for k, v in feed.items() if k in {x.name for x in sess.get_inputs()}}
    for _ in range(5):
        sess.run(["logits"], feed)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(["logits"], feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/mjsd-shapes"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    print("| shape | params | weights | 1 tok ms | 5 tok ms |")
    print("|---|---|---|---|---|")
    for name in args.shapes:
        for q in (False, True) if name.startswith("t") else (False,):
            path, n_params = build(name, SHAPES[name], args.vocab, args.scratch, q)
            t1 = time_calls(path, SHAPES[name], 128, 1, args.calls)
            t5 = time_calls(path, SHAPES[name], 128, 5, args.calls)
            print(f"| {name} | {n_params / 1e6:.2f}M | {'int8' if q else 'fp32'} | {t1:.2f} | {t5:.2f} |", flush=True)


if __name__ == "__main__":
    main()
