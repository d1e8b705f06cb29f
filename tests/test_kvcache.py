"""KVCache operations (pure and against real exported graphs) and ModelSession loading/forward."""
import json
import shutil

import numpy as np
import pytest

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.errors import BundleError, ConfigError, ContextLengthError
from mjsd.runtime.kvcache import KVCache
from mjsd.runtime.session import ModelSession


def filled(batch=1, length=5, layers=2, max_context=16):
    c = KVCache(layers, 2, 3, max_context, batch)
    rng = np.random.default_rng(0)
    c.update([rng.normal(size=(batch, 2, length, 3)).astype(np.float32) for _ in range(2 * layers)])
    return c


def test_empty_cache_shape():
    c = KVCache(3, 2, 4, 32, batch=2, dtype=np.float16)
    assert c.length == 0 and c.batch == 2 and c.num_layers == 3
    assert all(t.shape == (2, 2, 0, 4) and t.dtype == np.float16 for t in c.arrays())


def test_crop_keeps_prefix():
    c = filled()
    before = c.arrays()
    c.crop(3)
    assert c.length == 3 and all((a == b[:, :, :3]).all() for a, b in zip(c.arrays(), before))
    c.crop(3)
    assert c.length == 3
    with pytest.raises(ValueError):
        c.crop(4)


def test_keep_selects_positions_in_order():
    c = filled(length=6)
    before = c.arrays()
    c.keep([0, 1, 4, 5])
    assert c.length == 4 and all((a == b[:, :, [0, 1, 4, 5]]).all() for a, b in zip(c.arrays(), before))
    with pytest.raises(ValueError, match="within 0..3"):
        c.keep([4])


def test_repeat_and_gather():
    c = filled()
    row = c.arrays()
    c.repeat(3)
    assert c.batch == 3 and all((a == np.repeat(r, 3, axis=0)).all() for a, r in zip(c.arrays(), row))
    with pytest.raises(ValueError, match="batch-1"):
        c.repeat(2)
    d = filled(batch=4)
    rows = d.arrays()
    d.gather([2, 2, 0])
    assert d.batch == 3 and all((a == r[[2, 2, 0]]).all() for a, r in zip(d.arrays(), rows))
    with pytest.raises(ValueError, match="within 0..2"):
        d.gather([3])


def test_shared_buffer_gather_moves_rows_in_any_order():
    """In place: only the rows that change are copied when no source is overwritten first; swaps and cycles take
    the general path. Every order must equal the fancy-indexed rows of the live prefix."""
    orders = [[0, 1, 2, 3], [0, 0, 1, 1], [1, 1, 3, 3], [3, 2, 1, 0], [1, 2, 3, 0], [2], [0], [3, 3, 3, 3], [1, 0]]
    for idx in orders:
        c = KVCache(2, 2, 3, 16, batch=4, shared=True, capacity=8)
        c.reserve(5)
        for t in c.keys + c.values:
            t[...] = np.random.default_rng(len(idx)).normal(size=t.shape)
        c.advance(5)
        before = [a.copy() for a in c.arrays()]  # arrays() are views of the buffer
        c.gather(idx)
        assert c.batch == len(idx), idx
        for got, want in zip(c.arrays(), before):
            np.testing.assert_array_equal(got, want[idx], err_msg=str(idx))


