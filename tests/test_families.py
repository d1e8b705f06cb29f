"""Every model family in README's "Supported model families" table, exported from a tiny random checkpoint and run:
validation past the sliding window / longrope switch, AR equal to a PyTorch greedy loop, SpS == AR at T=0, MTAD, and
the tree graph (MCSD tree == AR, MMTAD) where supported; refusals say why. The README table is checked against
SUPPORT, the table these tests prove."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import generate_ids
from mjsd.runtime.errors import ExportError
from mjsd.runtime.session import ModelSession
from tests.families import FAMILIES, WINDOW, make_family_checkpoint
from tests.helpers import make_checkpoint, make_tokenizer
from tests.test_ar_sps import NoisyDraft

# exactness tests compare with the raw model: no repetition control (mcsd, mmtad and PyTorch do not apply it)
RAW = dict(no_repeat_ngram_size=0)

torch = pytest.importorskip("torch")

# family -> (standard graph, --tree-attention): what README's table says and these tests prove.
# "yes": exported, validated and decoded; "refused": the export stops with the reason (see the tests below).
SUPPORT = {
    "llama": ("yes", "yes"),
    "qwen2": ("yes", "yes"),
    "qwen2-sliding": ("yes", "yes"),
    "qwen3": ("yes", "yes"),
    "phi3": ("yes", "yes"),
    "phi3-sliding": ("yes", "yes"),
    "phi3-longrope": ("yes", "yes"),
    "gemma2": ("yes", "yes"),
    "gemma3_text": ("yes", "yes"),
    "mistral": ("yes", "yes"),
    "smollm3": ("yes", "yes"),
    "granite": ("yes", "yes"),
    "olmo2": ("yes", "yes"),
    "stablelm": ("yes", "yes"),
    "gpt2": ("yes", "yes"),
    "gpt_neox": ("yes", "yes"),
    "opt": ("yes", "yes"),
    "falcon": ("yes", "yes"),
    "falcon-gqa": ("refused", "yes"),
}
assert set(SUPPORT) == set(FAMILIES)
SLIDING = ("qwen2-sliding", "phi3-sliding", "gemma2", "gemma3_text", "mistral")  # window 16
NEW = 16  # generated tokens: from a prompt of 30 they cross the window (16) and the 40-token validation reach
FAST_TREE = ("llama", "gpt2", "phi3-longrope", "falcon", "mistral", "gemma2")  # the other tree rows: slow


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(300)


@pytest.fixture(scope="module")
def draft(root, tok):
    """One small Llama draft shared by every family (the tokenizer is what target and draft must share)."""
    return make_checkpoint(root / "draft", tokenizer=tok, layers=1, hidden=16, heads=2, seed=1)


_CKPTS: dict = {}


def checkpoint(root, tok, name):
    if name not in _CKPTS:
        _CKPTS[name] = make_family_checkpoint(root / name, name, tok)
    return _CKPTS[name]


def _export(target, draft, out, **kw):
    from mjsd.export import export_bundle

    return export_bundle(target, draft, out, progress=False, **kw)


def _pytorch_greedy(ckpt, prompt, n):
    """Greedy continuation by full forwards without a cache: the reference for everything the graphs do."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _prompt(max_context):
    return [int(t) for t in np.random.default_rng(5).integers(4, 300, min(30, max_context - NEW - 12))]


def _check_reach(entry, tree: bool):
    """Validation went past the window / rope switch: 40 tokens, or the whole context when that is shorter."""
    v, ctx = entry["validation"], entry["max_context"]
    reached = int(re.match(r"prefill (\d+)", v["tokens"]).group(1))
    assert reached >= min(ctx - 5, 40)
    assert v["call_size"]["rel"] < 1e-4 and entry["exact_verification"] is True
    if tree:
        assert v["tree"]["context"] >= min(ctx - 7, 40)


@pytest.mark.parametrize("name", [f for f, (std, _) in SUPPORT.items() if std == "yes"])
def test_standard_graph(name, root, tok, draft):
    ckpt = checkpoint(root, tok, name)
    m = _export(ckpt, draft, root / f"{name}-std")
    _check_reach(m["models"]["target"], tree=False)
    b = load_bundle(root / f"{name}-std")
    target, twin, d = (ModelSession(b.target, threads=1), ModelSession(b.target, threads=1),
                       ModelSession(b.draft, threads=1))
    prompt = _prompt(b.target.max_context)
    greedy, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="ar", max_new_tokens=NEW))
    assert greedy == _pytorch_greedy(ckpt, prompt, NEW)
    sps, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="sps", gamma=4, max_new_tokens=NEW),
                          draft=NoisyDraft(twin, scale=0.5, seed=2))
    assert sps == greedy
    sps, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="sps", gamma=3, max_new_tokens=NEW), draft=d)
    assert sps == greedy
    mtad, stats = generate_ids(target, prompt, GenerationConfig(**RAW, algo="mtad", gamma=4, max_new_tokens=NEW), draft=d)
    assert len(mtad) == NEW and all(0 <= t < 300 for t in mtad)


def _tree_params():
    for f, (_, tree) in SUPPORT.items():
        if tree == "yes":
            yield f if f in FAST_TREE else pytest.param(f, marks=pytest.mark.slow)


