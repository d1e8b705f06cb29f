"""Loading a bundle refuses every kind of damage with a BundleError that says what is wrong."""
from __future__ import annotations

import json
import shutil

import pytest

from mjsd.runtime.bundle import MANIFEST, check_session_io, load_bundle, sha256_file
from mjsd.runtime.errors import BundleError


@pytest.fixture
def bundle(tiny_vocab_bundle, tmp_path):
    """A private copy of an exported bundle that a test may damage."""
    return shutil.copytree(tiny_vocab_bundle, tmp_path / "bundle")


def _edit(bundle, fn):
    m = json.loads((bundle / MANIFEST).read_text())
    fn(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def test_intact_bundle_loads(bundle):
    b = load_bundle(bundle)
    assert b.target.path.is_file() and b.draft.num_layers == 1 and b.max_context == 256


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nothing")
    with pytest.raises(BundleError, match="has no bundle.json"):
        load_bundle(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        load_bundle(tmp_path / "f")


def test_bad_json(bundle):
    (bundle / MANIFEST).write_text('{"format": "mjsd-bundle", ')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m.update(format="something-else"), "is this an mjsd bundle"),
    (lambda m: m["models"]["draft"].pop("head_dim"), "models.draft.head_dim is missing"),
    (lambda m: m["models"].pop("target"), "models.target is missing"),
    (lambda m: m.pop("tokenizer"), "field 'tokenizer' is missing"),
    (lambda m: m["models"]["target"].update(num_layers="2"), "models.target.num_layers is missing or not a int"),
    (lambda m: m.update(vocab_size=10**6), "smaller than the shared vocabulary"),
])
def test_edited_manifest(bundle, edit, message):
    _edit(bundle, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


def test_flipped_bytes_fail_the_sha256(bundle):
    graph = max((bundle / "target").iterdir(), key=lambda p: p.stat().st_size)  # the weights (fused: external)
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"target model: target/{graph.name} does not match its sha256"):
        load_bundle(bundle)
    load_bundle(bundle, verify=False)  # --no-verify skips the hash, so the next layer must catch it


def test_missing_file(bundle):
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer/tokenizer.json is missing"):
        load_bundle(bundle)


def test_truncated_graph_with_matching_sha_is_refused_at_load(bundle):
    graph = bundle / "draft" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    _edit(bundle, lambda m: m["models"]["draft"]["files"].update({"draft/model.onnx": sha256_file(graph)}))
    with pytest.raises(BundleError, match="draft model: draft/model.onnx is not a valid ONNX file"):
        load_bundle(bundle)  # the manifest is consistent; the protobuf walk for external data finds the cut


def test_well_formed_protobuf_that_is_no_graph_fails_clearly_in_the_session(bundle):
    from mjsd.runtime.session import ModelSession

    spec = load_bundle(bundle).draft
    graph = spec.chain_path or spec.path  # the graph a session opens first (fused: the chain graph)
    graph.write_bytes(b"\x08\x07")  # ModelProto{ir_version: 7} and nothing else
    rel = graph.relative_to(bundle).as_posix()
    _edit(bundle, lambda m: m["models"]["draft"]["files"].update({rel: sha256_file(graph)}))
    b = load_bundle(bundle)  # only ONNX Runtime can tell this is no usable graph
    with pytest.raises(BundleError, match="draft model .*ONNX Runtime could not load the graph"):
        ModelSession(b.draft)


def test_changed_io_names_are_refused(bundle):
    import onnxruntime as ort

    from mjsd.runtime.session import ModelSession

    _edit(bundle, lambda m: m["models"]["target"].update(
        inputs=[n.replace("past_key_values.1.", "past.1.") for n in m["models"]["target"]["inputs"]]))
    b = load_bundle(bundle)
    sess = ort.InferenceSession(str(b.target.path), providers=["CPUExecutionProvider"])
    with pytest.raises(BundleError, match=r"graph inputs do not match the manifest \(missing \['past.1.key'"):
        check_session_io(b.target, [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
    with pytest.raises(BundleError, match="do not match the manifest"):
        ModelSession(b.target)
