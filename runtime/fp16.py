"""An fp16 copy of a fused fp32 graph, for CUDA (GroupQueryAttention has no fp32 CUDA kernel).

The fused graph (export/fused_graph.py) declares no intermediate types, so fp16 is its float initializers and its
float inputs/outputs in fp16; `logits` stays float32 (the graph ends in a Cast). The copy is cached by the graph's
sha256 under $MJSD_CACHE_DIR (default ~/.cache/mjsd/fp16) and written atomically, so a bundle converts once.
Needs the `onnx` package (in the gpu extra).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

from .bundle import ModelSpec, sha256_file


def cache_dir() -> Path:
    return Path(os.environ.get("MJSD_CACHE_DIR") or Path.home() / ".cache" / "mjsd") / "fp16"


def convert(src: Path, dst: Path) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(src))
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*model.graph.input, *model.graph.output]:
        if v.name != "logits" and v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=dst.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp, save_as_external_data=model.ByteSize() > 2**31 - 2**26,
                        location=dst.name + ".data")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fp16_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of the cached fp16 copy of a fused fp32 graph (converted on first use)."""
    digest = next(d for rel, d in spec.entry["files"].items() if rel == spec.entry["path"]) or sha256_file(spec.path)
    dst = cache_dir() / digest / "model.onnx"
    if not dst.is_file():
        convert(spec.path, dst)
    return dataclasses.replace(spec, root=dst.parent, entry={**spec.entry, "path": dst.name, "dtype": "float16"})