def test_shared_buffer_moves_only_what_rows_do_not_share():
    """A beam reorder copies only the positions after those every buffer row shares (KVCache.same): random model
    writes, fan-outs, reorders, crops, keeps, growth and resets must leave the live rows equal to a reference that
    copies everything."""
    rng = np.random.default_rng(7)
    for trial in range(60):
        c = KVCache(1, 2, 3, 64, shared=True, capacity=4)
        ref = [np.zeros((1, 2, 0, 3), np.float32) for _ in range(2)]
        for _ in range(40):
            op = rng.choice(["write", "write", "gather", "crop", "keep", "reset"])
            if op == "write" and c.length < 56:  # what GroupQueryAttention does: new positions of every live row
                s = int(rng.integers(1, 4))
                c.reserve(s)
                for t, r in zip(c.keys + c.values, range(2)):
                    new = rng.normal(size=(c.batch, 2, s, 3)).astype(np.float32)
                    t[: c.batch, :, c.length:c.length + s] = new
                    ref[r] = np.concatenate([ref[r], new], axis=2)
                c.advance(s)
            elif op == "gather":
                idx = rng.integers(0, c.batch, int(rng.integers(1, 5)))
                if c.batch == 1 and rng.random() < 0.5:
                    idx = np.zeros(int(rng.integers(2, 5)), np.int64)  # a fan-out (repeat)
                c.gather(idx)
                ref = [a[idx] for a in ref]
            elif op == "crop" and c.length:
                n = int(rng.integers(0, c.length + 1))
                c.crop(n)
                ref = [a[:, :, :n] for a in ref]
            elif op == "keep" and c.length:
                pos = np.sort(rng.choice(c.length, int(rng.integers(1, c.length + 1)), replace=False))
                c.keep(pos)
                ref = [a[:, :, pos] for a in ref]
            elif op == "reset":
                c.reset()
                ref = [np.zeros((1, 2, 0, 3), np.float32) for _ in range(2)]
            for got, want in zip(c.arrays(), ref):
                np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}, after {op}")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_cache_ops_match_host_ops(dtype):
    """OrtValue caches (the GPU path) run every op as a Gather graph on their device; here the device is the CPU."""
    from onnxruntime import OrtValue

    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=(1, 2, 6, 3)).astype(dtype) for _ in range(4)]
    host, dev = KVCache(2, 2, 3, 16, dtype=dtype), KVCache(2, 2, 3, 16, dtype=dtype, device=("cpu", 0))
    host.update(arrays)
    dev.update([OrtValue.ortvalue_from_numpy(a) for a in arrays])
    for op, arg in (("keep", [0, 1, 3, 5]), ("crop", 3), ("repeat", 3), ("gather", [2, 0])):
        getattr(host, op)(arg)
        getattr(dev, op)(arg)
        assert (dev.length, dev.batch) == (host.length, host.batch)
        assert all(isinstance(t, OrtValue) for t in dev.keys + dev.values)
        assert all(x.dtype == dtype and (x == y).all() for x, y in zip(dev.arrays(), host.arrays()))


def test_overflow_refused_up_front():
    c = filled(length=10, max_context=16)
    c.check_fits(6)
    with pytest.raises(ContextLengthError, match="10 cached \\+ 7 new tokens exceed the model's context of 16; "
                                                 "only 6 more fit"):
        c.check_fits(7)


# ---- real graphs -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(llama_bundle):
    return ModelSession(load_bundle(llama_bundle).target, threads=1)


def test_session_forward_grows_cache_and_matches_full_forward(llama):
    ids = np.array([[1, 17, 42, 99, 7, 250, 3]])
    full = llama.forward(ids, llama.new_cache())
    c = llama.new_cache()
    a = llama.forward(ids[:, :4], c)
    b = llama.forward(ids[:, 4:], c)
    assert c.length == 7 and a.shape == (1, 4, llama.spec.vocab_size) and a.dtype == np.float32
    assert np.allclose(np.concatenate([a, b], axis=1), full, atol=1e-4)
    assert llama.calls >= 3 and llama.time_s > 0


def test_crop_then_forward_equals_fresh_prefix(llama):
    ids = [1, 17, 42, 99, 7, 250, 3, 8]
    c = llama.new_cache()
    llama.forward(ids, c)
    c.crop(5)  # roll back 3 tokens, then feed different ones
    out = llama.forward([11, 12], c)
    fresh = llama.new_cache()
    ref = llama.forward(ids[:5] + [11, 12], fresh)
    assert np.allclose(out, ref[:, 5:], atol=1e-4)
    assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(c.arrays(), fresh.arrays()))


def test_repeat_and_gather_rows_behave_like_separate_sequences(llama):
    prefix = [1, 5, 9, 13]
    c = llama.new_cache()
    llama.forward(prefix, c)
    c.repeat(3)
    rows = np.array([[20, 21], [30, 31], [40, 41]])
    if llama.fused:  # GroupQueryAttention runs rows of one token after a past (beams); MCSD verifies as a tree
        rows = rows[:, :1]
    batched = llama.forward(rows, c)
    for r in range(3):
        assert np.allclose(batched[r], llama.forward(prefix + rows[r].tolist(), llama.new_cache())[0, 4:], atol=1e-4)
    c.gather([2])  # pick the winner row
    nxt = llama.forward([[7]], c)
    ref = llama.forward(prefix + rows[2].tolist() + [7], llama.new_cache())
    assert np.allclose(nxt[0, -1], ref[0, -1], atol=1e-4)


def test_forward_refuses_overflow_before_running(llama):
    c = llama.new_cache()
    calls = llama.calls
    with pytest.raises(ContextLengthError):
        llama.forward(np.ones((1, llama.spec.max_context + 1), dtype=np.int64), c)
    assert llama.calls == calls and c.length == 0


