"""Rebuild Hugging Face checkpoints (config.json + model.safetensors + tokenizer files) from a bundle's ONNX graphs.

The built-in bundle's training checkpoints are gone; its weights live only as ONNX initializers. This tool maps them
back onto a fresh `AutoModelForCausalLM` built from the `config.json` next to each `model.onnx`, so the bundle can be
re-exported (another graph kind) and peers can run the very same weights.

Matching: an initializer named like a parameter (`model.embed_tokens.weight`, with any wrapper prefix such as
`model.model.`) is taken as is; the TorchScript exporter stores each Linear weight transposed under an anonymous
`onnx::MatMul_*` name, so those are named by tracing the graph: the MatMul node that reads one is named after its
module (`/model/model/layers.0/self_attn/q_proj/MatMul` -> `model.layers.0.self_attn.q_proj.weight`); identical
parameters (e.g. untrained all-ones norms) are stored once and aliased by Identity nodes. Every parameter must be
matched with its exact shape; tied weights must agree. A fused-kind graph (export/fused_graph.py) names its
initializers per layer instead, with q/k/v concatenated: `fused_weights` maps those back. Finally the rebuilt
model's logits are compared with ONNX Runtime's on a few prompts (fails above 1e-4, 5e-3 for a fused graph, whose
kernels' rounding differs between CPUs).

    .venv/bin/python tools/bundle_to_hf.py runtime/builtin_bundle /tmp/builtin-hf
    # -> /tmp/builtin-hf/target, /tmp/builtin-hf/draft (each: config.json, model.safetensors, tokenizer files)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TOLERANCE = {"standard": 1e-4, "fused": 5e-3}  # by graph kind
PROMPTS = ("def fibonacci(n):\n", "import os\nimport sys\n\nclass Path", "    return self._cache[key]")


def onnx_weights(graph) -> dict[str, np.ndarray]:
    """Parameter name -> array, from initializer names and from the nodes that read anonymous ones."""
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # the exporter keeps one copy of identical parameters, aliased by Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    out = {name: arr for name, arr in inits.items() if not name.startswith("onnx::")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1].startswith("onnx::") and node.input[1] in inits:
            module = ".".join(node.name.split("/")[1:-1])  # "/model/model/layers.0/self_attn/q_proj/MatMul"
            out[module + ".weight"] = inits[node.input[1]].T  # MatMul(x, W^T) == Linear(W)
    return out


def fused_weights(graph, config) -> dict[str, np.ndarray]:
    """Parameter name -> array for a fused-kind graph (export/fused_graph.py): its initializers are named per layer
    (`layers.{i}.qkv.weight` = [q; k; v]^T, `.gate_up.weight` = [gate; up]^T (older bundles: `.gate`, `.up`),
    `.o/.down.weight` transposed, `norm0` = layer 0's input norm,
    `layers.{i+1}.in_norm` = the next input norm, the last one the final norm)."""
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    split = np.cumsum([heads * hd, kv * hd])
    out = {"model.embed_tokens.weight": inits["embed_tokens"], "model.layers.0.input_layernorm.weight": inits["norm0"],
           "lm_head.weight": inits["lm_head.weight"].T if "lm_head.weight" in inits else inits["embed_tokens"]}
    for i in range(layers):
        src, dst = f"layers.{i}", f"model.layers.{i}"
        for name, w in zip("qkv", np.split(inits[f"{src}.qkv.weight"].T, split)):
            out[f"{dst}.self_attn.{name}_proj.weight"] = w
        if f"{src}.qkv.bias" in inits:
            for name, b in zip("qkv", np.split(inits[f"{src}.qkv.bias"], split)):
                out[f"{dst}.self_attn.{name}_proj.bias"] = b
        out[f"{dst}.self_attn.o_proj.weight"] = inits[f"{src}.o.weight"].T
        out[f"{dst}.post_attention_layernorm.weight"] = inits[f"{src}.post_norm"]
        if f"{src}.gate_up.weight" in inits:  # packed [gate | up]^T (bundles exported since 2026-12-07)
            gate, up = np.split(inits[f"{src}.gate_up.weight"].T, 2)
            out[f"{dst}.mlp.gate_proj.weight"], out[f"{dst}.mlp.up_proj.weight"] = gate, up
        else:
            for name in ("gate", "up"):
                out[f"{dst}.mlp.{name}_proj.weight"] = inits[f"{src}.{name}.weight"].T
        out[f"{dst}.mlp.down_proj.weight"] = inits[f"{src}.down.weight"].T
        norm = "model.norm.weight" if i + 1 == layers else f"model.layers.{i + 1}.input_layernorm.weight"
        out[norm] = inits[f"layers.{i + 1}.in_norm"]
    return out


def rebuild(model_dir: Path):
    """A transformers model carrying the weights of `model_dir/model.onnx`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    graph = onnx.load(model_dir / "model.onnx").graph
    fused = any(t.name == "layers.0.qkv.weight" for t in graph.initializer)
    try:
        found = fused_weights(graph, config) if fused else onnx_weights(graph)
    except KeyError as e:
        raise SystemExit(f"{model_dir}: the fused graph has no initializer {e}: not a layout this tool knows") from None
    state = {}
    for name, param in model.state_dict().items():
        hits = [arr for key, arr in found.items() if key == name or key.endswith("." + name)]
        if not hits:
            raise SystemExit(f"{model_dir}: no ONNX weight for {name}")
        for arr in hits:
            if tuple(arr.shape) != tuple(param.shape):
                raise SystemExit(f"{model_dir}: {name} is {tuple(arr.shape)} in ONNX, {tuple(param.shape)} in HF")
            if not np.array_equal(arr, hits[0]):  # e.g. a tied lm_head stored twice
                raise SystemExit(f"{model_dir}: copies of {name} disagree")
        state[name] = torch.from_numpy(np.array(hits[0], np.float32))
    tied = ("lm_head.weight", "model.embed_tokens.weight")
    if config.tie_word_embeddings and all(k in state for k in tied) and not torch.equal(*(state[k] for k in tied)):
        raise SystemExit(f"{model_dir}: tie_word_embeddings but lm_head differs from embed_tokens")
    model.load_state_dict(state, strict=True)
    return model


