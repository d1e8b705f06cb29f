"""The fused graph kind: its export, its shared in-place KV buffer, and its refusals.

Exactness on this kind (SpS/MCSD == AR at T=0, distributions, tree nodes, KV after every round) is covered by the
algorithm tests: llama_bundle and tiny_vocab_bundle are parametrized over both graph kinds (conftest.py).
"""
import numpy as np
import onnx
import pytest

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.errors import BundleError, ExportError
from mjsd.runtime.kvcache import KVCache
from mjsd.runtime.session import ModelSession, check_fused_support
from tests.helpers import logits_atol

IDS = [1, 17, 42, 99, 7, 250, 3, 8, 11, 12]


@pytest.fixture(scope="module")
def fused(llama_bundle):
    b = load_bundle(llama_bundle)
    if b.target.graph_kind != "fused":
        pytest.skip("fused-kind test")
    return b


def fresh(session, ids):
    c = session.new_cache()
    session.forward(ids, c)
    return c


def assert_same_kv(cache, ref):
    assert (cache.batch, cache.length) == (ref.batch, ref.length)
    for got, want in zip(cache.arrays(), ref.arrays()):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_export_records_and_validates_the_fused_kind(fused, llama_checkpoints, tmp_path):
    from mjsd.export import export_bundle

    for role in ("target", "draft"):
        e = fused.manifest["models"][role]
        assert e["graph_kind"] == "fused" and e["tree_attention"] and e["validation"]["rel"] < 1e-3
        assert e["validation"]["tree"]["max_abs_diff"] < logits_atol("fused")
        assert {"attention_mask", "position_ids", "attention_bias"} <= set(e["inputs"])
    std = export_bundle(*llama_checkpoints, tmp_path / "std", progress=False, graph_kind="standard")
    nodes = {kind: len(onnx.load(str(root / "target/model.onnx"), load_external_data=False).graph.node)
             for kind, root in (("fused", fused.root), ("standard", tmp_path / "std"))}
    assert nodes["fused"] * 5 < nodes["standard"], nodes  # 3 layers: ~40 nodes vs ~500
    assert std["models"]["target"]["graph_kind"] == "standard"


def test_unsupported_models_keep_the_standard_kind(gpt2_checkpoints, tmp_path):
    from mjsd.export import export_bundle

    with pytest.raises(ExportError, match="fused graph kind does not support model type 'gpt2'.*--graph-kind standard"):
        export_bundle(*gpt2_checkpoints, tmp_path / "f", progress=False, graph_kind="fused", validate=False)
    assert not (tmp_path / "f").exists()
    m = export_bundle(*gpt2_checkpoints, tmp_path / "auto", progress=False, validate=False)
    assert m["models"]["target"]["graph_kind"] == "standard"
    assert any("standard graph kind" in a for a in m["provenance"]["adjustments"])


def test_shared_buffer_rollback_reorder_keep_and_growth(fused):
    s = ModelSession(fused.target, threads=1)
    c = KVCache.for_model(fused.target, shared=True)
    c.capacity = 0  # start empty: every forward below grows the buffer (kept live prefix)
    c.keys = [k[:, :, :0] for k in c.keys]
    c.values = [v[:, :, :0] for v in c.values]
    logits = s.forward(IDS[:6], c)
    np.testing.assert_allclose(logits, s.forward(IDS[:6], s.new_cache()), atol=1e-4)
    assert c.capacity >= 6
    s.forward([200, 201, 202], c)  # a rejected draft...
    c.crop(6)  # ...rolled back for free
    s.forward(IDS[6:8], c)
    assert_same_kv(c, fresh(s, IDS[:8]))
    c.repeat(3)  # beams: rows of one token a step
    out = s.forward([[20], [30], [40]], c)
    for r, t in enumerate((20, 30, 40)):
        np.testing.assert_allclose(out[r, -1], s.forward(IDS[:8] + [t], s.new_cache())[0, -1], atol=1e-4)
    c.gather([2, 0])
    assert_same_kv(c, _rows(s, [IDS[:8] + [40], IDS[:8] + [20]]))
    c.gather([0])
    tree = s.forward_tree([5, 6, 7], [-1, 0, 0], c)  # then keep the path 5 -> 7
    np.testing.assert_allclose(tree[0, 2], s.forward(IDS[:8] + [40, 5, 7], s.new_cache())[0, -1], atol=1e-4)
    c.keep(list(range(9)) + [9, 11])
    assert_same_kv(c, fresh(s, IDS[:8] + [40, 5, 7]))


