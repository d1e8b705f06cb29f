"""The tree-attention graph builder: a decoder graph that takes a 4-D additive attention bias and explicit position
ids, so one call can verify a whole tree of draft tokens (algorithms.md sections 5 and 8).

Same signature as `graph.build_decoder_graph` and the same KV layout and names as the optimum graph
(`past_key_values.{i}.key/value` in, `present.{i}.key/value` = concat(past, new) out), with `attention_bias`
float [B, 1, S, past+S] (0 = attend, a large negative number = masked) in place of the rank-2 `attention_mask`.
transformers >= 4.48 hands a 4-D mask to the attention layers as it is, so a thin torch wrapper suffices; it is
traced with the TorchScript exporter (dynamo=False, opset 18). Any architecture whose HF model honours a 4-D mask and
position_ids works; export-time validation (a tree bias included) refuses the rest.
"""
from __future__ import annotations

from pathlib import Path

from mjsd.runtime.errors import ExportError
from mjsd.runtime.tree import BIAS

from .graph import GRAPH, OPSET, _quiet
from .sources import config_dims, reason

# The architectures tests/test_families.py exports this way; others are tried and left to validation.
TESTED = ("llama", "qwen2", "qwen3", "phi3", "smollm3", "granite", "olmo2", "stablelm", "gpt2", "gpt_neox", "opt",
          "falcon")


def check_tree_support(config, max_context: int) -> None:
    """Refuse a tree-attention export the graph would get wrong: a 4-D bias replaces the model's own mask, so a
    sliding window would be ignored once the context outgrows it (the bias carries no window)."""
    from .validate import sliding_window

    window = sliding_window(config)
    if window is not None and window < max_context:
        raise ExportError(
            f"--tree-attention: {config.model_type} attends within a sliding window of {window} tokens, which the "
            f"tree graph's 4-D attention bias does not apply (it would be wrong past token {window}); export without "
            f"--tree-attention (the standard graph applies the window; sps, mtad, mcsd batch work), or pass "
            f"--max-context {window} or less")


def _wrapper(model, num_layers: int):
    import torch
    from transformers import DynamicCache

    class TreeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_bias, *past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_bias,
                             past_key_values=cache, use_cache=True, return_dict=True)
            presents = [t for i in range(num_layers) for t in (out.past_key_values.layers[i].keys,
                                                                out.past_key_values.layers[i].values)]
            return (out.logits, *presents)

    return TreeDecoder().eval()


def build_tree_graph(src: Path, out_dir: Path) -> Path:
    """Export the checkpoint at `src` as a tree-attention decoder graph (fp32, CPU) into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True,
                                                     attn_implementation="sdpa").eval()
    except Exception as e:
        raise ExportError(f"cannot load {src} for the tree-attention export ({reason(e)})") from None
    cfg = model.config
    layers = cfg.num_hidden_layers
    dims = config_dims(cfg)
    kv_heads, head_dim = dims["num_kv_heads"], dims["head_dim"]
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    # trace with a non-empty past and S > 1 so no dimension is specialised to 0 or 1
    b, s, past = 2, 3, 4
    args = (torch.zeros(b, s, dtype=torch.int64), torch.arange(past, past + s).repeat(b, 1),
            torch.zeros(b, 1, s, past + s), *[torch.zeros(b, kv_heads, past, head_dim) for _ in past_names])
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            BIAS: {0: "batch_size", 2: "sequence_length", 3: "total_sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
            **{n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names},
            **{n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names}}
    path = out_dir / GRAPH
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(_wrapper(model, layers), args, str(path), dynamo=False, opset_version=OPSET,
                              input_names=["input_ids", "position_ids", BIAS, *past_names],
                              output_names=["logits", *present_names], dynamic_axes=axes)
    except Exception as e:
        raise ExportError(f"the tree-attention export of {src} ({cfg.model_type}) failed ({reason(e)}); "
                          f"it is tested on {', '.join(TESTED)} models: export without --tree-attention") from None
    return path
