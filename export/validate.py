"""Check an exported graph against the PyTorch model it came from, the way the runtime will call it.

The graph runs a prefill of `prefill` tokens from an empty past, then one multi-token decode call of `decode` tokens
fed with the prefill's presents (the call speculative verification makes), then `steps` one-token calls. PyTorch
runs the whole sequence at once; with a causal model its logits at each position must match.
`validation_lengths(config, max_context)` sizes the run to reach the lengths where families differ: past the
sliding window and past longrope's original_max_position_embeddings (at least 32 + 8 tokens), within max_context.

The same decode tokens are also fed one call per token: the logits must not depend on how many tokens a call carries
(`call_size`), or speculative decoding at T=0 is no longer token-identical to AR. `exact_verification` records it.

Tolerances (`TOLERANCES`), on `rel` = max |logit difference| / max(1, max |PyTorch logit|):
- fp32: rel <= 1e-3 (measured ~1e-6 on tiny models: anything larger is a wrong graph, not rounding);
- fp16: rel <= 2e-2 and top-1 agreement >= 0.9;
- an fp16 graph is run on CUDA when onnxruntime has it, else on CPU; where the CPU provider has no fp16 kernel for
  an op, validation is skipped with a warning and the reason is recorded (llama and gpt2 run fine on CPU);
- int8 / int4 (weight-only, MatMulNBits): rel <= 0.1 / 1.0 and top-1 >= 0.85 / 0.25 against PyTorch. These only
  catch a graph broken outright (garbage logits agree on ~1/vocab of the top-1): 4 bits move random tiny models a
  lot (top-1 0.4-0.7 vs fp32) while a trained one keeps 0.96 (tools/quant_quality.py, which measures the quality by
  perplexity). The call-size check is as tight as fp32 (1e-4): quantized weights are a different model, but one
  that answers the same whatever the call size;
- int8-dynamic (activations quantized per call): rel <= 0.15 and top-1 >= 0.75; never exact (measured, recorded).

A tree-attention graph gets the same check fed a causal bias, then a tree check: after a prefill of `tree_context`
tokens (past the sliding window), one call over the nodes of TREE_PARENTS with the tree bias, where every node's
logits must match PyTorch's over the context plus that node's root-to-node path (same tolerances).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mjsd.runtime import tree
from mjsd.runtime.errors import ExportError

from .sources import reason

DECODE, STEPS, BATCH = 3, 2, 2
REACH = 32  # validate at least this many tokens (+ MARGIN) even without a window or a rope switch point
MARGIN = 8
TREE_PARENTS = (-1, 0, 0, 1, -1, 4, 3)  # two roots, siblings, a branch, depth 4: every kind of edge
TOLERANCES = {"fp32": {"rel": 1e-3, "top1": 1.0}, "fp16": {"rel": 2e-2, "top1": 0.9},
              "int8": {"rel": 0.1, "top1": 0.85}, "int4": {"rel": 1.0, "top1": 0.25},
              "int8-dynamic": {"rel": 0.15, "top1": 0.75}}
# Logits must not depend on the call size beyond float rounding (fp16: its own rounding) for exact verification.
EXACT_REL = {"fp16": 1e-2}
EXACT_REL_DEFAULT = 1e-4
NOT_EXACT_BY_DESIGN = ("int8-dynamic",)
_NP = {"float32": np.float32, "float16": np.float16}


def sliding_window(config) -> int | None:
    """The attention window the model applies to at least one layer, or None (qwen2/3 keep the field unused unless
    use_sliding_window; gemma 2/3 and mistral/phi3 apply it whenever set)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(c, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    if getattr(c, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def rope_switch(config) -> int | None:
    """Where a longrope model switches from the short to the long rope factors (original_max_position_embeddings)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaling = getattr(c, "rope_scaling", None) or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "longrope":
        return None
    return getattr(c, "original_max_position_embeddings", None) or scaling.get("original_max_position_embeddings")


def validation_lengths(config, max_context: int) -> dict[str, int]:
    """Token counts of the validation run for a model: prefill, one multi-token decode call, one-token steps, and the
    context a validation tree hangs from. The prefill reaches min(max_context, max(window, rope switch, 32) + 8) so
    the decode calls and the tree's roots sit past the sliding window and the longrope switch point."""
    reach = max(sliding_window(config) or 0, rope_switch(config) or 0, REACH) + MARGIN
    prefill = max(1, min(reach, max_context - DECODE - STEPS))
    decode = max(1, min(DECODE, max_context - prefill - STEPS))
    steps = max(0, min(STEPS, max_context - prefill - decode))
    tree_context = max(1, min(reach, max_context - len(TREE_PARENTS)))
    return {"prefill": prefill, "decode": decode, "steps": steps, "tree_context": tree_context}


# The lengths of a model with no window and a large context (tests that call the functions below directly).
DEFAULT_LENGTHS = {"prefill": REACH + MARGIN, "decode": DECODE, "steps": STEPS, "tree_context": REACH + MARGIN}


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
             "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy(),
             "logits_to_keep": np.zeros(1, np.int64), **past,  # a fused graph's: 0 = every position's logits
             **beam_feeds(b, io.get("vocab"))}
    if tree.BIAS in io["inputs"]:  # a tree-attention graph: causal attention is the chain's bias
        feeds[tree.BIAS] = np.repeat(tree.attention_bias(tree.chain(s), p, _NP[io["dtype"]]), b, axis=0)
    return {k: v for k, v in feeds.items() if k in io["inputs"]}


def beam_feeds(batch: int, vocab: int | None, k: int = 1, bias: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A draft graph's beam head inputs (fused_graph.py): k, and a zero bias (nothing banned) unless given."""
    return {"beam_k": np.array([k], np.int64),
            "beam_bias": np.zeros((batch, vocab or 0), np.float32) if bias is None else bias}


def check_beam_head(path: Path, io: dict[str, Any], ids: np.ndarray, providers: list[str]) -> dict[str, Any]:
    """A draft's beam head against NumPy on the same call's logits, with two tokens of the first row banned (one its
    best): TopK(log_softmax(last logits + bias), k). Raises ExportError when they differ."""
    sess, ids = _session(path, providers), ids[:1, :12]
    probe = _call(sess, decoder_feeds(io, ids, None))[0][0, -1]
    k = min(4, probe.size)
    bias = np.zeros((1, probe.size), np.float32)
    bias[0, [int(probe.argmax()), 0]] = -np.inf
    feeds = {**decoder_feeds(io, ids, None), **beam_feeds(1, probe.size, k, bias)}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    x = out["logits"][0, -1].astype(np.float64) + bias[0]
    want = x - x.max() - np.log(np.exp(x - x.max()).sum())
    order = np.argsort(-want, kind="stable")[:k]
    diff = float(np.abs(out["beam_logprobs"][0] - want[order]).max())
    same = out["beam_ids"][0].tolist() == order.tolist()
    if not same or diff > 1e-4:
        raise ExportError(f"draft graph's beam head differs from NumPy (ids {out['beam_ids'][0].tolist()} vs "
                          f"{order.tolist()}, max diff {diff:.3g}); no bundle was written")
    return {"k": k, "max_abs_diff": diff, "ids_equal": same}


def _session(path: Path, providers: list[str]):
    import onnxruntime as ort

    from mjsd.runtime.session import session_options  # the process's thread pool, shared or per session

    opts = session_options()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers)


def _call(sess, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and the presents renamed as the next call's past."""
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return out["logits"], {n.replace("present", "past_key_values", 1): v for n, v in out.items()
                           if n.startswith("present.")}


def run_graph(path: Path, io: dict[str, Any], ids: np.ndarray, providers: list[str],
              lengths: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prefill, one multi-token decode call, then one-token steps over ids [B, T]; return the logits of every
    position [B, T, V], and the decode tokens' logits fed one call per token instead [B, decode, V]."""
    if ids.shape[0] > 1 and io.get("fused"):
        # a fused graph (GroupQueryAttention) refuses batch > 1 with several tokens and a past: one row at a time
        rows = [run_graph(path, io, ids[i:i + 1], providers, lengths) for i in range(ids.shape[0])]
        return tuple(np.concatenate(parts, axis=0) for parts in zip(*rows))
    n = lengths or DEFAULT_LENGTHS
    p, d = n["prefill"], n["decode"]
    sess = _session(path, providers)
    logits, past = _call(sess, decoder_feeds(io, ids[:, :p], None))
    parts, prefilled = [logits], past
    l2, past = _call(sess, decoder_feeds(io, ids[:, p:p + d], past))
    parts.append(l2)
    for t in range(p + d, ids.shape[1]):
        l3, past = _call(sess, decoder_feeds(io, ids[:, t:t + 1], past))
        parts.append(l3)
    singles, past = [], prefilled
    for t in range(p, p + d):
        l1, past = _call(sess, decoder_feeds(io, ids[:, t:t + 1], past))
        singles.append(l1)
    return np.concatenate(parts, axis=1), np.concatenate(singles, axis=1)


def run_tree(path: Path, io: dict[str, Any], ids: np.ndarray, providers: list[str], context: int) -> np.ndarray:
    """Prefill ids[:context], then the tree of nodes ids[context:] in one call; return its logits [S, V]."""
    sess = _session(path, providers)
    _, past = _call(sess, decoder_feeds(io, ids[None, :context], None))
    feeds = {"input_ids": ids[None, context:], "position_ids": tree.positions(TREE_PARENTS, context)[None],
             tree.BIAS: tree.attention_bias(TREE_PARENTS, context, _NP[io["dtype"]]), **past,
             "attention_mask": np.ones((1, context + len(TREE_PARENTS)), np.int64), "logits_to_keep": np.zeros(1, np.int64),
             **beam_feeds(1, io.get("vocab"))}
    return _call(sess, {k: v for k, v in feeds.items() if k in io["inputs"]})[0][0]


def reference_logits(src: Path, ids: np.ndarray, tree_ids: np.ndarray | None = None,
                     tree_context: int = DEFAULT_LENGTHS["tree_context"]):
    """PyTorch logits of ids [B, S]; with tree_ids (tree_context tokens + TREE_PARENTS nodes) also, per node, the
    last logits of a plain forward over the context and the node's path, [S, V]."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
        if tree_ids is None:
            return ref
        paths = [tree_context + np.array(tree.path(TREE_PARENTS, i)) for i in range(len(TREE_PARENTS))]
        rows = [np.concatenate([tree_ids[:tree_context], tree_ids[p]]) for p in paths]
        return ref, np.stack([model(input_ids=torch.from_numpy(r)[None]).logits[0, -1].float().numpy() for r in rows])


def _compare(ref: np.ndarray, got: np.ndarray, precision: str, role: str, what: str) -> dict[str, Any]:
    stats = compare_logits(ref, got)
    if not within(stats, precision):
        raise ExportError(f"{role} graph does not match PyTorch ({precision}, {what}): max |logit diff| "
                          f"{stats['max_abs_diff']:.3g} (relative {stats['rel']:.3g}, tolerance "
                          f"{TOLERANCES[precision]['rel']}), top-1 agreement {stats['top1_agreement']:.2f} (needs "
                          f">= {TOLERANCES[precision]['top1']}); the export is wrong, no bundle was written: try "
                          "another graph kind (--graph-kind standard, or without --tree-attention) or precision")
    return stats


def _first_bad_position(ref: np.ndarray, got: np.ndarray, precision: str) -> int | None:
    """The first sequence position whose logits leave the tolerance (names where a long-context bug starts)."""
    for t in range(ref.shape[1]):
        if not within(compare_logits(ref[:, t], got[:, t]), precision):
            return t
    return None


def exact_verification(precision: str, call_size: dict[str, float] | None) -> bool | None:
    """Whether verification of several tokens in one call gives the logits of one call per token: by design never
    for int8-dynamic, else as measured (None: not measured)."""
    if precision in NOT_EXACT_BY_DESIGN:
        return False
    if call_size is None:
        return None
    return call_size["rel"] <= EXACT_REL.get(precision, EXACT_REL_DEFAULT) and call_size["top1_agreement"] == 1.0


def validate_graph(path: Path, io: dict[str, Any], ref: np.ndarray, ids: np.ndarray, precision: str,
                   role: str, tree_ref: tuple[np.ndarray, np.ndarray] | None = None,
                   lengths: dict[str, int] | None = None) -> dict[str, Any]:
    """Run the graph and compare with `ref`; raise ExportError when outside the tolerance, else return the stats.
    tree_ref: (tree ids, PyTorch node logits) from `reference_logits` for a tree-attention graph."""
    import onnxruntime as ort

    n = lengths or DEFAULT_LENGTHS
    providers = ["CPUExecutionProvider"]
    if precision == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        got, singles = run_graph(path, io, ids, providers, n)
        got_tree = run_tree(path, io, tree_ref[0], providers, n["tree_context"]) if tree_ref is not None else None
    except Exception as e:
        if precision == "fp16" and providers[0] == "CPUExecutionProvider" and type(e).__name__ == "NotImplemented":
            # ORT's CPU EP lacks fp16 kernels for some ops; the graph is meant for a GPU EP, so do not refuse it.
            why = reason(e)
            warnings.warn(f"{role} fp16 graph not validated: onnxruntime's CPU provider cannot run it ({why})")
            return {"precision": precision, "skipped": f"CPU provider cannot run this fp16 graph: {why}"}
        raise ExportError(f"{role} graph failed to run in onnxruntime ({providers[0]}) during validation "
                          f"({reason(e)})") from None
    what = f"prefill {n['prefill']} + decode {n['decode']} + {n['steps']} one-token steps"
    if not within(compare_logits(ref, got), precision):
        bad = _first_bad_position(ref, got, precision)
        what += f", first wrong at token {bad + 1}" if bad is not None else ""
    stats = _compare(ref, got, precision, role, what)
    stats.update(precision=precision, provider=providers[0], tolerance=TOLERANCES[precision],
                 tokens=f"{what}, batch {ids.shape[0]}")
    p, d = n["prefill"], n["decode"]
    stats["call_size"] = compare_logits(got[:, p:p + d], singles)
    stats["exact_verification"] = exact_verification(precision, stats["call_size"])
    if stats["exact_verification"] is False and precision not in NOT_EXACT_BY_DESIGN:
        c = stats["call_size"]
        raise ExportError(f"{role} graph ({precision}) gives different logits for {d} tokens in one call than in "
                          f"{d} one-token calls (max diff {c['max_abs_diff']:.3g}, top-1 agreement "
                          f"{c['top1_agreement']:.2f}): speculative decoding would not be exact; no bundle was written")
    if "beam_k" in io["inputs"]:
        stats["beam_head"] = check_beam_head(path, io, ids, providers)
    if tree_ref is not None:
        stats["tree"] = _compare(tree_ref[1], got_tree, precision, role,
                                 f"tree of {len(TREE_PARENTS)} nodes after {n['tree_context']} tokens")
        stats["tree"]["parents"] = list(TREE_PARENTS)
        stats["tree"]["context"] = n["tree_context"]
    return stats


def sample_ids(vocab: int, lengths: dict[str, int] | None = None, seed: int = 0) -> np.ndarray:
    n = lengths or DEFAULT_LENGTHS
    return np.random.default_rng(seed).integers(0, vocab, size=(BATCH, n["prefill"] + n["decode"] + n["steps"]),
                                                dtype=np.int64)


def sample_tree_ids(vocab: int, lengths: dict[str, int] | None = None, seed: int = 1) -> np.ndarray:
    """Context and node tokens of the validation tree, [tree_context + len(TREE_PARENTS)]."""
    n = lengths or DEFAULT_LENGTHS
    return np.random.default_rng(seed).integers(0, vocab, size=n["tree_context"] + len(TREE_PARENTS), dtype=np.int64)