def test_step_equals_forward_across_buffer_growth_rollback_and_other_calls(fused):
    """step (AR's per-token call) takes its short path only while the cache's binding and mask are as it left them:
    its logits and KV equal forward's through buffer growth, a rollback and calls of other shapes on the cache."""
    s = ModelSession(fused.target, threads=1)
    c = KVCache.for_model(fused.target, shared=True)
    c.capacity = 0  # start empty: the steps below cross the buffer's growth
    c.keys = [k[:, :, :0] for k in c.keys]
    c.values = [v[:, :, :0] for v in c.values]
    s.forward(IDS[:2], c, last=1)
    fed = IDS[:2]
    for t in IDS[2:] + [3, 4]:
        if len(fed) == 7:
            s.forward([200, 201], c)  # a call of another shape, then a rollback: step must rebuild its state
            c.crop(7)
        got = s.step(t, c).copy()
        fed = fed + [t]
        np.testing.assert_allclose(got, s.forward(fed, s.new_cache())[0, -1], atol=1e-4)
    assert c.capacity >= len(fed)
    assert_same_kv(c, fresh(s, fed))


def _rows(s, seqs):
    """A cache holding each sequence in its own row (as beams would)."""
    c = s.new_cache()
    s.forward(seqs[0][:1], c)
    c.repeat(len(seqs))
    for t in range(1, len(seqs[0])):
        s.forward([[q[t]] for q in seqs], c)
    return c


def test_device_branch_matches_host(fused):
    """The device path (OrtValue buffers, gathers by a tiny ORT graph), run with host OrtValues."""
    host, dev = ModelSession(fused.target, threads=1), ModelSession(fused.target, threads=1, io_binding=True)
    assert dev.device == ("cpu", 0)
    a, b = host.new_cache(), dev.new_cache()
    for s, c in ((host, a), (dev, b)):
        s.forward(IDS[:6], c)
        c.crop(4)
        c.repeat(2)
        s.forward([[11], [13]], c)
        c.gather([1])
        s.forward_tree([5, 6], [-1, -1], c)
        c.keep([0, 1, 2, 3, 4, 6])
    assert_same_kv(b, a)
    assert_same_kv(a, fresh(host, IDS[:4] + [13, 6]))


@pytest.mark.parametrize("io_binding", [None, True])
def test_logits_of_the_last_positions_only(llama_bundle, io_binding):
    """forward(last=k): a fused graph's logits_to_keep runs the lm_head on k positions (a standard graph's logits are
    sliced); the logits and the KV cache equal those of a full call, and the next full call still gets every row."""
    spec = load_bundle(llama_bundle).target
    fused = spec.graph_kind == "fused"
    assert ("logits_to_keep" in spec.inputs and "logits_to_keep" in spec.chain_inputs) == fused
    s = ModelSession(spec, threads=1, io_binding=io_binding)
    full, part = s.new_cache(), s.new_cache()
    want = s.forward(IDS[:7], full)
    got = s.forward(IDS[:7], part, last=1)
    assert got.shape == (1, 1, want.shape[2])
    np.testing.assert_allclose(got[0, 0], want[0, -1], atol=1e-5)
    assert_same_kv(part, full)
    for k in (2, 3, 1, 0):  # after a past, and back to every row (0) on the same binding
        want = s.forward(IDS[7:10], full)
        got = s.forward(IDS[7:10], part, last=k)
        np.testing.assert_allclose(got, want[:, -k:] if k else want, atol=1e-5)
        full.crop(7), part.crop(7)
    assert_same_kv(part, full)


def test_a_tree_without_context_feeds_its_root_first(fused):
    s = ModelSession(fused.target, threads=1)
    c = s.new_cache()
    logits = s.forward_tree([5, 6, 7], [-1, 0, 0], c)[0]
    np.testing.assert_allclose(logits[2], s.forward([5, 7], s.new_cache())[0, -1], atol=1e-4)
    with pytest.raises(ValueError, match="one root first"):
        s.forward_tree([5, 6], [-1, -1], s.new_cache())


def test_refused_at_load_where_it_cannot_run(fused):
    with pytest.raises(BundleError, match="onnxruntime >= 1.22.*--graph-kind standard"):
        check_fused_support(fused.target, on_gpu=False, version="1.18.1")
    with pytest.raises(BundleError, match="no float32 CUDA kernel.*--fp16"):
        check_fused_support(fused.target, on_gpu=True)
    check_fused_support(fused.target, on_gpu=False)


