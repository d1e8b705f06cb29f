"""The fused graph kind on each family it covers (README's "fused" column): export with --graph-kind fused,
validation, AR equal to a PyTorch greedy loop, SpS == AR and MCSD (as a tree) == AR at T=0, MTAD and MMTAD; the
families it does not cover are refused with the reason (and `auto` falls back to the standard kind)."""
from __future__ import annotations

import pytest

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import generate_ids
from mjsd.runtime.errors import ExportError
from mjsd.runtime.session import ModelSession
from tests.families import FUSED, make_family_checkpoint
from tests.helpers import make_checkpoint, make_tokenizer
from tests.test_families import NEW, RAW, _check_reach, _prompt, _pytorch_greedy

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fused-families")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(300)


@pytest.fixture(scope="module")
def draft(root, tok):
    return make_checkpoint(root / "draft", tokenizer=tok, layers=1, hidden=32, heads=2, head_dim=16, seed=1)


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_graph(name, root, tok, draft):
    from mjsd.export import export_bundle

    ckpt = make_family_checkpoint(root / name, name, tok, table=FUSED)
    m = export_bundle(ckpt, draft, root / f"{name}-fused", progress=False, graph_kind="fused")
    assert m["models"]["target"]["graph_kind"] == m["models"]["draft"]["graph_kind"] == "fused"
    _check_reach(m["models"]["target"], tree=True)
    b = load_bundle(root / f"{name}-fused")
    target, d = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    prompt = _prompt(b.target.max_context)
    greedy, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="ar", max_new_tokens=NEW))
    assert greedy == _pytorch_greedy(ckpt, prompt, NEW)
    for algo, extra in (("sps", {}), ("mcsd", dict(k_config=(2, 2, 1)))):
        out, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo=algo, max_new_tokens=NEW, **extra), draft=d)
        assert out == greedy, algo
    for algo in ("mtad", "mmtad"):
        out, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo=algo, beam_width=2, max_new_tokens=NEW),
                              draft=d)
        assert len(out) == NEW


def test_uncovered_families_are_refused_or_fall_back(root, tok, draft):
    from mjsd.export import export_bundle

    ckpt = make_checkpoint(root / "gpt2", arch="gpt2", tokenizer=tok, layers=1, hidden=32, heads=2)
    with pytest.raises(ExportError, match="does not support model type 'gpt2'.*--graph-kind standard"):
        export_bundle(ckpt, draft, root / "gpt2-fused", progress=False, graph_kind="fused", validate=False)
    small = make_checkpoint(root / "hd8", tokenizer=tok, layers=1, hidden=32, heads=4, seed=2)  # head_dim 8
    m = export_bundle(small, draft, root / "hd8-auto", progress=False, validate=False)
    assert m["models"]["target"]["graph_kind"] == "standard" and m["models"]["draft"]["graph_kind"] == "fused"
    assert any("head_dim 8" in a for a in m["provenance"]["adjustments"])
