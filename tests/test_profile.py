"""mjsd profile / report: run directory, resume without recomputation, re-render, Pareto frontier, parse-rate rule,
prompt-file errors (tiny fixtures, a few seconds)."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from mjsd.runtime import sweep
from mjsd.runtime.bench import completion_parses, load_prompts
from mjsd.runtime.cli import main
from mjsd.runtime.errors import ConfigError

PROMPTS = ['import os\n\ndef join(a, b):\n    """Join two paths."""\n', 'class A:\n    def size(self):\n']
SWEEP = ["--algos", "ar,sps,mtad", "--gammas", "2,3", "--temperatures", "0", "-n", "4", "--warmup", "0",
         "--meter", "estimate"]


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in PROMPTS))
    return p


def _profile(args):
    return CliRunner().invoke(main, ["profile", *args], catch_exceptions=False)


# --- parse-rate rule ------------------------------------------------------------------------------------------------

HEADER = 'x = foo(1,\n        2)\n\ndef f(a):\n    """Doc."""\n'


@pytest.mark.parametrize("completion, ended, expected", [
    ("    return a + 1\n\ndef g(:\n", False, True),  # body ends at the dedent; what follows is not judged
    ("    y = a\n    return (y +\n        1", False, True),  # cut: last line dropped, an open bracket is unfinished
    ("    y = a\n    return )\n        1", False, False),  # ... but a syntax error before the cut is not
    ("    if a:\n        x = 'abc\n    y", False, False),  # unterminated string
    ("    for x in a:\n", False, True),  # a block awaiting its body is unfinished, not wrong
    ("    return a +", False, True),  # a lone incomplete line is dropped: the docstring is the body
    ("    return a +", True, False),  # ... unless the generation ended (EOS): then the line is complete and wrong
    ("    if a:\n  return a\n", False, False),  # the dedent ends the function after an `if` without a body
    ("    for x in a:\n        print(x)\n    return 1\n    z", False, True),
])
def test_parse_rule(completion, ended, expected):
    assert completion_parses(HEADER, completion, ended=ended) is expected


def test_parse_rule_on_the_real_bodies():
    """The stdlib's own bodies of the built-in prompts are valid at every cut length."""
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    checked = 0
    for item in map(json.loads, (Path(__file__).parent.parent / "runtime" / "data" / "prompts.jsonl").open()):
        path = root / item["source"].split(":")[0]
        if not path.is_file():
            continue
        src = path.read_text(encoding="utf-8", errors="replace")
        body = src[src.index(item["prompt"]) + len(item["prompt"]):].splitlines(keepends=True)
        for cut in (1, 2, 3, 5, 8, 13, 200):  # at line ends
            assert completion_parses(item["prompt"], "".join(body[:cut])), (item["source"], cut)
        for cut in (7, 30, 61, 120, 250, 500):  # inside lines, like a token limit
            assert completion_parses(item["prompt"], "".join(body)[:cut]), (item["source"], cut)
        checked += 1
    if not checked:
        pytest.skip("the stdlib sources of the prompts are not on this machine")


def test_parse_rule_nested_method_and_no_header():
    method = "class A:\n    def f(self):\n        \"\"\"Doc.\"\"\"\n"
    assert completion_parses(method, "        return 1\n    def g(self):\n") is True
    assert completion_parses(method, "        return )\n    def g(self):\n") is False
    assert completion_parses("x = 1\n", "y = 2\n") is None  # no function header: not judged


# --- Pareto frontier ------------------------------------------------------------------------------------------------

def test_pareto_front():
    # (cost, gain): 0 and 2 and 4 are the frontier; 1 is beaten by 0, 3 by 2, 5 ties 2's cost with less gain
    pts = [(1.0, 1.0), (1.5, 0.9), (2.0, 2.0), (2.5, 1.5), (3.0, 2.5), (2.0, 1.0)]
    assert sweep.pareto_front(pts) == [0, 2, 4]
    assert sweep.pareto_front([]) == []
    assert sweep.pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0]  # duplicates: one representative


# --- profile run directory ------------------------------------------------------------------------------------------

