"""The fused graph builder: a Llama-family decoder as ONNX Runtime's fused ops, emitted directly from the weights.

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one MatMul for the packed Q/K/V,
GroupQueryAttention (rotary inside, from cos/sin caches), the output MatMul and the SiLU MLP (a draft's gate and up
in one MatMul, a target's in two): ~12 nodes a layer instead of ~160 in optimum's graph. This is the graph
onnxruntime-genai's model builder emits, written here with
the `onnx` helper instead of reusing the builder, because the builder needs transformers 5 (optimum-onnx, our
standard-graph exporter, caps transformers < 4.58) and its graph has neither `position_ids` nor a tree input.

Inputs: `input_ids` [B,S], `attention_mask` [B, past+S] (its row sums tell GroupQueryAttention how much of the KV
buffer is live: rollback is a shorter mask), `position_ids` [B,S], `attention_bias` [1 or B,1,S,past+S] (0 or the
dtype's lowest value; zeros for a chain, the tree mask for tree verification), `past_key_values.{i}.key/value`
[B, kv_heads, buffer, head_dim], `logits_to_keep` [1] (logits of the last k positions only; 0 = all). Outputs:
`logits` [B,S or k,V] float32, `present.{i}.key/value`. Bound to the same
buffer as the past (runtime/session.py), GroupQueryAttention writes the new entries in place; fed a plain past it
returns concat(past, new) like the standard graph. It rejects batch > 1 with S > 1 and a past (beams decode one
token a step; MCSD verifies as a tree).

Beside it, `chain.onnx` is the same graph without `position_ids` and `attention_bias`, sharing its weights file:
GroupQueryAttention then takes each token's position from the mask and is causal by itself, which is all a chain
needs, and each of the two inputs costs ~6% of a 1-token call on this CPU (BENCHMARKS.md). The runtime runs chains
on it and opens the tree graph only for tree verification.

A draft also gets `beam.onnx`: the chain graph plus a beam head for joint decoding's beam search, inputs `beam_k` [1]
and `beam_bias` [B,V] (0, or -inf where the n-gram ban removes a token), outputs `beam_logprobs` and `beam_ids` [B,k]
= TopK(LogSoftmax(the last position's logits + beam_bias), k): a beam step's best children come out of the draft call
instead of a second ONNX Runtime call over the logits (runtime/scoring.py), ~25 us a draft step less on this CPU
(BENCHMARKS.md). A graph of its own, because the head costs every other draft call (SpS) ~14 us.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mjsd.runtime.errors import ExportError
from mjsd.runtime.tree import BIAS

from .graph import GRAPH

CHAIN_GRAPH = "chain.onnx"
BEAM_GRAPH = "beam.onnx"
from .sources import reason

SUPPORTED = ("llama", "mistral", "qwen2")
OPSET = 18
MS = "com.microsoft"


def unsupported_reason(config, max_context: int) -> str | None:
    """Why the fused builder cannot express this model (None when it can); the export then keeps the standard kind."""
    mt = config.model_type
    if mt not in SUPPORTED:
        return f"model type {mt!r} (the fused builder covers {', '.join(SUPPORTED)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the fused builder emits SiLU MLPs)"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    rope = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        return f"rope scaling {kind!r} (its frequencies depend on the sequence length)"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_context:
        return f"a sliding window of {window} tokens below the context of {max_context}"
    if head_dim % 16:
        return f"head_dim {head_dim} (GroupQueryAttention's rotary needs a multiple of 16)"
    return None


def _np(t) -> np.ndarray:
    return t.detach().float().numpy()


class _Graph:
    """Nodes, initializers and value names of the graph being emitted."""

    def __init__(self, dtype):
        self.nodes, self.inits, self.dtype = [], [], dtype

    def init(self, name: str, a: np.ndarray, dtype=None) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(a, dtype=dtype or self.dtype), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", outputs=None,
             **attrs) -> list[str]:
        from onnx import helper

        outputs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs


def rotary_caches(model, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_context, head_dim / 2] from the model's own rotary module (its scaling included)."""
    import torch

    rot = model.model.rotary_emb
    pos = torch.arange(max_context)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
    half = cos.shape[-1] // 2
    return _np(cos[0, :, :half]), _np(sin[0, :, :half])


