"""Shared fixtures: tiny random checkpoints and bundles exported from them once per test session.

Bundles (paths to a bundle directory, load with mjsd.runtime.bundle.load_bundle):
- llama_bundle: Llama target (3 layers, GQA 4 heads / 2 KV heads, head_dim 16 != hidden 48 / 4) and draft (1 layer,
  hidden 32, head_dim 16), one byte-level BPE tokenizer of 300 ids. Parametrized over the graph kinds: "fused"
  (GroupQueryAttention, shared in-place KV buffer; the default export) and "standard" (optimum's graph), so every test
  that uses it holds for both.
- gpt2_bundle: GPT-2 target (2 layers) and draft (1 layer), same 300-id tokenizer.
- tiny_vocab_bundle: Llama target (2 layers) and draft (1 layer) over a 12-id word-level tokenizer, for tests that
  enumerate the vocabulary (distributions, MJGD oracle); both graph kinds, like llama_bundle.
- llama_tree_bundle, tiny_vocab_tree_bundle: the same checkpoints exported with the standard kind's tree-attention
  target graph (fused graphs take a tree bias anyway).
Checkpoint folders (for PyTorch references): llama_checkpoints, gpt2_checkpoints, tiny_vocab_checkpoints, each a
(target_dir, draft_dir) tuple. Torch and the export stage are imported only when one of these fixtures is used.
"""
from __future__ import annotations

import os

import pytest

# The CLI's model commands share one ORT thread pool per process, after which ORT refuses sessions with pools of their
# own; the tests run CLI commands in this process next to plain sessions, so they keep per-session pools here
# (tests/test_threads.py covers the shared pool in subprocesses).
os.environ.setdefault("MJSD_THREAD_POOL", "session")

TINY_VOCAB = 12


def _pair(root, arch: str, vocab: int, target: dict, draft: dict):
    from tests.helpers import make_checkpoint, make_tokenizer

    tok = make_tokenizer(vocab)
    return (make_checkpoint(root / "target", arch=arch, tokenizer=tok, seed=0, **target),
            make_checkpoint(root / "draft", arch=arch, tokenizer=tok, seed=1, **draft))


def _export(pair, out, **options):
    from mjsd.export import export_bundle

    export_bundle(pair[0], pair[1], out, progress=False, **options)
    return out


@pytest.fixture(scope="session")
def llama_checkpoints(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("llama-ckpt"), "llama", 300,
                 dict(layers=3, hidden=48, heads=4, kv_heads=2, head_dim=16),
                 dict(layers=1, hidden=32, heads=4, kv_heads=2, head_dim=16))


@pytest.fixture(scope="session")
def gpt2_checkpoints(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("gpt2-ckpt"), "gpt2", 300,
                 dict(layers=2, hidden=48, heads=4), dict(layers=1, hidden=32, heads=4))


@pytest.fixture(scope="session")
def tiny_vocab_checkpoints(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("tiny-ckpt"), "llama", TINY_VOCAB,
                 dict(layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16),
                 dict(layers=1, hidden=16, heads=1, kv_heads=1, head_dim=16))


GRAPH_KINDS = ["fused", "standard"]


@pytest.fixture(scope="session", params=GRAPH_KINDS)
def llama_bundle(request, llama_checkpoints, tmp_path_factory):
    return _export(llama_checkpoints, tmp_path_factory.mktemp(f"llama-{request.param}") / "bundle",
                   graph_kind=request.param)


@pytest.fixture(scope="session")
def gpt2_bundle(gpt2_checkpoints, tmp_path_factory):
    return _export(gpt2_checkpoints, tmp_path_factory.mktemp("gpt2") / "bundle")


@pytest.fixture(scope="session", params=GRAPH_KINDS)
def tiny_vocab_bundle(request, tiny_vocab_checkpoints, tmp_path_factory):
    return _export(tiny_vocab_checkpoints, tmp_path_factory.mktemp(f"tiny-{request.param}") / "bundle",
                   graph_kind=request.param)


@pytest.fixture(scope="session")
def llama_tree_bundle(llama_checkpoints, tmp_path_factory):
    return _export(llama_checkpoints, tmp_path_factory.mktemp("llama-tree") / "bundle", tree_attention=True,
                   graph_kind="standard")


@pytest.fixture(scope="session")
def tiny_vocab_tree_bundle(tiny_vocab_checkpoints, tmp_path_factory):
    return _export(tiny_vocab_checkpoints, tmp_path_factory.mktemp("tiny-tree") / "bundle", tree_attention=True,
                   graph_kind="standard")