def test_fp16_copy_for_cuda_matches_fp32(fused, tmp_path, monkeypatch):
    """What a float32 fused bundle runs as on CUDA (fp16=True, the built-in bundle's default): checked on the CPU EP,
    which has fp16 kernels for these ops."""
    from mjsd.runtime.fp16 import fp16_spec

    monkeypatch.setenv("MJSD_CACHE_DIR", str(tmp_path))
    spec = fp16_spec(fused.target)
    assert spec.dtype == "float16" and spec.path.is_file() and spec.path.is_relative_to(tmp_path)
    assert fp16_spec(fused.target).path.stat().st_mtime_ns == spec.path.stat().st_mtime_ns  # cached, not redone
    half, full = ModelSession(spec, threads=1), ModelSession(fused.target, threads=1)
    a, b = half.new_cache(), full.new_cache()
    assert a.dtype == np.float16
    got, want = half.forward(IDS, a), full.forward(IDS, b)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 2e-2 * max(1.0, np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    # the draft's beam graph too: its head stays float32 on the fp16 copy's float32 logits
    draft = fp16_spec(fused.draft)
    assert draft.beam_path.is_file() and draft.beam_path.is_relative_to(tmp_path)
    half, full = ModelSession(draft, threads=1), ModelSession(fused.draft, threads=1)
    (v16, t16), (v32, t32) = (s.forward_top([IDS[:4]], s.new_cache(), 3, [[t]]) for s, t in ((half, 5), (full, 5)))
    assert t16[0][0] == t32[0][0] and abs(v16[0][0] - v32[0][0]) < 5e-2 and 5 not in t16[0]


def test_bindings_are_reused_and_released_with_their_cache(fused):
    import gc
    import weakref

    s = ModelSession(fused.target, threads=1)
    c = s.new_cache()
    s.forward(IDS[:4], c)
    prompt = s._bindings[c][1, False]
    first = s.forward([5], c)
    kept = first.copy()
    binding = s._bindings[c][1, True]  # one token a row: decode steps keep a binding of their own
    s.forward([9], c)  # same shape: ORT writes into the same bound logits array, which callers never see
    np.testing.assert_array_equal(first, kept)
    s.forward([10, 11], c)
    s.forward([12], c)
    assert s._bindings[c] == {(1, False): prompt, (1, True): binding}  # same buffers: kept, only small inputs set
    c.repeat(2)
    s.forward([[6], [7]], c)
    assert s._bindings[c][2, True] is not binding  # a new row count (here also new, bigger buffers): a new binding
    c.gather([1])
    s.forward([8], c)
    one, two = s._bindings[c][1, True], s._bindings[c][2, True]
    c.gather([0, 0])
    s.forward([[6], [7]], c)
    c.gather([1])
    s.forward([8], c)
    assert {key: b for key, b in s._bindings[c].items() if key[1]} == {(1, True): one, (2, True): two}  # a beam draft switches row counts every round: bound once each
    buffer = weakref.ref(c.keys[0])
    del c, binding, prompt, one, two
    gc.collect()
    assert len(s._bindings) == 0 and buffer() is None  # a finished generation's buffers are not kept alive


def test_chains_run_on_the_chain_graph_and_trees_open_the_tree_graph(fused, tmp_path):
    """The chain graph (no position_ids / attention_bias) runs every chain, with the same KV buffer as the tree
    graph, which opens on the first tree; a fused bundle without a chain graph runs everything on its one graph."""
    import json
    import shutil

    s = ModelSession(fused.target, threads=1)
    assert s._tree_sess is None and {i.name for i in s._sess.get_inputs()}.isdisjoint({"position_ids",
                                                                                        "attention_bias"})
    c = s.new_cache()
    s.forward(IDS[:6], c)
    s.forward(IDS[6:8], c)
    tree = s.forward_tree([5, 6, 7], [-1, 0, 0], c)
    assert s._tree_sess is not None
    np.testing.assert_allclose(tree[0, 2], s.forward(IDS[:8] + [5, 7], s.new_cache())[0, -1], atol=1e-4)
    c.keep(list(range(8)) + [8, 10])
    assert_same_kv(c, fresh(s, IDS[:8] + [5, 7]))
    # copy=False: the session's own logits array, which the next call on this cache overwrites (AR reads it at once)
    assert s.forward([9], c, copy=False) is s.forward([3], c, copy=False) is not s.forward([4], c)
    old = tmp_path / "old"  # a fused bundle from before chain graphs
    shutil.copytree(fused.root, old)
    m = json.loads((old / "bundle.json").read_text())
    for e in m["models"].values():
        for key in ("chain_path", "beam_path"):
            if key in e:
                del e["files"][e.pop(key)]
    (old / "bundle.json").write_text(json.dumps(m))
    one = ModelSession(load_bundle(old).target, threads=1)
    assert one._tree_sess is one._sess
    a, b = one.new_cache(), s.new_cache()
    for x, y in ((one.forward(IDS[:6], a), s.forward(IDS[:6], b)), (one.forward([9], a), s.forward([9], b))):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_a_finished_generations_cache_is_reused(fused):
    """The driver hands a generation's caches back; the next generation gets the same buffers (and binding), empty
    and one row again, with the logits of a fresh cache."""
    from mjsd.runtime.config import GenerationConfig
    from mjsd.runtime.decoding.driver import generate_ids

    s = ModelSession(fused.target, threads=1)
    c = s.new_cache()
    s.forward(IDS, c)
    c.repeat(2)
    s.release(c)
    d = s.new_cache()
    assert d is c and (d.length, d.batch) == (0, 1) and s.new_cache() is not c
    np.testing.assert_allclose(s.forward(IDS[:5], d), s.forward(IDS[:5], KVCache.for_model(fused.target, shared=True)),
                               atol=1e-5)
    cfg = GenerationConfig(algo="ar", max_new_tokens=6, ignore_eos=True)
    first, _ = generate_ids(s, IDS, cfg)
    kept = list(s._spare)
    assert kept and generate_ids(s, IDS, cfg)[0] == first and s._spare == kept  # taken and handed back