def emit(model, max_context: int, fp16: bool = False, packed_mlp: bool = True):
    """The fused ONNX ModelProto of a loaded HF Llama-family model; packed_mlp: gate and up as one MatMul (drafts)."""
    from onnx import TensorProto, helper

    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = float(cfg.rms_norm_eps)
    dt, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    g = _Graph(dt)
    layers = model.model.layers
    i64 = g.init("one", np.array([1], np.int64), np.int64)

    # GroupQueryAttention reads the live KV length per row (seqlens_k = mask sum - 1) and the total length
    mask_sum = g.node("ReduceSum", ["attention_mask", i64], "mask_sum", keepdims=0)[0]
    seqlens = g.node("Cast", g.node("Sub", [mask_sum, i64], "mask_sub"), "seqlens_k", to=TensorProto.INT32)[0]
    mask_len = g.node("Gather", [g.node("Shape", ["attention_mask"], "mask_shape")[0],
                                 g.init("axis1", np.array(1, np.int64), np.int64)], "mask_len", axis=0)
    total = g.node("Cast", mask_len, "total_len", to=TensorProto.INT32)[0]
    cos, sin = rotary_caches(model, max_context)
    g.init("cos_cache", cos)
    g.init("sin_cache", sin)

    embed = g.init("embed_tokens", _np(model.model.embed_tokens.weight))
    hidden = g.node("Gather", [embed, "input_ids"], "embed", axis=0)[0]
    norm_in = g.node("SimplifiedLayerNormalization", [hidden, g.init("norm0", _np(layers[0].input_layernorm.weight))],
                     "layers.0/input_norm", axis=-1, epsilon=eps)[0]
    residual = hidden
    ffn = cfg.intermediate_size
    if packed_mlp:
        mlp_split = g.init("mlp_split", np.array([ffn, ffn], np.int64), np.int64)
    else:
        zero, half_ffn, full_ffn = (g.init(f"mlp_at_{n}", np.array([n], np.int64), np.int64) for n in (0, ffn, 2 * ffn))
    for i, layer in enumerate(layers):
        a, p = layer.self_attn, f"layers.{i}"
        qkv_w = np.concatenate([_np(a.q_proj.weight), _np(a.k_proj.weight), _np(a.v_proj.weight)]).T
        qkv = g.node("MatMul", [norm_in, g.init(f"{p}.qkv.weight", qkv_w)], f"{p}/qkv")[0]
        if a.q_proj.bias is not None:
            bias = np.concatenate([_np(a.q_proj.bias), _np(a.k_proj.bias), _np(a.v_proj.bias)])
            qkv = g.node("Add", [qkv, g.init(f"{p}.qkv.bias", bias)], f"{p}/qkv_bias")[0]
        attn = g.node("GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                              seqlens, total, "cos_cache", "sin_cache", "position_ids", BIAS],
                      f"{p}/attn", domain=MS, outputs=[f"{p}/attn/out", f"present.{i}.key", f"present.{i}.value"],
                      num_heads=heads, kv_num_heads=kv_heads, scale=float(head_dim ** -0.5), do_rotary=1,
                      rotary_interleaved=0, local_window_size=-1)[0]
        o = g.node("MatMul", [attn, g.init(f"{p}.o.weight", _np(a.o_proj.weight).T)], f"{p}/o_proj")[0]
        norm_post, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization", [o, residual, g.init(f"{p}.post_norm",
                                                                     _np(layer.post_attention_layernorm.weight))],
            f"{p}/post_norm", n_out=4, domain=MS, epsilon=eps)
        m = layer.mlp
        # gate and up stored as one [H, 2I] tensor. A draft (one token a call) runs it as one MatMul and a Split:
        # one GEMM dispatch fewer per layer, 1.1% off a 1-token call of the built-in target. A target (prompt passes,
        # verification of many tokens) runs two MatMuls over Slices of it, which ONNX Runtime folds into two weights
        # at load: no Split copying [S, 2I], 4-6% off its calls of 25 to 115 tokens (BENCHMARKS.md, "Seventh pass")
        gate_up_w = np.concatenate([_np(m.gate_proj.weight).T, _np(m.up_proj.weight).T], axis=1)
        gate_up_name = g.init(f"{p}.gate_up.weight", gate_up_w)
        if packed_mlp:
            gate_up = g.node("MatMul", [norm_post, gate_up_name], f"{p}/gate_up")[0]
            gate, up = g.node("Split", [gate_up, mlp_split], f"{p}/mlp_split", n_out=2, axis=-1)
        else:
            halves = []
            for half, lo, hi in (("gate", zero, half_ffn), ("up", half_ffn, full_ffn)):
                weight = g.node("Slice", [gate_up_name, lo, hi, i64], f"{p}/{half}_w")[0]  # columns lo:hi (axes [1])
                halves.append(g.node("MatMul", [norm_post, weight], f"{p}/{half}")[0])
            gate, up = halves
        act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}/sigmoid")[0]], f"{p}/silu")[0], up],
                     f"{p}/swiglu")[0]
        down = g.node("MatMul", [act, g.init(f"{p}.down.weight", _np(m.down_proj.weight).T)], f"{p}/down")[0]
        last = i + 1 == len(layers)
        w = model.model.norm.weight if last else layers[i + 1].input_layernorm.weight
        norm_in, _, _, residual = g.node("SkipSimplifiedLayerNormalization",
                                         [down, residual, g.init(f"layers.{i + 1}.in_norm", _np(w))],
                                         f"layers.{i + 1}/input_norm", n_out=4, domain=MS, epsilon=eps)
    # logits_to_keep (Hugging Face's name): the lm_head runs on the last k positions only, 0 = all. A prompt pass needs
    # one row of its [S, V] logits (AR) or none (the others), and the lm_head is ~5% of a prompt pass here
    first = g.node("Neg", ["logits_to_keep"], "logits_to_keep/neg")[0]
    norm_in = g.node("Slice", [norm_in, first, g.init("slice_end", np.array([2 ** 62], np.int64), np.int64),
                               g.init("axis1_list", np.array([1], np.int64), np.int64)], "logits_to_keep/slice")[0]
    if cfg.tie_word_embeddings:
        lm_w = g.node("Transpose", [embed], "lm_head/transpose", perm=[1, 0])[0]
    else:
        lm_w = g.init("lm_head.weight", _np(model.lm_head.weight).T)
    if fp16:  # logits leave the graph as float32
        g.node("Cast", g.node("MatMul", [norm_in, lm_w], "lm_head"), "logits_fp32", outputs=["logits"],
               to=TensorProto.FLOAT)
    else:  # ORT keeps a float-to-float Cast: a copy of the logits a call
        g.node("MatMul", [norm_in, lm_w], "lm_head", outputs=["logits"])

    vocab = model.lm_head.weight.shape[0]
    kv = ["batch_size", kv_heads, "past_sequence_length", head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info(BIAS, elem, ["bias_batch_size", 1, "sequence_length",
                                                             "total_sequence_length"])]
    inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "logits_length", vocab])]
    for i in range(len(layers)):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", elem, kv))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", elem, ["batch_size", kv_heads, "present_sequence_length", head_dim]))
    graph = helper.make_graph(g.nodes, "mjsd_fused_decoder", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                             ir_version=9, producer_name="mjsd.export.fused_graph")


