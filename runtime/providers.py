"""Execution-provider choice and options for ONNX Runtime. Pure functions: testable without a GPU.

Preference names are short (tensorrt, cuda, cpu) or ORT's own (CUDAExecutionProvider...). The CPU provider is
always kept last as ORT's fallback for nodes the GPU providers cannot run.
"""
from __future__ import annotations

from .bundle import ModelSpec
from .errors import ConfigError

ORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_SHORT = {v: k for k, v in ORT_NAMES.items()}


def short_name(name: str) -> str:
    """'cuda' or 'CUDAExecutionProvider' -> 'cuda'; ConfigError for anything else."""
    key = _SHORT.get(name, name.lower())
    if key not in ORT_NAMES:
        raise ConfigError(f"unknown execution provider {name!r}: choose from {list(ORT_NAMES)}")
    return key


def select_providers(preference: list[str], available: list[str]) -> tuple[list[str], list[str]]:
    """Pick the preferred providers ORT actually has, in order; return (ORT provider names, reasons for skips)."""
    chosen, reasons = [], []
    for name in preference:
        key = short_name(name)
        ort_name = ORT_NAMES[key]
        if ort_name in chosen:
            continue
        if ort_name not in available:
            reasons.append(f"{key}: skipped, this onnxruntime build lacks {ort_name} (available: {available}); "
                           "install onnxruntime-gpu for cuda/tensorrt")
            continue
        chosen.append(ort_name)
    if ORT_NAMES["cpu"] not in chosen:
        if not chosen:
            reasons.append("cpu: none of the preferred providers is available, falling back to CPU")
        chosen.append(ORT_NAMES["cpu"])
    return chosen, reasons


def _shapes(spec: ModelSpec, batch: int, seq: int, past: int, total: int) -> str:
    """A TensorRT shape-profile string: 'input_ids:BxS,attention_mask:BxT,...,past_key_values...:BxHxPxD'."""
    dims = {"input_ids": (batch, seq), "attention_mask": (batch, total), "position_ids": (batch, seq),
            "attention_bias": (batch, 1, seq, total)}  # the 4-D bias of tree-attention graphs
    parts = [f"{n}:{'x'.join(map(str, d))}" for n, d in dims.items() if n in spec.inputs]
    kv = f"{batch}x{spec.num_kv_heads}x{past}x{spec.head_dim}"
    parts += [f"{name}:{kv}" for pair in spec.past_names() for name in pair]
    return ",".join(parts)


def provider_options(name: str, spec: ModelSpec, *, max_context: int, max_batch: int = 1, fp16: bool = False,
                     engine_cache_path: str | None = None, device_id: int = 0) -> dict:
    """ORT provider options for one provider and model.

    TensorRT gets one optimisation profile covering prefill (past 0, up to max_context tokens) and decode
    (1 token, past up to max_context - 1) for batch 1..max_batch, so engines are built once, not per shape.
    CPU threads are session options, not provider options (see session.py).
    """
    key = short_name(name)
    if max_context < 1 or max_batch < 1:
        raise ConfigError(f"max_context={max_context} and max_batch={max_batch} must both be >= 1")
    if key == "cpu":
        return {}
    if key == "cuda":
        # kSameAsRequested: grow the arena only by what is asked; the KV cache grows every step
        return {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested"}
    opts = {
        "device_id": device_id,
        "trt_fp16_enable": fp16,
        "trt_profile_min_shapes": _shapes(spec, 1, 1, 0, 1),
        "trt_profile_opt_shapes": _shapes(spec, max_batch, 1, max_context // 2, max_context // 2 + 1),
        "trt_profile_max_shapes": _shapes(spec, max_batch, max_context, max_context - 1, max_context),
    }
    if engine_cache_path:
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(engine_cache_path))
    return opts
