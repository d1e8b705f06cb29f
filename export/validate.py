"""Check an exported graph against the PyTorch model it came from, the way the runtime will call it.

The graph runs a prefill of PREFILL tokens from an empty past, then one multi-token decode step of DECODE tokens fed
with the prefill's presents (the call speculative verification makes). PyTorch runs the whole sequence at once; with
a causal model its logits at each position must match.

Tolerances (`TOLERANCES`), on `rel` = max |logit difference| / max(1, max |PyTorch logit|):
- fp32: rel <= 1e-3 (measured ~1e-6 on tiny models: anything larger is a wrong graph, not rounding);
- fp16: rel <= 2e-2 and top-1 agreement >= 0.9;
- an fp16 graph is run on CUDA when onnxruntime has it, else on CPU; where the CPU provider has no fp16 kernel for
  an op, validation is skipped with a warning and the reason is recorded (llama and gpt2 run fine on CPU);
- int8 (dynamic weight quantization): rel <= 0.15 and top-1 agreement >= 0.75: int8 legitimately moves logits,
  so this only catches a broken graph, not a small quality loss (measure that with perplexity instead).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mjsd.runtime.errors import ExportError

from .sources import reason

PREFILL, DECODE, BATCH = 5, 3, 2
TOLERANCES = {"fp32": {"rel": 1e-3, "top1": 1.0}, "fp16": {"rel": 2e-2, "top1": 0.9},
              "int8": {"rel": 0.15, "top1": 0.75}}
_NP = {"float32": np.float32, "float16": np.float16}


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Differences between reference and graph logits of the same shape [..., V]."""
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    diff = float(np.abs(ref - got).max())
    return {"max_abs_diff": diff, "rel": diff / max(1.0, float(np.abs(ref).max())),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def within(stats: dict[str, float], precision: str) -> bool:
    tol = TOLERANCES[precision]
    return stats["rel"] <= tol["rel"] and stats["top1_agreement"] >= tol["top1"]


def decoder_feeds(io: dict[str, Any], ids: np.ndarray, past: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Inputs by name for one call: ids [B,S] int64, rank-2 mask over past+S, positions past..past+S-1."""
    b, s = ids.shape
    layers, heads, hd = io["num_layers"], io["num_kv_heads"], io["head_dim"]
    if past is None:
        past = {}
        for i in range(layers):
            for kind in ("key", "value"):
                past[f"past_key_values.{i}.{kind}"] = np.zeros((b, heads, 0, hd), _NP[io["dtype"]])
    p = past["past_key_values.0.key"].shape[2]
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, p + s), np.int64),
             "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy(), **past}
    return {k: v for k, v in feeds.items() if k in io["inputs"]}


def run_graph(path: Path, io: dict[str, Any], ids: np.ndarray, providers: list[str]) -> np.ndarray:
    """Prefill ids[:, :PREFILL], then decode the rest in one call; return logits for every position."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, decoder_feeds(io, ids[:, :PREFILL], None))))
    past = {n.replace("present", "past_key_values", 1): v for n, v in out.items() if n.startswith("present.")}
    out2 = dict(zip(names, sess.run(None, decoder_feeds(io, ids[:, PREFILL:], past))))
    return np.concatenate([out["logits"], out2["logits"]], axis=1)


def reference_logits(src: Path, ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def validate_graph(path: Path, io: dict[str, Any], ref: np.ndarray, ids: np.ndarray, precision: str,
                   role: str) -> dict[str, Any]:
    """Run the graph and compare with `ref`; raise ExportError when outside the tolerance, else return the stats."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        got = run_graph(path, io, ids, providers)
    except Exception as e:
        if precision == "fp16" and providers[0] == "CPUExecutionProvider" and type(e).__name__ == "NotImplemented":
            # ORT's CPU EP lacks fp16 kernels for some ops; the graph is meant for a GPU EP, so do not refuse it.
            why = reason(e)
            warnings.warn(f"{role} fp16 graph not validated: onnxruntime's CPU provider cannot run it ({why})")
            return {"precision": precision, "skipped": f"CPU provider cannot run this fp16 graph: {why}"}
        raise ExportError(f"{role} graph failed to run in onnxruntime ({providers[0]}) during validation "
                          f"({reason(e)})") from None
    stats = compare_logits(ref, got)
    stats.update(precision=precision, provider=providers[0], tolerance=TOLERANCES[precision],
                 tokens=f"prefill {PREFILL} + decode {DECODE}, batch {BATCH}")
    if not within(stats, precision):
        raise ExportError(f"{role} graph does not match PyTorch ({precision}): max |logit diff| "
                          f"{stats['max_abs_diff']:.3g} (relative {stats['rel']:.3g}, tolerance "
                          f"{TOLERANCES[precision]['rel']}), top-1 agreement {stats['top1_agreement']:.2f} (needs "
                          f">= {TOLERANCES[precision]['top1']}); the export is wrong, no bundle was written")
    return stats


def sample_ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(BATCH, PREFILL + DECODE), dtype=np.int64)
