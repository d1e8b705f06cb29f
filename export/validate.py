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

A tree-attention graph gets the same check fed a causal bias, then a tree check: after a prefill of TREE_CONTEXT
tokens, one call over the nodes of TREE_PARENTS with the tree bias, where every node's logits must match PyTorch's
over the context plus that node's root-to-node path (same tolerances).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mjsd.runtime import tree
from mjsd.runtime.errors import ExportError

from .sources import reason

PREFILL, DECODE, BATCH = 5, 3, 2
TREE_CONTEXT = 4
TREE_PARENTS = (-1, 0, 0, 1, -1, 4, 3)  # two roots, siblings, a branch, depth 4: every kind of edge
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
    if tree.BIAS in io["inputs"]:  # a tree-attention graph: causal attention is the chain's bias
        feeds[tree.BIAS] = np.repeat(tree.attention_bias(tree.chain(s), p, _NP[io["dtype"]]), b, axis=0)
    return {k: v for k, v in feeds.items() if k in io["inputs"]}


def _session(path: Path, providers: list[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers)


def _call(sess, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and the presents renamed as the next call's past."""
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return out["logits"], {n.replace("present", "past_key_values", 1): v for n, v in out.items()
                           if n.startswith("present.")}


def run_graph(path: Path, io: dict[str, Any], ids: np.ndarray, providers: list[str]) -> np.ndarray:
    """Prefill ids[:, :PREFILL], then decode the rest in one call; return logits for every position."""
    sess = _session(path, providers)
    first, past = _call(sess, decoder_feeds(io, ids[:, :PREFILL], None))
    second, _ = _call(sess, decoder_feeds(io, ids[:, PREFILL:], past))
    return np.concatenate([first, second], axis=1)


def run_tree(path: Path, io: dict[str, Any], ids: np.ndarray, providers: list[str]) -> np.ndarray:
    """Prefill ids[:TREE_CONTEXT], then the tree of nodes ids[TREE_CONTEXT:] in one call; return its logits [S, V]."""
    sess = _session(path, providers)
    _, past = _call(sess, decoder_feeds(io, ids[None, :TREE_CONTEXT], None))
    feeds = {"input_ids": ids[None, TREE_CONTEXT:], "position_ids": tree.positions(TREE_PARENTS, TREE_CONTEXT)[None],
             tree.BIAS: tree.attention_bias(TREE_PARENTS, TREE_CONTEXT, _NP[io["dtype"]]), **past}
    return _call(sess, feeds)[0][0]


def reference_logits(src: Path, ids: np.ndarray, tree_ids: np.ndarray | None = None):
    """PyTorch logits of ids [B, S]; with tree_ids (context + TREE_PARENTS nodes) also, per node, the last logits
    of a plain forward over the context and the node's path, [S, V]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
        if tree_ids is None:
            return ref
        paths = [TREE_CONTEXT + np.array(tree.path(TREE_PARENTS, i)) for i in range(len(TREE_PARENTS))]
        rows = [np.concatenate([tree_ids[:TREE_CONTEXT], tree_ids[p]]) for p in paths]
        return ref, np.stack([model(input_ids=torch.from_numpy(r)[None]).logits[0, -1].float().numpy() for r in rows])


def _compare(ref: np.ndarray, got: np.ndarray, precision: str, role: str, what: str) -> dict[str, Any]:
    stats = compare_logits(ref, got)
    if not within(stats, precision):
        raise ExportError(f"{role} graph does not match PyTorch ({precision}, {what}): max |logit diff| "
                          f"{stats['max_abs_diff']:.3g} (relative {stats['rel']:.3g}, tolerance "
                          f"{TOLERANCES[precision]['rel']}), top-1 agreement {stats['top1_agreement']:.2f} (needs "
                          f">= {TOLERANCES[precision]['top1']}); the export is wrong, no bundle was written")
    return stats


def validate_graph(path: Path, io: dict[str, Any], ref: np.ndarray, ids: np.ndarray, precision: str,
                   role: str, tree_ref: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Run the graph and compare with `ref`; raise ExportError when outside the tolerance, else return the stats.
    tree_ref: (tree ids, PyTorch node logits) from `reference_logits` for a tree-attention graph."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        got = run_graph(path, io, ids, providers)
        got_tree = run_tree(path, io, tree_ref[0], providers) if tree_ref is not None else None
    except Exception as e:
        if precision == "fp16" and providers[0] == "CPUExecutionProvider" and type(e).__name__ == "NotImplemented":
            # ORT's CPU EP lacks fp16 kernels for some ops; the graph is meant for a GPU EP, so do not refuse it.
            why = reason(e)
            warnings.warn(f"{role} fp16 graph not validated: onnxruntime's CPU provider cannot run it ({why})")
            return {"precision": precision, "skipped": f"CPU provider cannot run this fp16 graph: {why}"}
        raise ExportError(f"{role} graph failed to run in onnxruntime ({providers[0]}) during validation "
                          f"({reason(e)})") from None
    stats = _compare(ref, got, precision, role, f"prefill {PREFILL} + decode {DECODE}")
    stats.update(precision=precision, provider=providers[0], tolerance=TOLERANCES[precision],
                 tokens=f"prefill {PREFILL} + decode {DECODE}, batch {BATCH}")
    if tree_ref is not None:
        stats["tree"] = _compare(tree_ref[1], got_tree, precision, role, f"tree of {len(TREE_PARENTS)} nodes")
        stats["tree"]["parents"] = list(TREE_PARENTS)
    return stats


def sample_ids(vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(BATCH, PREFILL + DECODE), dtype=np.int64)


def sample_tree_ids(vocab: int, seed: int = 1) -> np.ndarray:
    """Context and node tokens of the validation tree, [TREE_CONTEXT + len(TREE_PARENTS)]."""
    return np.random.default_rng(seed).integers(0, vocab, size=TREE_CONTEXT + len(TREE_PARENTS), dtype=np.int64)
