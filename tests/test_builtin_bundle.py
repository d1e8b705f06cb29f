"""The bundle that ships with mjsd (runtime/builtin_bundle, trained by tools/train_builtin.py): fast checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mjsd.runtime.bundle import load_bundle

BUNDLE = Path(__file__).resolve().parents[1] / "runtime" / "builtin_bundle"
MAX_BYTES = 64 * 2**20

CODE = '''class Cache(dict):
    """Keep at most n items."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.n = n\t# tab, unicode: é ü 漢 — ok

    def __missing__(self, key):
        return f"{key!r} missing"
'''


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


def test_loads_and_validates(bundle):
    assert bundle.target.num_layers > bundle.draft.num_layers
    assert bundle.target.vocab_size >= bundle.vocab_size and bundle.draft.vocab_size >= bundle.vocab_size
    assert bundle.eos_token_id is not None and bundle.max_context >= 256


def test_size_limit():
    total = sum(p.stat().st_size for p in BUNDLE.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"built-in bundle is {total / 2**20:.1f} MiB, over the 64 MiB limit"


def test_tokenizer_round_trips_code(bundle):
    tok = bundle.load_tokenizer()
    ids = tok.encode(CODE, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == CODE
    assert max(ids) < bundle.vocab_size
    assert len(ids) < len(CODE.encode()) / 2  # the BPE learned code: well under a token per two bytes here


def test_provenance_records_reproduction():
    prov = json.loads((BUNDLE / "training.json").read_text())
    assert prov["corpus"]["python"] and prov["target"]["steps"] > 0 and prov["draft"]["steps"] > 0
    assert "--target-steps" in prov["reproduce"]
