"""Online throughput tuning without a budget (runtime/tuning.py): the search space, convergence on a synthetic
machine, decisions in the stats, --no-tune; and the bench's per-entry configuration syntax."""
import threading
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from mjsd.runtime.bench import config_variant
from mjsd.runtime.cli import main
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.energy.controller import PowerController
from mjsd.runtime.engine import Engine
from mjsd.runtime.errors import ConfigError
from mjsd.runtime.stats import GenerationStats
from mjsd.runtime.tuning import OnlineTuning, search_space


def test_search_space_stays_within_the_run():
    assert search_space(GenerationConfig(algo="mtad", gamma=8, beam_width=1)) == ([1], [1, 2, 3, 4, 5, 6, 8])
    assert search_space(GenerationConfig(algo="mtad", gamma=7, beam_width=4)) == ([4], [1, 2, 3, 4, 5, 6, 7])
    assert search_space(GenerationConfig(algo="mmtad", gamma=3, beam_width=2)) == ([2], [1, 2, 3])
    assert search_space(GenerationConfig(algo="sps", gamma=5, beam_width=4)) == ([4], [1, 2, 3, 4, 5])
    tuning = OnlineTuning()
    for cfg, start in ((GenerationConfig(algo="sps"), 4), (GenerationConfig(algo="sps", gamma=2), 2),
                       (GenerationConfig(algo="mtad"), 24), (GenerationConfig(algo="mtad", temperature=1.0), 16)):
        assert tuning.tuner(cfg).controller.choose() == (cfg.beam_width, start)
    # without a budget an undecided probe is settled after 2 dwells (a long probe within noise is pure cost)
    assert tuning.tuner(GenerationConfig()).controller.probe_dwells == 2 < PowerController([1], [1]).probe_dwells


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_tuner_climbs_to_the_fastest_configuration():
    """A synthetic machine where tokens/s peaks at gamma=5 (noise-free): starting from W=2, gamma=8 the tuner's
    probes reach it and keep the width, and every generation's stats carry the decisions in force during it."""
    def tps(width, gamma):
        return 100.0 - 10 * abs(gamma - 5) - 15 * (width - 1)

    tuning = OnlineTuning(dwell_rounds=4)
    cfg = GenerationConfig(algo="mtad", gamma=8, beam_width=2)
    clock = Clock()
    for _ in range(30):  # generations of the same kind share one controller and keep learning
        tuner = tuning.tuner(cfg)
        tuner._clock = clock
        ctx = SimpleNamespace(cfg=cfg, stats=GenerationStats())
        tuner(ctx, None)
        for _ in range(10):
            w, g = ctx.cfg.beam_width, ctx.cfg.gamma
            clock.t += 10 / tps(w, g)  # each round yields 10 tokens
            ctx.stats.record_round(g, g - 1)
            tuner(ctx, [0] * 10)
        assert ctx.stats.controller and ctx.stats.controller[0]["round"] <= ctx.stats.controller[-1]["round"]
    assert (ctx.cfg.beam_width, ctx.cfg.gamma) == (2, 5)
    assert len(tuning.controllers) == 1
    reasons = {d.reason for d in next(iter(tuning.controllers.values())).history}
    assert "probe" in reasons and {"probe kept", "best known configuration"} & reasons


def _started_tuner(cfg: GenerationConfig):
    """A tuner on a fake clock, called before a generation's first round: (tuning, tuner, clock, its context)."""
    tuning, clock = OnlineTuning(dwell_rounds=2), Clock()
    tuner = tuning.tuner(cfg)
    tuner._clock = clock
    ctx = SimpleNamespace(cfg=cfg, stats=GenerationStats())
    tuner(ctx, None)
    return tuning, tuner, clock, ctx


def test_tuner_ignores_time_between_turns():
    tuning, tuner, clock, ctx = _started_tuner(GenerationConfig(algo="sps", gamma=4, beam_width=4))
    clock.t += 100.0  # another generation's turn
    tuner.resume()
    clock.t += 0.5
    ctx.stats.record_round(4, 4)
    tuner(ctx, [0] * 5)
    est = next(iter(tuning.controllers.values()))
    assert est._scores[(4, 4)].mean == pytest.approx(10.0)  # 5 tokens in 0.5 s, not in 100.5 s


def test_tuner_skips_a_generations_cut_last_round():
    """The last round is cut at max_new_tokens (or EOS, a stop string): 1 token of a 10-token round says nothing about
    its gamma, so it is not observed; a long draft would otherwise look slow at every generation's end."""
    tuning, tuner, clock, ctx = _started_tuner(GenerationConfig(algo="mtad", gamma=8, beam_width=2))
    clock.t += 1.0
    ctx.stats.record_round(8, 8)
    tuner(ctx, [0] * 9)
    clock.t += 1.0
    ctx.stats.record_round(8, 8)
    ctx.stats.finish_reason = "length"
    tuner(ctx, [0])
    est = next(iter(tuning.controllers.values()))
    assert est._scores[(2, 8)].mean == pytest.approx(9.0) and est._scores[(2, 8)].n == 1


@pytest.fixture(scope="module")
def engine(llama_bundle):
    return Engine.from_bundle(llama_bundle, meter=None)


def test_engine_tunes_by_default_and_not_with_tune_false(engine):
    r = engine.generate("def f(x):", algo="mtad", gamma=4, beam_width=2, max_new_tokens=24, ignore_eos=True)
    assert r.stats.controller and r.stats.controller[0]["width"] == 2
    assert r.stats.to_dict()["controller"] == r.stats.controller
    r = engine.generate("def f(x):", algo="mtad", max_new_tokens=8, tune=False)
    assert r.stats.controller is None
    r = engine.generate("def f(x):", algo="ar", max_new_tokens=8)  # nothing to tune
    assert r.stats.controller is None
    r = engine.generate("def f(x):", algo="mtad", max_new_tokens=8, seed=3)  # a fixed seed repeats: no tuning
    assert r.stats.controller is None


def test_concurrent_tuned_generations(engine):
    out = []
    threads = [threading.Thread(target=lambda: out.append(engine.generate(
        "x = 1", algo="sps", gamma=3, max_new_tokens=20, ignore_eos=True))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(out) == 3 and all(len(r.tokens) == 20 for r in out)


def test_cli_no_tune(llama_bundle):
    import json

    args = ["generate", "--bundle", str(llama_bundle), "--meter", "none", "-n", "6", "--json", "def f(x):"]
    with_tune = json.loads(CliRunner().invoke(main, args, catch_exceptions=False).output)
    assert with_tune["stats"]["controller"][0]["reason"] == "start"
    without = json.loads(CliRunner().invoke(main, [*args, "--no-tune"], catch_exceptions=False).output)
    assert "controller" not in without["stats"]


def test_config_variant():
    base = GenerationConfig(temperature=1.0, gamma=8)
    c = config_variant("sps:gamma=5:tune=false", base)
    assert (c.algo, c.gamma, c.tune, c.temperature) == ("sps", 5, False, 1.0)
    c = config_variant("mtad:tau=0.2:beam_width=1:draft_p_min=0.05", base)
    assert (c.algo, c.tau, c.beam_width, c.draft_p_min, c.gamma) == ("mtad", 0.2, 1, 0.05, 8)
    assert config_variant("mcsd-tree", base).mcsd_strategy == "tree"
    for bad, message in (("sps:gamma", "key=value"), ("sps:colour=red", "key=value"), ("sps:gamma=x", "int"),
                         ("sps:tune=maybe", "bool"), ("nope", "algo")):
        with pytest.raises(ConfigError, match=message):
            config_variant(bad, base)
