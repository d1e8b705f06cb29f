"""tools/bundle_to_hf.py: the checkpoint rebuilt from a bundle's ONNX initializers is the exported one, exactly."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bundle_to_hf.py"


def _tool():
    spec = importlib.util.spec_from_file_location("bundle_to_hf", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rebuild_and_compare(bundle, llama_checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    _tool().main([str(bundle), str(tmp_path)])  # also checks HF vs ORT logits (1e-4, fused 5e-3)
    for role, src in zip(("target", "draft"), llama_checkpoints):
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).state_dict()
        got = AutoModelForCausalLM.from_pretrained(tmp_path / role, dtype=torch.float32).state_dict()
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name].numpy(), err_msg=name)
        assert (tmp_path / role / "tokenizer.json").is_file()


def test_rebuilds_exported_weights(llama_tree_bundle, llama_checkpoints, tmp_path):
    _rebuild_and_compare(llama_tree_bundle, llama_checkpoints, tmp_path)  # traced MatMul names, Identity aliases


@pytest.mark.parametrize("llama_bundle", ["fused"], indirect=True)
def test_rebuilds_fused_graph_weights(llama_bundle, llama_checkpoints, tmp_path):
    """Per-layer names, q/k/v concatenated (GQA with 2 KV heads and head_dim != hidden / heads checks the split)."""
    _rebuild_and_compare(llama_bundle, llama_checkpoints, tmp_path)


@pytest.mark.parametrize("llama_bundle", ["fused"], indirect=True)
def test_reads_fused_graphs_with_gate_and_up_apart(llama_bundle):
    """Fused bundles exported before gate and up were packed into one MatMul keep loading into the same weights."""
    import onnx
    from onnx import numpy_helper
    from transformers import AutoConfig

    tool, model_dir = _tool(), llama_bundle / "target"
    graph = onnx.load(model_dir / "model.onnx").graph
    config = AutoConfig.from_pretrained(model_dir)
    want = tool.fused_weights(graph, config)
    for t in [t for t in graph.initializer if t.name.endswith(".gate_up.weight")]:
        gate, up = np.split(numpy_helper.to_array(t), 2, axis=1)
        graph.initializer.remove(t)
        graph.initializer.extend([numpy_helper.from_array(gate, t.name.replace("gate_up", "gate")),
                                  numpy_helper.from_array(up, t.name.replace("gate_up", "up"))])
    got = tool.fused_weights(graph, config)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
