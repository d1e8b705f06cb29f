"""The Python API (Engine) and `mjsd generate` on a real exported bundle."""
from __future__ import annotations

import json
import threading

import pytest
from click.testing import CliRunner

from mjsd.runtime import ConfigError, ContextLengthError, Engine, GenerationConfig
from mjsd.runtime.cli import main


@pytest.fixture(scope="module")
def engine(llama_bundle):
    return Engine.from_bundle(llama_bundle, meter="estimate")


def test_generate_matches_ar_greedy_and_reports_stats(engine):
    ar = engine.generate("def main():", algo="ar", max_new_tokens=24, ignore_eos=True)
    sps = engine.generate("def main():", algo="sps", max_new_tokens=24, ignore_eos=True, gamma=3)
    assert sps.tokens == ar.tokens and sps.text == ar.text and len(ar.tokens) == 24
    s = sps.stats.to_dict()
    assert s["algo"] == "sps" and s["generated_tokens"] == 24 and s["rounds"] <= s["draft_tokens"] <= 3 * s["rounds"]
    assert s["energy"]["estimated"] is True and s["energy"]["j_per_token"] > 0


def test_stream_yields_the_same_text_as_generate(engine):
    # online tuning off: it may change gamma between the two runs, and with it the sampled text
    cfg = GenerationConfig(algo="mtad", max_new_tokens=20, temperature=1.0, top_k=10, seed=3, ignore_eos=True,
                           tune=False)
    stream = engine.stream("import os", cfg)
    pieces = list(stream)
    assert "".join(pieces) == stream.text == engine.generate("import os", cfg).text
    assert stream.stats.generated_tokens == 20


def test_sessions_load_once_and_are_shared_by_threads(engine):
    target = engine.target
    results = [None] * 3

    def run(i):
        results[i] = engine.generate("x = 1", algo="ar", max_new_tokens=8, ignore_eos=True).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.target is target and results[0] == results[1] == results[2]


def test_bad_input_is_refused(engine):
    with pytest.raises(ConfigError, match="empty"):
        engine.generate("")
    with pytest.raises(ConfigError, match="unknown generation parameter"):
        engine.generate("x", beams=3)
    with pytest.raises(ConfigError, match="gamma"):
        engine.generate("x", gamma=0)
    with pytest.raises(ContextLengthError, match="context"):
        engine.generate("x " * 200, max_new_tokens=100)


def test_power_budget_steers_the_run(llama_bundle):
    eng = Engine.from_bundle(llama_bundle, meter="estimate", power_budget=5.0)
    r = eng.generate("def f(x):", algo="mtad", max_new_tokens=30, ignore_eos=True)
    assert r.stats.controller and r.stats.controller[0]["reason"] == "start"


def test_cli_generate_streams_text_and_stats(llama_bundle):
    res = CliRunner().invoke(main, ["generate", "def main():", "--bundle", str(llama_bundle), "-n", "12",
                                    "--algo", "sps", "--ignore-eos", "--stats"])
    assert res.exit_code == 0, res.output
    assert "draft tokens" in res.output and "tokens/s" in res.output and "ESTIMATED" in res.output


def test_cli_generate_json_and_stdin(llama_bundle):
    res = CliRunner().invoke(main, ["generate", "--bundle", str(llama_bundle), "-n", "6", "--ignore-eos",
                                    "--json", "--algo", "ar"], input="import sys\n")
    out = json.loads(res.output)
    assert out["prompt"] == "import sys\n" and len(out["tokens"]) == 6 and out["stats"]["algo"] == "ar"


@pytest.mark.parametrize("args, message", [
    (["generate", "--algo", "nope", "x"], "nope"),
    (["generate", "x", "--tau", "2"], "tau"),
    (["generate", "--file", "/nonexistent/prompt.txt"], "cannot read the prompt file"),
    (["generate", "x", "--bundle", "/nonexistent/bundle"], "does not exist"),
])
def test_cli_generate_refuses_bad_input(llama_bundle, args, message):
    if "--bundle" not in args:
        args = args + ["--bundle", str(llama_bundle)]
    res = CliRunner().invoke(main, args, input="")
    assert res.exit_code != 0 and message in res.output


def test_cli_empty_stdin_prompt_is_refused(llama_bundle):
    res = CliRunner().invoke(main, ["generate", "-", "--bundle", str(llama_bundle)], input="")
    assert res.exit_code == 1 and "empty" in res.output


def test_an_unconsumed_stream_blocks_no_other_thread(engine):
    with engine.stream("def f(x):", algo="mtad", max_new_tokens=32, ignore_eos=True) as abandoned:
        next(iter(abandoned))  # started, then left mid-generation
        done = []
        other = threading.Thread(target=lambda: done.append(engine.generate("x = 1", algo="ar", max_new_tokens=8)))
        other.start()
        other.join(timeout=30)
        assert done and not other.is_alive()
    assert engine.turns.waiting == 0


def test_concurrent_generations_equal_sequential_ones(engine):
    configs = [GenerationConfig(algo=a, max_new_tokens=16, temperature=t, top_k=20, seed=s, ignore_eos=True,
                                tune=False)  # tuned runs follow the timing of the rounds, by design
               for a, t, s in (("mtad", 1.0, 1), ("sps", 1.0, 2), ("ar", 0.0, None), ("mjsd", 0.8, 3),
                               ("mtad", 0.0, None), ("sps", 0.7, 4))]
    sequential = [engine.generate("import os", c) for c in configs]
    results = [None] * len(configs)

    def run(i):
        results[i] = engine.generate("import os", configs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r.tokens for r in results] == [r.tokens for r in sequential]
    for seq, conc in zip(sequential, results):  # per-generation counters, not the shared sessions'
        assert conc.stats.target_calls == seq.stats.target_calls and conc.stats.draft_calls == seq.stats.draft_calls


def test_interleaved_streams_in_one_thread_and_cancel(engine):
    a = engine.stream("def f(x):", algo="sps", max_new_tokens=12, ignore_eos=True, gamma=2)
    b = engine.stream("def f(x):", algo="sps", max_new_tokens=12, ignore_eos=True, gamma=2)
    for pa, pb in zip(a, b):  # alternate rounds of two generations on the same sessions
        assert pa == pb
    assert a.tokens == b.tokens and a.stats.target_calls == b.stats.target_calls
    c = engine.stream("def f(x):", algo="ar", max_new_tokens=64, ignore_eos=True)
    next(c)
    c.cancel()
    rest = list(c)
    assert c.stats.finish_reason == "cancelled" and len(c.tokens) < 64 and len(rest) <= 1
    assert c.stats.energy is not None and "wait" in c.stats.energy["phases"]


def test_turns_are_given_in_arrival_order():
    from mjsd.runtime.engine import Turns

    turns, order = Turns(), []

    def take(name):
        with turns.turn():
            order.append(name)

    with turns.turn():  # hold the turn while three generations queue up, one after the other
        threads = []
        for i, name in enumerate("abc"):
            threads.append(threading.Thread(target=take, args=(name,)))
            threads[-1].start()
            while turns.waiting < i + 1:
                threading.Event().wait(0.001)
    for t in threads:
        t.join(timeout=10)
    assert order == ["a", "b", "c"] and turns.waiting == 0
