"""The tree-attention graph builder: a decoder graph that takes a 4-D additive attention bias and explicit position
ids, so one call can verify a whole tree of draft tokens (algorithms.md sections 5 and 8).

Same signature as `graph.build_decoder_graph` and the same KV layout and names as the optimum graph
(`past_key_values.{i}.key/value` in, `present.{i}.key/value` = concat(past, new) out), with `attention_bias`
float [B, 1, S, past+S] (0 = attend, a large negative number = masked) in place of the rank-2 `attention_mask`.
transformers >= 4.48 hands a 4-D mask to the attention layers as it is, so a thin torch wrapper suffices; it is
traced with the TorchScript exporter (dynamo=False, opset 18). Any architecture whose HF model honours a 4-D mask and
position_ids works; export-time validation (a tree bias included) refuses the rest.

A 4-D mask replaces the model's own, sliding window included, so the wrapper applies the window itself from the
positions (past keys at 0..past-1, new ones at position_ids): for models that mix full and sliding layers (Gemma 2/3,
Qwen2 with max_window_layers) it hands transformers one mask per attention type. Validation runs past the window with
the tree's roots behind it (validate.validation_lengths), so a graph without the window is refused.
"""
from __future__ import annotations

from pathlib import Path

from mjsd.runtime.errors import ExportError
from mjsd.runtime.tree import BIAS

from .graph import GRAPH, OPSET, _quiet
from .sources import config_dims, reason
from .validate import sliding_window

# The architectures tests/test_families.py exports this way; others are tried and left to validation.
TESTED = ("llama", "qwen2", "qwen3", "phi3", "smollm3", "granite", "olmo2", "stablelm", "gpt2", "gpt_neox", "opt",
          "falcon")


def _windowed(bias, position_ids, past_key, window: int):
    """The bias with every key more than `window` - 1 positions behind its query masked (transformers' sliding window:
    a query at q sees keys k with q - k < window). Past keys sit at positions 0..past-1, the new ones at
    position_ids; positions come from the tensors so the traced graph keeps every length dynamic."""
    import torch

    past_pos = torch.cumsum(torch.ones_like(past_key[:, 0, :, 0], dtype=torch.int64), dim=1) - 1  # [B, past]
    key_pos = torch.cat([past_pos, position_ids], dim=1)  # [B, past + S]
    far = (position_ids[:, :, None] - key_pos[:, None, :]) >= window  # [B, S, past + S]
    return bias.masked_fill(far[:, None], torch.finfo(bias.dtype).min)


def _wrapper(model, num_layers: int, window: int | None, per_layer: bool):
    """window: the sliding window to apply in the bias; per_layer: the model mixes full and sliding layers and takes
    one mask per attention type (transformers' {"full_attention": ..., "sliding_attention": ...})."""
    import torch
    from transformers import DynamicCache

    class TreeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_bias, *past):
            cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            mask = attention_bias
            if window is not None:
                sliding = _windowed(attention_bias, position_ids, past[0], window)
                mask = {"full_attention": attention_bias, "sliding_attention": sliding} if per_layer else sliding
            out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
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
    window = sliding_window(cfg)
    types = set(getattr(cfg, "layer_types", None) or ())
    per_layer = window is not None and "full_attention" in types
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
            torch.onnx.export(_wrapper(model, layers, window, per_layer), args, str(path), dynamo=False, opset_version=OPSET,
                              input_names=["input_ids", "position_ids", BIAS, *past_names],
                              output_names=["logits", *present_names], dynamic_axes=axes)
    except Exception as e:
        raise ExportError(f"the tree-attention export of {src} ({cfg.model_type}) failed ({reason(e)}); "
                          f"it is tested on {', '.join(TESTED)} models: export without --tree-attention") from None
    return path
