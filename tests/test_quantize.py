"""Quantized targets: weight-only int8 / int4 (MatMulNBits) keep speculative decoding exact, int8-dynamic is labelled
as not exact; the manifest, `mjsd inspect` and the export's own check say which guarantee a bundle gives."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.cli import main
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import generate_ids
from mjsd.runtime.session import ModelSession
from tests.helpers import make_checkpoint, make_tokenizer
from tests.test_ar_sps import NoisyDraft

pytest.importorskip("torch")
KINDS = ("int8", "int4", "int8-dynamic")
PROMPTS = [[1, 17, 42, 99], [5, 250, 3, 8, 60, 61, 62]]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """One bundle per quantization of the target (fp32 draft); head_dim 8 keeps the standard graph."""
    from mjsd.export import export_bundle

    root = tmp_path_factory.mktemp("quant")
    tok = make_tokenizer(300)
    target = make_checkpoint(root / "t", tokenizer=tok, layers=2, hidden=48, heads=6, kv_heads=2, head_dim=8)
    draft = make_checkpoint(root / "d", tokenizer=tok, layers=1, hidden=16, heads=2, seed=1)
    return {q: export_bundle(target, draft, root / q, quantize={"target": q}, progress=False) and root / q
            for q in KINDS}


def _call_size_diff(spec) -> tuple[float, bool]:
    """Max |logit diff| between 5 draft tokens verified in one call and the same 5 in one-token calls, and whether
    their argmax agree everywhere."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]

    def call(ids, past):
        p = past[0][0].shape[2]
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, p + len(ids)), np.int64),
                 "position_ids": np.arange(p, p + len(ids))[None], "logits_to_keep": np.zeros(1, np.int64),
                 "beam_k": np.ones(1, np.int64), "beam_bias": np.zeros((1, spec.vocab_size), np.float32)}
        for (kn, vn), (k, v) in zip(spec.past_names(), past):
            feeds[kn], feeds[vn] = k, v
        out = dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in spec.inputs})))
        return out["logits"][0], [(out[kn], out[vn]) for kn, vn in spec.present_names()]

    rng = np.random.default_rng(0)
    prompt, drafted = rng.integers(0, 300, 9), rng.integers(0, 300, 5)
    empty = [(np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32),) * 2] * spec.num_layers
    _, past = call(prompt, empty)
    together, _ = call(drafted, past)
    alone = []
    for t in drafted:
        logits, past = call(np.array([t]), past)
        alone.append(logits[0])
    alone = np.stack(alone)
    return float(np.abs(together - alone).max()), bool((together.argmax(-1) == alone.argmax(-1)).all())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_weight_only_logits_do_not_depend_on_the_call_size(bundles, kind):
    b = load_bundle(bundles[kind])
    diff, same_argmax = _call_size_diff(b.target)
    assert diff < 1e-4 and same_argmax
    assert b.target.entry["exact_verification"] is True
    assert b.target.entry["validation"]["call_size"]["rel"] < 1e-5


def test_dynamic_int8_depends_on_the_call_size_and_says_so(bundles):
    b = load_bundle(bundles["int8-dynamic"])
    diff, _ = _call_size_diff(b.target)
    assert diff > 1e-3  # activation scales are per call: this is why it cannot promise SpS == AR
    assert b.target.entry["exact_verification"] is False
    assert b.target.entry["validation"]["call_size"]["max_abs_diff"] > 1e-3


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_sps_on_a_quantized_target_equals_ar(bundles, kind):
    b = load_bundle(bundles[kind])
    target, draft = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    twin = ModelSession(b.target, threads=1)
    for prompt in PROMPTS:
        greedy, _ = generate_ids(target, prompt, GenerationConfig(algo="ar", max_new_tokens=20))
        for d in (draft, NoisyDraft(twin, scale=0.5, seed=2)):  # own draft; a near-perfect one: long accepts
            out, stats = generate_ids(target, prompt, GenerationConfig(algo="sps", gamma=4, max_new_tokens=20),
                                      draft=d)
            assert out == greedy