def ort_logits(model_path: Path, config, ids: np.ndarray) -> np.ndarray:
    """Prefill logits of a bundle graph (either input convention: rank-2 mask or 4-D additive bias)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    s = ids.shape[1]
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    causal = np.triu(np.full((s, s), np.finfo(np.float32).min, np.float32), 1)[None, None]
    feed_all = {"input_ids": ids, "position_ids": np.arange(s, dtype=np.int64)[None],
                "attention_mask": np.ones((1, s), np.int64), "attention_bias": causal,
                "logits_to_keep": np.zeros(1, np.int64)}  # a fused graph's: 0 = all positions
    feed = {}
    feed_all.update(beam_k=np.ones(1, np.int64), beam_bias=np.zeros((1, config.vocab_size), np.float32))  # a draft's
    for i in sess.get_inputs():
        feed[i.name] = (np.zeros((1, kv, 0, hd), np.float32) if i.name.startswith("past_key_values")
                        else feed_all[i.name])
    return sess.run(["logits"], feed)[0]


def verify(model, model_dir: Path, tokenizer, tolerance: float) -> float:
    import torch

    worst = 0.0
    for prompt in PROMPTS:
        ids = np.array([tokenizer.encode(prompt).ids], np.int64)
        with torch.no_grad():
            hf = model(torch.from_numpy(ids)).logits.numpy()
        worst = max(worst, float(np.abs(hf - ort_logits(model_dir / "model.onnx", model.config, ids)).max()))
    if worst > tolerance:
        raise SystemExit(f"{model_dir}: HF vs ORT logits differ by {worst:.2e} (> {tolerance})")
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    manifest = json.loads((args.bundle / "bundle.json").read_text())
    tok_dir = (args.bundle / manifest["tokenizer"]["path"]).parent
    tokenizer = Tokenizer.from_file(str(args.bundle / manifest["tokenizer"]["path"]))
    for role, entry in manifest["models"].items():
        model_dir = (args.bundle / entry["path"]).parent
        model = rebuild(model_dir)
        diff = verify(model, model_dir, tokenizer, TOLERANCE[entry.get("graph_kind", "standard")])
        dest = args.out / role
        model.save_pretrained(dest, safe_serialization=True)
        for f in tok_dir.iterdir():
            shutil.copy2(f, dest / f.name)
        print(f"{role}: {sum(p.numel() for p in model.parameters())} parameters -> {dest} "
              f"(max |HF - ORT| logits {diff:.2e} over {len(PROMPTS)} prompts)")


if __name__ == "__main__":
    main()