def build_fused_graph(src: Path, out_dir: Path, max_context: int, fp16: bool = False, beam_head: bool = False,
                      packed_mlp: bool = True) -> Path:
    """Emit the fused graph of the checkpoint at `src` into `out_dir` (fp32 for CPU, fp16 for CUDA), its chain graph,
    and with `beam_head` (drafts) the beam graph. packed_mlp: gate and up as one MatMul (see emit)."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    except Exception as e:
        raise ExportError(f"cannot load {src} for the fused export ({reason(e)})") from None
    why = unsupported_reason(model.config, max_context)
    if why:
        raise ExportError(f"the fused graph kind does not support {why}; export with --graph-kind standard")
    path = out_dir / GRAPH
    proto = emit(model, max_context, fp16, packed_mlp)
    # weights in one external file, so that chain.onnx can name the same file (saving moves them out of `proto`)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data")
    chain = chain_graph(proto)
    onnx.save_model(chain, str(out_dir / CHAIN_GRAPH))
    if beam_head:
        onnx.save_model(beam_graph(chain), str(out_dir / BEAM_GRAPH))
    return path


def chain_graph(proto):
    """The chain graph of a fused ModelProto (module docstring): its GroupQueryAttention nodes lose the optional
    position_ids and attention_bias inputs (the last two), and the graph loses those inputs. Edits `proto`."""
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            del node.input[9:]
    for name in ("position_ids", BIAS):
        proto.graph.input.remove(next(i for i in proto.graph.input if i.name == name))
    return proto


def beam_graph(chain):
    """The beam graph (module docstring) of a chain graph: a copy with the beam head, TopK(LogSoftmax(the last
    position's logits + beam_bias), beam_k)."""
    from onnx import TensorProto, helper, numpy_helper

    proto = type(chain)()
    proto.CopyFrom(chain)
    g = proto.graph
    vocab = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    g.initializer.append(numpy_helper.from_array(np.array(-1, np.int64), "last_position"))  # a scalar: [B, V]
    g.node.extend([helper.make_node("Gather", ["logits", "last_position"], ["beam/last"], "beam/last", axis=1),
                   helper.make_node("Add", ["beam/last", "beam_bias"], ["beam/banned"], "beam/ban"),
                   helper.make_node("LogSoftmax", ["beam/banned"], ["beam/log_probs"], "beam/log_softmax", axis=-1),
                   helper.make_node("TopK", ["beam/log_probs", "beam_k"], ["beam_logprobs", "beam_ids"], "beam/top_k",
                                    axis=-1)])
    g.input.extend([helper.make_tensor_value_info("beam_k", TensorProto.INT64, [1]),
                    helper.make_tensor_value_info("beam_bias", TensorProto.FLOAT, ["batch_size", vocab])])
    g.output.extend([helper.make_tensor_value_info("beam_logprobs", TensorProto.FLOAT, ["batch_size", "beam_k"]),
                     helper.make_tensor_value_info("beam_ids", TensorProto.INT64, ["batch_size", "beam_k"])])
    return proto
