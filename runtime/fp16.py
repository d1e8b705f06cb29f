"""An fp16 copy of a fused fp32 graph, for CUDA (GroupQueryAttention has no fp32 CUDA kernel).

The fused graph (export/fused_graph.py) declares no intermediate types, so fp16 is its float initializers and its
float inputs/outputs in fp16; `logits` stays float32 (a Cast is appended where the graph has none). The copy is
cached by the graph's sha256 under $MJSD_CACHE_DIR (default ~/.cache/mjsd/fp16) and written atomically, so a bundle
converts once.
Needs the `onnx` package (in the gpu extra).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

from .bundle import BEAM_INPUTS, BEAM_OUTPUTS, ModelSpec, sha256_file


# What stays float32: the logits, and a beam graph's head, which works on them (export/fused_graph.py)
FLOAT32_IO = ("logits", *BEAM_INPUTS, *BEAM_OUTPUTS)


def cache_dir() -> Path:
    return Path(os.environ.get("MJSD_CACHE_DIR") or Path.home() / ".cache" / "mjsd") / "fp16"


def convert(src: Path, dst: Path) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(src))
    last = next(n for n in model.graph.node if "logits" in n.output)
    if last.op_type != "Cast":  # an fp32 graph ends in the lm_head MatMul: cast its fp16 output back to float32
        last.output[list(last.output).index("logits")] = "logits_fp16"
        model.graph.node.append(onnx.helper.make_node("Cast", ["logits_fp16"], ["logits"], name="logits_fp32",
                                                      to=TensorProto.FLOAT))
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*model.graph.input, *model.graph.output]:
        if v.name not in FLOAT32_IO and v.type.tensor_type.elem_type == TensorProto.FLOAT:
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
    """The spec of the cached fp16 copy of a fused fp32 graph, and of its chain and beam graphs if any (converted on
    first use; each copy holds its own weights)."""
    digest = next(d for rel, d in spec.entry["files"].items() if rel == spec.entry["path"]) or sha256_file(spec.path)
    entry = {**spec.entry, "path": "model.onnx", "dtype": "float16"}
    for key, name in (("chain_path", "chain.onnx"), ("beam_path", "beam.onnx")):
        if key in entry:
            entry[key] = name
    for src, name in ((spec.path, "model.onnx"), (spec.chain_path, "chain.onnx"), (spec.beam_path, "beam.onnx")):
        dst = cache_dir() / digest / name
        if src is not None and not dst.is_file():
            convert(src, dst)
    return dataclasses.replace(spec, root=cache_dir() / digest, entry=entry)