def test_sizes_and_manifest(bundles):
    entries = {q: load_bundle(bundles[q]).manifest["models"]["target"] for q in KINDS}
    draft = load_bundle(bundles["int8"]).manifest["models"]["draft"]
    assert draft["quantization"] is None and draft["exact_verification"] is True
    assert entries["int4"]["size_bytes"] < entries["int8"]["size_bytes"]
    for q, e in entries.items():
        assert e["quantization"] == q and e["validation"]["precision"] == q
    ops = {n.op_type for n in __import__("onnx").load(str(load_bundle(bundles["int8"]).target.path)).graph.node}
    assert "MatMulNBits" in ops and "DynamicQuantizeLinear" not in ops


def test_inspect_states_the_guarantee(bundles):
    exact = CliRunner().invoke(main, ["inspect", str(bundles["int8"])])
    assert exact.exit_code == 0 and "verification: exact" in exact.output
    dynamic = CliRunner().invoke(main, ["inspect", str(bundles["int8-dynamic"])])
    assert "verification: NOT exact (int8-dynamic" in dynamic.output
    assert CliRunner().invoke(main, ["inspect", "--json", str(bundles["int8"])]).exit_code == 0


def test_cli_quantize_choices(tmp_path, monkeypatch):
    import mjsd.export
    from mjsd.runtime.errors import ExportError

    seen = {}

    def stop(target, draft, out, **kwargs):
        seen.update(kwargs)
        raise ExportError("stop here")

    monkeypatch.setattr(mjsd.export, "export_bundle", stop)
    r = CliRunner().invoke(main, ["export", "--target", "t", "--draft", "d", "--out", str(tmp_path / "b"),
                                  "--quantize", "int4", "--quantize-draft", "int8-dynamic"])
    assert "stop here" in r.output and seen["quantize"] == {"target": "int4", "draft": "int8-dynamic"}


def test_a_weight_only_graph_that_is_not_exact_is_refused(tmp_path, monkeypatch):
    """The call-size check can fail: with no slack at all even float rounding counts, and the export stops."""
    from mjsd.export import export_bundle, validate
    from mjsd.runtime.errors import ExportError

    monkeypatch.setattr(validate, "EXACT_REL_DEFAULT", -1.0)
    tok = make_tokenizer(300)
    t = make_checkpoint(tmp_path / "t", tokenizer=tok, layers=1, hidden=32, heads=4)
    with pytest.raises(ExportError, match="one call than in 3 one-token calls.*would not be exact"):
        export_bundle(t, t, tmp_path / "b", quantize="int8", progress=False)
    assert not (tmp_path / "b").exists()


def test_fused_targets_quantize_too(tmp_path):
    """The fused graph kind (GroupQueryAttention) takes the same quantizations with the same guarantees."""
    from mjsd.export import export_bundle

    tok = make_tokenizer(300)
    t = make_checkpoint(tmp_path / "t", tokenizer=tok, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16)
    d = make_checkpoint(tmp_path / "d", tokenizer=tok, layers=1, hidden=16, heads=1, head_dim=16, seed=1)
    for q in ("int8", "int8-dynamic"):
        e = export_bundle(t, d, tmp_path / q, quantize={"target": q}, progress=False)["models"]["target"]
        assert e["graph_kind"] == "fused" and e["exact_verification"] is (q == "int8")
    b = load_bundle(tmp_path / "int8")
    target, twin = ModelSession(b.target, threads=1), ModelSession(b.target, threads=1)
    for prompt in PROMPTS:
        greedy, _ = generate_ids(target, prompt, GenerationConfig(algo="ar", max_new_tokens=16))
        out, _ = generate_ids(target, prompt, GenerationConfig(algo="sps", gamma=4, max_new_tokens=16),
                              draft=NoisyDraft(twin, scale=0.5, seed=2))
        assert out == greedy
