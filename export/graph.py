"""Build one model's ONNX graph and transform it (int8 weights, fp16), and read its I/O back.

`build_decoder_graph` is the standard graph builder (optimum's text-generation-with-past decoder: one graph for
prefill and multi-token decode); tree_graph.py's `build_tree_graph` (4-D additive bias, for tree verification) has the
same signature, (checkpoint folder, output folder) -> graph path.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from mjsd.runtime.errors import ExportError

from .sources import TASK, reason

OPSET = 18
GRAPH = "model.onnx"
# ONNX TensorProto element types the manifest names.
_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32"}
# A protobuf cannot exceed 2 GiB: bigger graphs keep their weights in an external data file.
_PROTO_LIMIT = 2**31 - 2**26


@contextlib.contextmanager
def _quiet():
    """Silence tracer warnings and route stray prints to stderr, so stdout stays clean for --json."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # optimum logs under "optimum", onnxruntime.quantization on the root logger.
    loggers = [logging.getLogger("optimum"), logging.getLogger()]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        for lg, level_ in zip(loggers, old):
            lg.setLevel(level_)


def build_decoder_graph(src: Path, out_dir: Path) -> Path:
    """Export the checkpoint at `src` with optimum (opset 18, fp32, CPU) into `out_dir`; return the graph path."""
    from optimum.exporters.onnx import main_export

    from .sources import load_config, optimum_limitation

    if why := optimum_limitation(load_config(src, "checkpoint")):
        raise ExportError(f"cannot export {src} ({_architecture(src)}) with optimum: {why}; export it as a target "
                          "with --tree-attention (mjsd's own torch export, which follows transformers' cache)")
    try:
        with _quiet():
            main_export(str(src), out_dir, task=TASK, opset=OPSET, device="cpu", do_validation=False,
                        local_files_only=True, library_name="transformers")
    except Exception as e:
        raise ExportError(f"optimum could not export {src} ({_architecture(src)}) as {TASK} ({reason(e)}); "
                          "try --tree-attention (mjsd's own torch export), or an architecture optimum supports") from None
    path = out_dir / GRAPH
    if not path.is_file():
        raise ExportError(f"optimum exported {src} but wrote no {GRAPH} (got {sorted(p.name for p in out_dir.iterdir())})")
    return path


def _architecture(src: Path) -> str:
    """The checkpoint's architecture for an error message (model_type and class names from config.json)."""
    import json

    try:
        cfg = json.loads((Path(src) / "config.json").read_text(encoding="utf-8"))
        return " / ".join(str(x) for x in [cfg.get("model_type"), *(cfg.get("architectures") or [])] if x)
    except (OSError, ValueError):
        return "unreadable config.json"


def read_io(path: Path) -> dict[str, Any]:
    """Input/output names and the KV cache layout, read from the graph itself (not from the config)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = [i.name for i in g.input], [o.name for o in g.output]
    past = [i for i in g.input if i.name.startswith("past_key_values.")]
    if "input_ids" not in inputs or "logits" not in outputs or not past:
        raise ExportError(f"{path}: the graph is not a decoder with a KV cache (inputs {inputs[:4]}..., "
                          f"outputs {outputs[:3]}...)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in past[0].type.tensor_type.shape.dim]
    logits = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim
    return {"inputs": inputs, "outputs": outputs, "num_layers": len(past) // 2, "num_kv_heads": dims[1],
            "vocab": logits[-1].dim_value if logits and logits[-1].HasField("dim_value") else None,
            "head_dim": dims[3], "dtype": _DTYPES.get(past[0].type.tensor_type.elem_type, "unknown"),
            "fused": any(n.op_type == "GroupQueryAttention" for n in g.node)}


def _save(model, path: Path) -> None:
    import onnx

    big = model.ByteSize() > _PROTO_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=path.name + ".data")


# Weight-only blocks of 32 input channels (onnxruntime-genai's builder default); symmetric like its int4 models.
BLOCK_SIZE = 32
# kind -> (bits, MatMulNBits accuracy_level). Measured on this CPU (tools/quant_quality.py): int8 with int8 compute
# (level 4) is ~2x faster than fp32 and its logits do not depend on the call size; int4 with level 4 does depend on
# it (max diff ~1e-2 between 5 tokens in one call and 5 one-token calls), so int4 keeps fp32 compute (level 0, also
# ~2x faster than fp32). The export measures it again on every graph (validate.py) and refuses a non-exact one.
_NBITS = {"int8": (8, 4), "int4": (4, None)}


def quantize(src: Path, dst: Path, kind: str) -> None:
    """Quantize the weights of src into dst. int8 / int4: blockwise weights (ORT MatMulNBits; int8 compute quantizes
    activations per token row, so a call's logits do not depend on how many tokens it carries); int8-dynamic:
    quantize_dynamic (int8 weights, activation scales per call: verification is no longer exact)."""
    big = src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob(src.name + ".data*")) > _PROTO_LIMIT
    if kind == "int8-dynamic":
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        try:
            with _quiet():  # DefaultTensorType: the fused graph's contrib ops defeat ONNX shape inference
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=big,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        except Exception as e:
            raise ExportError(f"onnxruntime's quantize_dynamic could not quantize {src.name} ({reason(e)}); export "
                              "without --quantize, or with --quantize int8 (weight-only)") from None
        return
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits, accuracy = _NBITS[kind]
    try:
        with _quiet():
            q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=accuracy)
            q.process()
    except Exception as e:
        raise ExportError(f"onnxruntime's MatMulNBits quantizer could not quantize {src.name} to {kind} ({reason(e)}); "
                          "export without --quantize, or try another --quantize value") from None
    _save(q.model.model, dst)


def convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and I/O (KV cache, logits) for GPU execution; ids and masks stay int64."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with _quiet():
        model = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    _save(model, dst)


def graph_files(path: Path) -> list[Path]:
    """The graph and every external data file it references (what the manifest must hash)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    names = {path.name}
    for t in model.graph.initializer:
        if uses_external_data(t):
            names.update(e.value for e in t.external_data if e.key == "location")
    return [path.parent / n for n in sorted(names)]