def test_gpt2_feeds_by_name(gpt2_bundle):
    s = ModelSession(load_bundle(gpt2_bundle).target, threads=1)
    c = s.new_cache()
    a = s.forward([1, 2, 3], c)
    b = s.forward([4], c)
    assert np.allclose(b[0, -1], s.forward([1, 2, 3, 4], s.new_cache())[0, -1], atol=1e-4)
    assert a.shape[1] == 3


def _copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_graph_is_a_bundle_error(llama_bundle, tmp_path):
    root = _copy_bundle(llama_bundle, tmp_path / "b")
    spec = load_bundle(root, verify=False).target
    spec.path.write_bytes(b"not an onnx graph")
    if spec.chain_path is not None:  # fused: chains run on the chain graph, the tree graph opens on the first tree
        s = ModelSession(spec)
        with pytest.raises(BundleError, match="model.onnx: ONNX Runtime could not load the graph.*re-export"):
            s.forward_tree([5, 6], [-1, 0], s.new_cache())
        spec.chain_path.write_bytes(b"not an onnx graph")
    with pytest.raises(BundleError, match="could not load the graph.*re-export"):
        ModelSession(spec)


def test_graph_io_mismatch_is_a_bundle_error(llama_bundle, tmp_path):
    root = _copy_bundle(llama_bundle, tmp_path / "b")
    m = json.loads((root / "bundle.json").read_text())
    m["models"]["target"]["inputs"].append("token_type_ids")
    (root / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="do not match the manifest"):
        ModelSession(load_bundle(root, verify=False).target)


def test_io_binding_branch_matches_plain_feeds(llama_bundle):
    """The GPU branch (KV kept as OrtValues, presents rebound as the next past), run with host OrtValues."""
    from onnxruntime import OrtValue

    spec = load_bundle(llama_bundle).target
    if spec.graph_kind == "fused":
        pytest.skip("a fused graph always runs bound to its shared KV buffer")
    plain, bound = ModelSession(spec, threads=1), ModelSession(spec, threads=1, io_binding=True)
    assert plain.device is None and bound.device == ("cpu", 0)
    ids = [1, 17, 42, 99, 7, 250, 3, 8]
    c = bound.new_cache()
    assert isinstance(c.keys[0], OrtValue)
    first = bound.forward(ids[:6], c)
    c.crop(4)
    c.repeat(2)
    nxt = bound.forward([[11, 12], [13, 14]], c)
    c.gather([1])
    last = bound.forward([15], c)
    assert isinstance(c.keys[0], OrtValue) and c.length == 7 and bound.calls == 3 and bound.time_s > 0
    assert np.allclose(first, plain.forward(ids[:6], plain.new_cache()), atol=1e-5)
    for row, toks in enumerate(([11, 12], [13, 14])):
        assert np.allclose(nxt[row], plain.forward(ids[:4] + toks, plain.new_cache())[0, 4:], atol=1e-4)
    ref = plain.new_cache()
    assert np.allclose(last[0, -1], plain.forward(ids[:4] + [13, 14, 15], ref)[0, -1], atol=1e-4)
    assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(c.arrays(), ref.arrays()))


def test_tree_forward_equals_causal_paths_and_keep_compacts(llama_bundle, llama_tree_bundle):
    """The standard kind's tree graph, and a fused graph (which takes a tree bias itself), against causal paths."""
    plain = ModelSession(load_bundle(llama_bundle).target, threads=1)
    treed = ModelSession(load_bundle(llama_bundle if plain.fused else llama_tree_bundle).target, threads=1)
    context = [1, 17, 42, 99]
    c = treed.new_cache()
    assert np.allclose(treed.forward(context, c), plain.forward(context, plain.new_cache()), atol=1e-4)  # a chain
    parents = [-1, -1, 0, 0, 1, 2]  # two roots, then children and a grandchild
    tokens = [5, 6, 7, 8, 9, 10]
    logits = treed.forward_tree(tokens, parents, c)
    assert c.length == len(context) + len(tokens) and logits.shape[:2] == (1, 6)
    for node, path in ((2, [0, 2]), (4, [1, 4]), (5, [0, 2, 5])):
        ref = plain.forward(context + [tokens[i] for i in path], plain.new_cache())
        assert np.allclose(logits[0, node], ref[0, -1], atol=1e-4)
    c.keep(list(range(len(context))) + [len(context) + i for i in (0, 2, 5)])  # accept the path 0 -> 2 -> 5
    fresh = plain.new_cache()
    plain.forward(context + [5, 7, 10], fresh)
    assert all(np.allclose(x, y, atol=1e-5) for x, y in zip(c.arrays(), fresh.arrays()))
    if not plain.fused:
        with pytest.raises(ConfigError, match="no tree attention"):
            plain.forward_tree([5], [-1], plain.new_cache())
