"""Execution-provider selection and options (pure functions, no GPU needed)."""
from pathlib import Path

import pytest

from mjsd.runtime.bundle import ModelSpec
from mjsd.runtime.errors import ConfigError
from mjsd.runtime.providers import provider_options, select_providers

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def spec(layers=2, gpt2=False, tree=False):
    inputs = ["input_ids", "attention_mask"] + ([] if gpt2 else ["position_ids"])
    inputs = ["input_ids", "position_ids", "attention_bias"] if tree else inputs
    inputs += [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ModelSpec("target", Path("/b"), dict(path="target/model.onnx", num_layers=layers, num_kv_heads=2,
                                                head_dim=16, vocab_size=300, max_context=256, dtype="float32",
                                                inputs=inputs, outputs=[]))


def test_preference_order_kept_and_cpu_last():
    chosen, reasons = select_providers(["tensorrt", "cuda", "cpu"], [TRT, CUDA, CPU])
    assert chosen == [TRT, CUDA, CPU] and reasons == []
    assert select_providers(["cuda"], [TRT, CUDA, CPU])[0] == [CUDA, CPU]


def test_unavailable_providers_skipped_with_reasons():
    chosen, reasons = select_providers(["tensorrt", "cuda", "cpu"], ["AzureExecutionProvider", CPU])
    assert chosen == [CPU]
    assert len(reasons) == 2 and reasons[0].startswith("tensorrt: skipped") and "onnxruntime-gpu" in reasons[0]
    chosen, reasons = select_providers(["cuda"], [CPU])
    assert chosen == [CPU] and "falling back to CPU" in reasons[-1]


def test_ort_names_and_duplicates_accepted():
    assert select_providers([CUDA, "cuda", "CPU"], [CUDA, CPU])[0] == [CUDA, CPU]


def test_unknown_provider_refused():
    with pytest.raises(ConfigError, match="unknown execution provider 'rocm'"):
        select_providers(["rocm"], [CPU])


def test_cpu_and_cuda_options():
    assert provider_options("cpu", spec(), max_context=256) == {}
    assert provider_options("cuda", spec(), max_context=256, device_id=1)["device_id"] == 1


def test_tensorrt_profiles_cover_prefill_and_decode():
    o = provider_options("tensorrt", spec(), max_context=256, max_batch=4, fp16=True, engine_cache_path="/c")
    assert o["trt_fp16_enable"] is True and o["trt_engine_cache_enable"] is True and o["trt_engine_cache_path"] == "/c"
    mins = dict(p.split(":") for p in o["trt_profile_min_shapes"].split(","))
    maxs = dict(p.split(":") for p in o["trt_profile_max_shapes"].split(","))
    opts = dict(p.split(":") for p in o["trt_profile_opt_shapes"].split(","))
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{kv}" for i in range(2)
                                                               for kv in ("key", "value")]
    assert list(mins) == names and list(maxs) == names and list(opts) == names
    assert mins["input_ids"] == "1x1" and mins["past_key_values.0.key"] == "1x2x0x16"  # prefill: empty past
    assert maxs["input_ids"] == "4x256" and maxs["attention_mask"] == "4x256"
    assert maxs["past_key_values.1.value"] == "4x2x255x16"
    assert opts["input_ids"] == "4x1" and opts["attention_mask"] == "4x129"
    assert "trt_engine_cache_enable" not in provider_options("tensorrt", spec(), max_context=256)


def test_tensorrt_profiles_follow_graph_inputs():
    o = provider_options("tensorrt", spec(gpt2=True), max_context=64)
    assert "position_ids" not in o["trt_profile_min_shapes"]
    o = provider_options("tensorrt", spec(tree=True), max_context=64, max_batch=2)
    assert o["trt_profile_max_shapes"].startswith("input_ids:2x64,position_ids:2x64,attention_bias:2x1x64x64,")
    assert "attention_mask" not in o["trt_profile_max_shapes"]


def test_bad_limits_refused():
    with pytest.raises(ConfigError, match="max_batch=0"):
        provider_options("cuda", spec(), max_context=256, max_batch=0)
