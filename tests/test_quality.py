"""Quality metrics of runtime/bench.py: repetition (distinct-n, duplicated lines), the task metric against the real
held-out code, and the bench summary that reports them with prefill and decode speed-ups apart."""
from __future__ import annotations

import json

import pytest

from mjsd.runtime.bench import (builtin_prompts_path, distinct_n, duplicated_line_fraction, edit_similarity,
                                load_prompts, load_references, next_line_match, run_bench)
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.engine import Engine


def test_distinct_n():
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([7, 7, 7, 7, 7], 2) == 0.25  # one distinct bigram out of four
    assert distinct_n([1, 2, 1, 2, 1], 2) == 0.5
    assert distinct_n([5], 2) is None


def test_duplicated_line_fraction():
    assert duplicated_line_fraction("#\n#\n#\n#\n") == 0.75  # the `#\n#\n` loop: every line after the first
    assert duplicated_line_fraction("    x = 1\n\n    y = 2\n") == 0.0  # blank lines do not count
    assert duplicated_line_fraction("  return a\nreturn a  \nz\n") == pytest.approx(1 / 3)  # stripped
    assert duplicated_line_fraction("\n \n") is None


def test_task_metric():
    ref = "        x = f(a)\n        return x + 1\n"
    assert next_line_match("\n        x = f(a)\n        return 0\n", ref) is True
    assert next_line_match("        y = f(a)\n", ref) is False
    assert next_line_match("", ref) is False
    assert next_line_match("x", "\n\n") is None and edit_similarity("x", "") is None
    assert edit_similarity(ref + "        more\n", ref) == 1.0  # only the first lines are compared
    loop = edit_similarity("        #\n        #\n        #\n", ref)
    close = edit_similarity("        x = f(b)\n        return x + 2\n", ref)
    assert 0 <= loop < 0.3 < 0.8 < close < 1


def test_builtin_references_are_the_real_bodies():
    refs, prompts = load_references(), load_prompts()
    assert len(refs) == len(prompts) == 32 and all(isinstance(r, str) and r.strip() for r in refs)
    for r in refs:  # the real code scores perfectly against itself
        assert next_line_match(r, r) and edit_similarity(r, r) == 1.0
    assert load_references(limit=3) == refs[:3]


def test_references_of_other_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("def f():\ndef g():\n")
    assert load_references(txt) == [None, None]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "def f():\n", "reference": "    return 1\n"}) + "\n" + json.dumps("x") + "\n")
    assert load_references(jl) == ["    return 1\n", None]
    assert builtin_prompts_path().suffix == ".jsonl"


def test_bench_reports_quality_and_split_speedups(llama_bundle):
    engine = Engine.from_bundle(llama_bundle, meter=None)
    prompts = ['def f(a):\n    """Doc."""\n', "import os\n"]
    configs = [(a, GenerationConfig(algo=a, max_new_tokens=6, gamma=2, beam_width=2)) for a in ("ar", "sps", "mtad")]
    out = run_bench(engine, prompts, configs, warmup=0, references=["    return a\n", None])
    ar = out[0]
    assert ar["prefill_speedup_vs_ar"] == ar["decode_speedup_vs_ar"] == 1.0
    for s in out:
        assert 0 < s["distinct_2"] <= 1 and 0 <= s["dup_line_fraction"] <= 1
        assert s["next_line_match"] in (0.0, 1.0) and 0 <= s["edit_similarity"] <= 1  # one prompt has a reference
        assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
        assert s["decode_speedup_vs_ar"] > 0 and s["prefill_speedup_vs_ar"] > 0
