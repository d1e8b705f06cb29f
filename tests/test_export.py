"""The export stage: tiny random checkpoints -> bundles that match PyTorch, and every refusal it promises."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mjsd.runtime.bundle import MANIFEST, load_bundle
from mjsd.runtime.cli import main
from mjsd.runtime.errors import BundleError, ConfigError, ExportError
from tests.helpers import logits_atol, make_checkpoint, make_tokenizer

torch = pytest.importorskip("torch")


def _export(*args, **kwargs):
    from mjsd.export import export_bundle

    return export_bundle(*args, progress=False, **kwargs)


# --- running a bundle the way the runtime does: plain onnxruntime, inputs by name --------------------------------

def _ort_session(spec):
    import onnxruntime as ort

    return ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])


def _run(sess, spec, ids, past):
    """One call: ids [1, S] after `past` (list of (key, value) per layer); returns logits and the new past."""
    p = past[0][0].shape[2]
    s = ids.shape[1]
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, p + s), np.int64),
             "position_ids": np.arange(p, p + s, dtype=np.int64)[None], "logits_to_keep": np.zeros(1, np.int64),
             "beam_k": np.ones(1, np.int64), "beam_bias": np.zeros((1, spec.vocab_size), np.float32)}
    for (kn, vn), (k, v) in zip(spec.past_names(), past):
        feeds[kn], feeds[vn] = k, v
    if "attention_bias" in spec.inputs:  # a tree-capable graph: a chain needs no bias
        feeds["attention_bias"] = np.zeros((1, 1, ids.shape[1], feeds["attention_mask"].shape[1]), np.float32)
    feeds = {k: v for k, v in feeds.items() if k in spec.inputs}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return out["logits"], [(out[kn], out[vn]) for kn, vn in spec.present_names()]


def _torch_logits(ckpt, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids, np.int64))[None]).logits[0].numpy()


@pytest.mark.parametrize("role", ["target", "draft"])
def test_llama_prefill_decode_and_rollback_match_pytorch(role, llama_bundle, llama_checkpoints):
    check_prefill_decode_and_rollback(load_bundle(llama_bundle).model(role), llama_checkpoints[role == "draft"])


@pytest.mark.parametrize("role", ["target", "draft"])
def test_gpt2_prefill_decode_and_rollback_match_pytorch(role, gpt2_bundle, gpt2_checkpoints):
    check_prefill_decode_and_rollback(load_bundle(gpt2_bundle).model(role), gpt2_checkpoints[role == "draft"])


def check_prefill_decode_and_rollback(spec, ckpt):
    """The graph in plain onnxruntime (a fused one fed a concatenated past) against PyTorch."""
    sess = _ort_session(spec)
    rng = np.random.default_rng(1)
    prompt, draft, other = (rng.integers(0, 300, n) for n in (6, 4, 3))
    empty = [(np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32),) * 2] * spec.num_layers

    l1, past = _run(sess, spec, prompt[None], empty)  # prefill
    l2, past = _run(sess, spec, draft[None], past)  # 4-token decode in one call
    ref = _torch_logits(ckpt, np.concatenate([prompt, draft]))
    atol = logits_atol(spec.graph_kind)
    np.testing.assert_allclose(np.concatenate([l1[0], l2[0]]), ref, atol=atol)
    assert past[0][0].shape == (1, spec.num_kv_heads, 10, spec.head_dim)

    keep = 7  # rollback: keep the prompt and the first accepted draft token, then decode different tokens
    cropped = [(k[:, :, :keep], v[:, :, :keep]) for k, v in past]
    l3, _ = _run(sess, spec, other[None], cropped)
    ref = _torch_logits(ckpt, np.concatenate([prompt, draft[:1], other]))
    np.testing.assert_allclose(l3[0], ref[keep:], atol=atol)


def test_manifest_records_the_models(llama_bundle, llama_checkpoints):
    b = load_bundle(llama_bundle)
    m = b.manifest
    t, d = m["models"]["target"], m["models"]["draft"]
    # GQA with head_dim != hidden / heads, read from the graph
    assert (t["num_layers"], t["num_attention_heads"], t["num_kv_heads"], t["head_dim"], t["hidden_size"]) == \
        (3, 4, 2, 16, 48)
    assert (d["num_layers"], d["num_kv_heads"], d["head_dim"], d["hidden_size"]) == (1, 2, 16, 32)
    assert b.vocab_size == t["vocab_size"] == d["vocab_size"] == 300 and m["vocab_padded"] is False
    assert (b.bos_token_id, b.eos_token_id, m["pad_token_id"]) == (1, 2, 0)
    assert b.max_context == 256 and t["dtype"] == "float32" and t["quantization"] is None
    assert t["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "present.2.value" in t["outputs"] and "past_key_values.0.key" in d["inputs"]
    if t["graph_kind"] == "fused":  # the chain graph shares the tree graph's weights file
        assert set(t["files"]) == {"target/model.onnx", "target/model.onnx.data", "target/chain.onnx",
                                   "target/config.json"} and t["chain_path"] == "target/chain.onnx"
        assert t["validation"]["chain"]["max_abs_diff"] < logits_atol("fused")
    else:
        assert set(t["files"]) == {"target/model.onnx", "target/config.json"} and "chain_path" not in t
    assert t["num_parameters"] == sum(p.numel() for p in
                                      __import__("transformers").AutoModelForCausalLM.from_pretrained(
                                          llama_checkpoints[0]).parameters())
    assert t["validation"]["max_abs_diff"] < logits_atol(t.get("graph_kind", "standard"))
    assert t["validation"]["top1_agreement"] == 1.0
    prov = m["provenance"]
    assert prov["sources"]["target"] == str(llama_checkpoints[0])
    assert prov["versions"]["onnxruntime"] and prov["versions"]["optimum-onnx"] and prov["created_utc"]
    assert prov["options"]["opset"] == 18
    tok = b.load_tokenizer()
    assert tok.get_vocab_size() == 300 and tok.decode(tok.encode("hello world").ids) == "hello world"


def test_runtime_side_loading_needs_no_torch(llama_bundle):
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "from mjsd.runtime.bundle import load_bundle\n"
            f"b = load_bundle({str(llama_bundle)!r})\n"
            "s = ort.InferenceSession(str(b.target.path), providers=['CPUExecutionProvider'])\n"
            "b.load_tokenizer()\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiny_vocab_bundle(tiny_vocab_bundle):
    b = load_bundle(tiny_vocab_bundle)
    assert b.vocab_size == b.target.vocab_size == 12
    assert b.load_tokenizer().encode("a b c").ids == [4, 5, 6]


# --- options -------------------------------------------------------------------------------------------------------

def test_int8_is_smaller_and_per_model(llama_checkpoints, llama_bundle, tmp_path):
    fp32 = load_bundle(llama_bundle).manifest["models"]
    m = _export(*llama_checkpoints, tmp_path / "q", quantize={"target": "int8"}, max_context=64,
                graph_kind=fp32["target"]["graph_kind"])
    t, d = m["models"]["target"], m["models"]["draft"]
    assert t["quantization"] == "int8" and d["quantization"] is None
    assert t["size_bytes"] < 0.6 * fp32["target"]["size_bytes"]
    assert d["size_bytes"] > 0.9 * fp32["draft"]["size_bytes"]  # a fused graph's rotary cache follows max_context
    assert t["validation"]["precision"] == "int8" and t["validation"]["top1_agreement"] >= 0.75
    assert t["max_context"] == d["max_context"] == 64
    assert m["provenance"]["options"]["quantize"] == {"target": "int8", "draft": None}
    load_bundle(tmp_path / "q")


def test_external_weights_are_hashed_and_load(llama_checkpoints, tmp_path, monkeypatch):
    """Graphs over 2 GiB keep weights in a .data file; force that path with a zero size limit."""
    from mjsd.export import graph

    monkeypatch.setattr(graph, "_PROTO_LIMIT", 0)
    m = _export(*llama_checkpoints, tmp_path / "ext", quantize={"target": "int8"}, validate=False)
    assert "target/model.onnx.data" in m["models"]["target"]["files"]
    b = load_bundle(tmp_path / "ext")
    rng = np.random.default_rng(0)
    empty = [(np.zeros((1, 2, 0, 16), np.float32),) * 2] * 3
    logits, _ = _run(_ort_session(b.target), b.target, rng.integers(0, 300, (1, 4)), empty)
    assert logits.shape == (1, 4, 300) and np.isfinite(logits).all()
    assert oct((tmp_path / "ext" / "target" / "model.onnx.data").stat().st_mode & 0o444) == "0o444"
    data = tmp_path / "ext" / "target" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="model.onnx.data does not match its sha256"):
        load_bundle(tmp_path / "ext")


def test_fp16_records_kv_dtype_and_runs(gpt2_checkpoints, tmp_path):
    m = _export(*gpt2_checkpoints, tmp_path / "h", fp16=True)
    b = load_bundle(tmp_path / "h")
    assert b.target.dtype == b.draft.dtype == "float16" and m["models"]["target"]["fp16"] is True
    assert m["models"]["draft"]["validation"]["precision"] == "fp16"


def test_fp16_graph_cpu_cannot_run_is_recorded_not_refused(monkeypatch):
    from mjsd.export import validate

    missing_kernel = type("NotImplemented", (Exception,), {})

    def no_kernel(*args):
        raise missing_kernel("Could not find an implementation for SimplifiedLayerNormalization(1) node")

    monkeypatch.setattr(validate, "run_graph", no_kernel)
    with pytest.warns(UserWarning, match="draft fp16 graph not validated"):
        stats = validate.validate_graph(None, {}, None, None, "fp16", "draft")
    assert "SimplifiedLayerNormalization" in stats["skipped"]
    with pytest.raises(ExportError, match="target graph failed to run in onnxruntime"):
        validate.validate_graph(None, {}, None, None, "fp32", "target")


def test_padded_logit_width_is_allowed_and_recorded(tmp_path):
    tok = make_tokenizer(260)
    t = make_checkpoint(tmp_path / "t", tokenizer=tok, hidden=32, heads=2, layers=1, model_vocab_size=272)
    d = make_checkpoint(tmp_path / "d", tokenizer=tok, hidden=16, heads=2, layers=1, seed=1)
    m = _export(t, d, tmp_path / "b")
    assert m["vocab_size"] == 260 and m["vocab_padded"] is True
    assert (m["models"]["target"]["vocab_size"], m["models"]["draft"]["vocab_size"]) == (272, 260)


def test_bad_options_are_refused(llama_checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="int8, int4"):
        _export(*llama_checkpoints, tmp_path / "x", quantize="int3")
    with pytest.raises(ConfigError, match="unknown model role"):
        _export(*llama_checkpoints, tmp_path / "x", quantize={"targt": "int8"})
    with pytest.raises(ConfigError, match="do not combine"):
        _export(*llama_checkpoints, tmp_path / "x", quantize="int8", fp16=True)
    assert not (tmp_path / "x").exists()


# --- refusals ------------------------------------------------------------------------------------------------------

def test_tokenizer_mismatch_names_the_difference(llama_checkpoints, tmp_path):
    import shutil

    target, draft = llama_checkpoints
    other = make_checkpoint(tmp_path / "other", vocab_size=50, hidden=16, heads=2, layers=1)
    with pytest.raises(ExportError, match="tokenizer model type is 'BPE' in the target, 'WordLevel' in the draft"):
        _export(target, other, tmp_path / "b")
    # Same size, same tokens, two ids swapped: a size check would pass this.
    swapped = tmp_path / "swapped"
    shutil.copytree(draft, swapped)
    tj = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = [t for t, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match=f"tokenizers differ: token '.+' has id 100 in the target, 101 in the draft"):
        _export(target, swapped, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_first_difference_messages():
    from mjsd.export.tokenizer_check import first_difference

    base = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "foo": 5}, "merges": ["a b"]}, "added_tokens": [],
            "bos_token_id": 0, "eos_token_id": 1}
    assert first_difference(base, json.loads(json.dumps(base))) is None
    swapped = json.loads(json.dumps(base))
    swapped["model"]["vocab"]["foo"] = 7
    assert first_difference(base, swapped) == "token 'foo' has id 5 in the target, 7 in the draft"
    merges = json.loads(json.dumps(base))
    merges["model"]["merges"] = ["b a"]
    assert first_difference(base, merges).startswith("merge #0")
    eos = dict(base, eos_token_id=0)
    assert first_difference(base, eos) == "eos_token_id is 1 in the target, 0 in the draft"
    norm = dict(base, normalizer={"type": "NFC"})
    assert "normalizer" in first_difference(base, norm)


def test_missing_path_and_non_causal_lm_and_bad_config(llama_checkpoints, tmp_path):
    from transformers import BertConfig, BertModel

    target = llama_checkpoints[0]
    with pytest.raises(ExportError, match="does not exist"):
        _export(target, tmp_path / "nope", tmp_path / "b")
    with pytest.raises(ExportError, match="no config.json"):
        _export(target, tmp_path, tmp_path / "b")
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(ExportError, match="not a causal language model"):
        _export(target, bert, tmp_path / "b")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="cannot read config.json"):
        _export(broken, target, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_checkpoint_without_tokenizer_is_refused(llama_checkpoints, tmp_path):
    import shutil

    bare = shutil.copytree(llama_checkpoints[1], tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink()
    with pytest.raises(ExportError, match="draft checkpoint .*cannot load its tokenizer"):
        _export(llama_checkpoints[0], bare, tmp_path / "b")


@pytest.mark.parametrize("src, hub", [("Qwen/Qwen2.5-0.5B", True), ("gpt2", True), ("./models/x", False),
                                      ("/abs/x", False), ("a/b/c", False), ("~/x", False)])
def test_hub_ids_are_told_from_paths(src, hub):
    from mjsd.export.sources import _looks_like_hub_id

    assert _looks_like_hub_id(src) is hub


def test_failed_validation_leaves_nothing_and_keeps_the_old_bundle(llama_checkpoints, llama_bundle, tmp_path,
                                                                   monkeypatch):
    import shutil

    from mjsd.export import validate

    monkeypatch.setitem(validate.TOLERANCES, "fp32", {"rel": -1.0, "top1": 1.0})  # nothing can pass
    with pytest.raises(ExportError, match="does not match PyTorch"):
        _export(*llama_checkpoints, tmp_path / "new")
    old = tmp_path / "old"
    shutil.copytree(llama_bundle, old)
    before = (old / MANIFEST).read_text()
    with pytest.raises(ExportError, match="does not match PyTorch"):
        _export(*llama_checkpoints, old, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no partial bundle, no temp dir left
    assert (old / MANIFEST).read_text() == before
    load_bundle(old)


def test_out_is_never_clobbered(llama_checkpoints, llama_bundle, tmp_path):
    import shutil

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an mjsd bundle"):
        _export(*llama_checkpoints, precious, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    existing = tmp_path / "existing"
    shutil.copytree(llama_bundle, existing)
    with pytest.raises(ExportError, match="--force"):
        _export(*llama_checkpoints, existing)


def test_force_replaces_a_bundle(tiny_vocab_checkpoints, tiny_vocab_bundle, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(tiny_vocab_bundle, out)
    m = _export(*tiny_vocab_checkpoints, out, force=True, max_context=32, validate=False)
    assert load_bundle(out).max_context == 32 and m["models"]["target"]["validation"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# --- CLI -----------------------------------------------------------------------------------------------------------

def test_cli_export_json_and_inspect(tiny_vocab_checkpoints, tmp_path):
    out = tmp_path / "cli"
    t, d = map(str, tiny_vocab_checkpoints)
    r = CliRunner().invoke(main, ["export", "--target", t, "--draft", d, "--out", str(out), "--json", "-q",
                                  "--quantize-draft", "int8"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["bundle"] == str(out) and summary["vocab_size"] == 12
    assert summary["models"]["draft"]["quantization"] == "int8" and summary["models"]["target"]["quantization"] is None

    r = CliRunner().invoke(main, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "sha256 verified" in r.stdout and "2 layers" in r.stdout and "quantization int8" in r.stdout
    # the fused target has a chain graph; the quantized draft has new weights, so none
    assert "chain graph: target/chain.onnx" in r.stdout and "draft/chain.onnx" not in r.stdout
    r = CliRunner().invoke(main, ["inspect", str(out), "--json", "--no-verify"])
    assert json.loads(r.stdout)["models"]["target"]["num_kv_heads"] == 1


def test_cli_errors_are_one_line(tiny_vocab_checkpoints, tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: no model bundle")
    r = CliRunner().invoke(main, ["export", "--target", str(tiny_vocab_checkpoints[0]), "--draft",
                                  str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output and "does not exist" in r.stderr