def _greedy_and_tree_match_pytorch(b, ckpt):
    """A tree-attention bundle: AR equals a PyTorch greedy loop, and MCSD verifying a tree equals AR."""
    target = ModelSession(b.target, threads=1)
    prompt = _prompt(b.target.max_context)
    greedy, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="ar", max_new_tokens=NEW))
    assert greedy == _pytorch_greedy(ckpt, prompt, NEW)
    tree, _ = generate_ids(target, prompt, GenerationConfig(algo="mcsd", mcsd_strategy="tree", max_new_tokens=NEW),
                           draft=NoisyDraft(ModelSession(b.target, threads=1), scale=0.5, seed=2))
    assert tree == greedy
    return target, prompt


@pytest.mark.parametrize("name", list(_tree_params()))
def test_tree_graph(name, root, tok, draft):
    ckpt = checkpoint(root, tok, name)
    m = _export(ckpt, draft, root / f"{name}-tree", tree_attention=True)
    _check_reach(m["models"]["target"], tree=True)
    b = load_bundle(root / f"{name}-tree")
    target, prompt = _greedy_and_tree_match_pytorch(b, ckpt)
    d = ModelSession(b.draft, threads=1)
    mmtad, _ = generate_ids(target, prompt, GenerationConfig(algo="mmtad", beam_width=2, gamma=3,
                                                             max_new_tokens=NEW), draft=d)
    assert len(mmtad) == NEW


def test_a_tree_graph_without_the_window_is_refused_by_validation(root, tok, draft, monkeypatch):
    """What the window in the bias prevents: a tree graph that ignores it matches PyTorch up to the window, then
    not; validation reaches past it, so the export stops and names the first wrong token."""
    from mjsd.export import tree_graph

    monkeypatch.setattr(tree_graph, "sliding_window", lambda config: None)
    with pytest.raises(ExportError, match=rf"target graph does not match PyTorch.*first wrong at token {WINDOW + 1}"):
        _export(checkpoint(root, tok, "mistral"), draft, root / "mistral-nowindow", tree_attention=True)
    assert not (root / "mistral-nowindow").exists()


def test_a_small_window_in_the_tree_graph(root, tok, draft):
    """Window 6 (the issue's case, once refused without a reason): exported, validated past it, decodes like PyTorch."""
    from transformers import AutoConfig

    small = root / "mistral-w6"
    make_family_checkpoint(small, "mistral", tok)
    cfg = AutoConfig.from_pretrained(small)
    cfg.sliding_window = 6
    cfg.save_pretrained(small)
    m = _export(small, draft, root / "w6", tree_attention=True)
    _check_reach(m["models"]["target"], tree=True)
    _greedy_and_tree_match_pytorch(load_bundle(root / "w6"), small)


def test_longrope_context_is_capped_printed_and_recorded(root, tok, draft, capsys):
    m = _export(checkpoint(root, tok, "phi3-longrope"), draft, root / "longrope")
    assert m["models"]["target"]["max_context"] == 32 and m["models"]["draft"]["max_context"] == 256
    notes = [a for a in m["provenance"]["adjustments"] if "longrope" in a]
    assert notes and "original_max_position_embeddings=32" in notes[0]
    assert "longrope" in capsys.readouterr().err
    from click.testing import CliRunner
    from mjsd.runtime.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(root / "longrope")]).output
    assert "adjusted    target max_context capped from 128 to 32: longrope" in shown


def test_context_cap_is_printed_and_recorded(root, tok, draft, capsys):
    m = _export(checkpoint(root, tok, "gpt2"), draft, root / "cap", max_context=4096, validate=False)
    assert m["models"]["target"]["max_context"] == 128
    assert any("capped from 4096 to 128" in a for a in m["provenance"]["adjustments"])
    assert "capped from 4096 to 128" in capsys.readouterr().err
    assert m["models"]["target"]["exact_verification"] is None  # not validated: not measured


def test_multi_query_falcon_has_one_kv_head(root, tok, draft):
    from mjsd.export.sources import config_dims
    from transformers import AutoConfig

    assert config_dims(AutoConfig.from_pretrained(checkpoint(root, tok, "falcon")))["num_kv_heads"] == 1


def test_new_architecture_falcon_names_the_reason_and_the_way_out(root, tok, draft):
    with pytest.raises(ExportError, match=r"falcon.*caches its keys and values repeated to all 4 heads.*"
                                          r"--tree-attention"):
        _export(checkpoint(root, tok, "falcon-gqa"), draft, root / "falcon-gqa-std")


def test_readme_table_matches_the_tests():
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 4 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = (cells[2].split()[0].lower(), cells[3].split()[0].lower())
    assert rows == SUPPORT


def test_an_optimum_failure_names_the_architecture_the_step_and_the_way_out(root, tok, monkeypatch):
    import optimum.exporters.onnx

    from mjsd.export.graph import build_decoder_graph

    def fail(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::foo' to ONNX opset version 18 is not supported.")

    monkeypatch.setattr(optimum.exporters.onnx, "main_export", fail)
    with pytest.raises(ExportError, match=r"optimum could not export .* \(qwen3 / Qwen3ForCausalLM\) as "
                                          r"text-generation-with-past \(RuntimeError: Exporting the operator.*; "
                                          r"try --tree-attention"):
        build_decoder_graph(checkpoint(root, tok, "qwen3"), root / "optimum-fails")