def test_profile_run_dir(llama_bundle, prompt_file, tmp_path):
    out = tmp_path / "run"
    r = _profile(["--bundle", str(llama_bundle), "--prompts", str(prompt_file), "--out", str(out), *SWEEP])
    assert r.exit_code == 0, r.output
    assert not sweep.partial_dir(out).exists()
    assert {p.name for p in out.iterdir()} >= {"plan.json", "cells", "results.csv", "results.json", "summary.md",
                                                 "plots"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["ar T=0", "sps g=2 T=0", "sps g=3 T=0", "mtad g=2 W=2 tau=0.05 T=0",
                                         "mtad g=3 W=2 tau=0.05 T=0"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["cells_done"] == doc["cells_planned"] == 5
    assert doc["energy_source"] == ["estimated"] and doc["energy_estimated"]
    assert doc["machine"]["providers"] == ["CPUExecutionProvider"]
    assert {"onnxruntime", "numpy", "tokenizers"} <= set(doc["machine"]["versions"])
    for res in doc["results"]:
        assert res["tokens"] == 4 * len(PROMPTS)
        assert res["speedup_vs_ar"] > 0 and res["ar_tokens_per_s"] > 0 and res["j_per_token"] > 0
        assert res["avg_w"] > 0 and res["perplexity"] > 1
        assert res["parse_judged"] == 2 and 0 <= res["parse_rate"] <= 1
        if res["algo"] != "ar":
            assert len(res["per_position_acceptance"]) == res["gamma"]
    for name in ("speedup_vs_energy.png", "perplexity_vs_speedup.png", "acceptance_by_position.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "| mtad g=3 W=2 tau=0.05 T=0 |" in summary and "ESTIMATED" in summary
    # an existing run is never overwritten silently
    r = CliRunner().invoke(main, ["profile", "--bundle", str(llama_bundle), "--prompts", str(prompt_file),
                                  "--out", str(out), *SWEEP])
    assert r.exit_code == 1 and "--resume" in r.output


def test_resume_skips_finished_cells(llama_bundle, prompt_file, tmp_path, monkeypatch):
    cells = sweep.plan_cells(["ar", "sps", "mtad"], [0.0], gammas=(2, 3), max_new_tokens=4)
    out = tmp_path / "run"
    part = sweep.create_run(out, cells, load_prompts(prompt_file), bundle=llama_bundle, meter=None, warmup=0)
    timed = []
    real = sweep.run_bench
    monkeypatch.setattr(sweep, "run_bench", lambda engine, prompts, pair, **kw: (
        timed.append(pair[-1][0]), real(engine, prompts, pair, **kw))[1])

    class Killed(Exception):
        pass

    def kill_after_two(i, result):
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        sweep.run_sweep(out, on_cell=kill_after_two)
    assert timed == ["ar T=0", "sps g=2 T=0"]
    assert not out.exists() and sorted(p.name for p in (part / "cells").iterdir()) == ["0000.json", "0001.json"]
    before = {p.name: p.read_bytes() for p in (part / "cells").iterdir()}
    timed.clear()
    r = _profile(["--resume", str(out)])
    assert r.exit_code == 0, r.output
    assert timed == [c.name for c in cells[2:]]  # only the unfinished cells ran
    assert all((out / "cells" / name).read_bytes() == data for name, data in before.items())
    assert json.loads((out / "results.json").read_text())["cells_done"] == 5
    assert not part.exists()
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["bundle_sha256"]) == 64
    plan["bundle_sha256"] = "0" * 64  # as if the bundle had been re-exported in between
    (out / "plan.json").write_text(json.dumps(plan))
    r = CliRunner().invoke(main, ["profile", "--resume", str(out)])
    assert r.exit_code == 1 and "the bundle changed" in r.output
    r = _profile(["--resume", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "not a profile run directory" in r.output


def test_report_rerenders(llama_bundle, prompt_file, tmp_path):
    cells = sweep.plan_cells(["ar", "sps"], [0.0], gammas=(2,), max_new_tokens=3)
    out = tmp_path / "run"
    sweep.create_run(out, cells, load_prompts(prompt_file), bundle=llama_bundle, meter="estimate", warmup=0)
    sweep.run_sweep(out)
    for name in ("results.csv", "results.json", "summary.md"):
        (out / name).unlink()
    for png in (out / "plots").iterdir():
        png.unlink()
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0, r.output
    assert "| sps g=2 T=0 |" in r.output
    assert (out / "results.csv").exists() and (out / "results.json").exists()
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["acceptance_by_position.png",
                                                                 "perplexity_vs_speedup.png", "speedup_vs_energy.png"]


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("p.jsonl", '{"prompt": "def f():"}\n{not json\n', "p.jsonl:2: not valid JSON"),
    ("p.jsonl", '{"text": "def f():"}\n', 'an object with a "prompt" string'),
    ("p.txt", "\n\n", "holds no prompts"),
    ("missing.txt", None, "cannot read the prompt file"),
])
def test_prompt_file_errors(tmp_path, name, content, message):
    p = tmp_path / name
    if content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_prompts(p)
    r = CliRunner().invoke(main, ["profile", "--prompts", str(p), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and message.split(":")[-1].strip() in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists() and not sweep.partial_dir(tmp_path / "run").exists()


def test_bad_sweeps(tmp_path):
    with pytest.raises(ConfigError, match="repeats a configuration"):
        sweep.plan_cells(["sps"], [0.0], gammas=(2, 2))
    with pytest.raises(ConfigError, match="gamma"):
        sweep.plan_cells(["sps"], [0.0], gammas=(0,))
    r = CliRunner().invoke(main, ["profile", "--algos", "ar,nope", "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "algo='nope' is invalid" in r.output
    r = CliRunner().invoke(main, ["profile", "--gammas", "2,x"])
    assert r.exit_code == 2 and "comma-separated list of int" in r.output
