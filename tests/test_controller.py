"""The power-budget controller against simulated devices and meters (simulated time: the file runs in seconds).

A device: acceptance per drafted token grows with beam width, round time with W and gamma, power with both; the
accepted tokens are drawn token by token (the real source of noise in speculative decoding), time and power get 5%
noise. Variants (issue 14): a fixed power floor (an idle GPU), DVFS (a governor sets the clock from the load with a
0.3 s lag; power grows with clock^2, time with 1/clock). A meter says what the controller is told about a round: the
true energy, a 1-s moving average (NVML power on Ampere+), a counter that steps every 0.1 s (NVML's energy counter),
or the true energy with 30% noise per round. The bars are judged on the device's true power and throughput.
"""
from __future__ import annotations

import bisect
import math
import random
import statistics

import pytest

from mjsd.runtime.energy import PowerController
from mjsd.runtime.energy.controller import INFEASIBLE, PROBE_SHARE, budget_warning, expected_tokens
from mjsd.runtime.errors import ConfigError
from mjsd.runtime.profiles import load_profile

WIDTHS, GAMMAS = (1, 2, 4), tuple(range(1, 9))


class SimDevice:
    def __init__(self, seed: int, accept: float = 0.8, noise: float = 0.05, floor_w: float = 0.0, dyn: float = 1.0,
                 dvfs_tau: float = 0.0):
        self.rng, self.accept, self.noise = random.Random(seed), accept, noise
        self.floor_w, self.dyn, self.dvfs_tau = floor_w, dyn, dvfs_tau
        self.clock: float | None = None

    def acceptance(self, w):
        return 1 - (1 - self.accept) / w  # more beams, more chances one of them matches

    def mean_tokens(self, w, g):
        a = self.acceptance(w)
        return (1 - a ** (g + 1)) / (1 - a)

    def _work(self, w, g):
        """(accelerator seconds at full clock, host seconds) of a round."""
        total = 0.030 * (1 + 0.02 * w * (g + 1)) + g * 0.002 * (1 + 0.25 * (w - 1))
        return total - 0.010, 0.010

    def target_clock(self, w, g):
        if not self.dvfs_tau:
            return 1.0
        acc, host = self._work(w, g)
        return min(1.0, max(0.4, (acc / (acc + host) - 0.6) / 0.3))  # busier accelerator, higher clock

    def _seconds_watts(self, w, g, clock):
        acc, host = self._work(w, g)
        dyn = self.dyn * (1.0 * w + 0.8 * g * math.sqrt(w)) * (clock ** 2 if self.dvfs_tau else 1.0)
        return host + acc / clock, 4.0 + self.floor_w + dyn

    def mean_seconds(self, w, g):  # steady state
        return self._seconds_watts(w, g, self.target_clock(w, g))[0]

    def mean_watts(self, w, g):
        return self._seconds_watts(w, g, self.target_clock(w, g))[1]

    def tps(self, w, g):
        return self.mean_tokens(w, g) / self.mean_seconds(w, g)

    def tokens_per_j(self, w, g):
        return self.tps(w, g) / self.mean_watts(w, g)

    def round(self, w, g):
        a, accepted = self.acceptance(w), 0
        while accepted < g and self.rng.random() < a:
            accepted += 1
        clock = self.clock if self.clock is not None else self.target_clock(w, g)
        seconds, watts = self._seconds_watts(w, g, clock)
        seconds *= max(0.5, self.rng.gauss(1, self.noise))
        watts *= max(0.5, self.rng.gauss(1, self.noise))
        if self.dvfs_tau:
            self.clock = clock + (self.target_clock(w, g) - clock) * (1 - math.exp(-seconds / self.dvfs_tau))
        return accepted + 1, seconds, watts, accepted


class Trace:
    """The device's true power over time (constant within a round): energy E(t) and F(t), the integral of E."""

    def __init__(self):
        self.t, self.e, self.f, self.p = [0.0], [0.0], [0.0], []

    def add(self, seconds, watts):
        t0, e0, f0 = self.t[-1], self.e[-1], self.f[-1]
        self.p.append(watts)
        self.t.append(t0 + seconds)
        self.e.append(e0 + watts * seconds)
        self.f.append(f0 + e0 * seconds + 0.5 * watts * seconds ** 2)

    def _at(self, x):
        i = min(bisect.bisect_right(self.t, x) - 1, len(self.p) - 1)
        return i, x - self.t[i]

    def energy(self, x):
        if x <= 0:  # before the start: the first round's power
            return self.p[0] * x
        i, dx = self._at(x)
        return self.e[i] + self.p[i] * dx

    def integral(self, x):
        if x <= 0:
            return 0.5 * self.p[0] * x * x
        i, dx = self._at(x)
        return self.f[i] + self.e[i] * dx + 0.5 * self.p[i] * dx * dx


class SimMeter:
    """The joules the controller is told for the round [a, b): lag_s: a moving average over the last lag_s; step_s: a
    counter updated every step_s; noise: multiplicative noise per round."""

    def __init__(self, seed, lag_s=0.0, step_s=0.0, noise=0.0):
        self.rng, self.lag, self.step, self.noise = random.Random(seed + 1000), lag_s, step_s, noise

    def joules(self, trace, a, b):
        if self.lag:
            f = trace.integral
            j = (f(b) - f(a) - f(b - self.lag) + f(a - self.lag)) / self.lag
        elif self.step:
            q = self.step
            j = trace.energy(q * math.floor(b / q)) - trace.energy(q * math.floor(a / q))
        else:
            j = trace.energy(b) - trace.energy(a)
        return j * max(0.0, self.rng.gauss(1, self.noise)) if self.noise else j


def simulate(ctl, dev, meter, budgets, total):
    """Rounds until `total` simulated seconds; returns (start, seconds, tokens) per round and the true power trace."""
    t, log, trace = 0.0, [], Trace()
    while t < total:
        ctl.set_budget([b for t0, b in budgets if t >= t0][-1])
        w, g = ctl.choose()
        tokens, seconds, watts, accepted = dev.round(w, g)
        trace.add(seconds, watts)
        ctl.observe(w, g, tokens, seconds, joules=meter.joules(trace, t, t + seconds), accepted=accepted, drafted=g)
        log.append((t, seconds, tokens))
        t += seconds
    return log, trace


def bars(log, trace, dev, start, end, budget):
    """(share of the whole 1-s windows in [start, end) whose true power is within budget + 5%, throughput over the
    rounds that start in it / the best static configuration's under the budget)."""
    windows = [trace.energy(start + i + 1) - trace.energy(start + i) for i in range(int(end - start))]
    within = sum(w <= budget * 1.05 for w in windows) / len(windows)
    rounds = [r for r in log if start <= r[0] < end]
    best = max(dev.tps(w, g) for w in WIDTHS for g in GAMMAS if dev.mean_watts(w, g) <= budget)
    return within, sum(r[2] for r in rounds) / sum(r[1] for r in rounds) / best


# name: (device, meter, [(t, budget W)]); settle_s as the engine sets it (the profile's 1.0 s, or the meter's lag)
DEVICES = {
    "lagged": (dict(), dict(lag_s=1.0), [(0.0, 12.0), (120.0, 8.0)]),
    "floor": (dict(floor_w=6.0, dyn=0.5), dict(), [(0.0, 14.0), (120.0, 12.0)]),
    "dvfs": (dict(dvfs_tau=0.3), dict(lag_s=0.1), [(0.0, 12.0), (120.0, 8.0)]),
    "noisy": (dict(), dict(noise=0.3), [(0.0, 12.0), (120.0, 8.0)]),
    "counter": (dict(), dict(step_s=0.1), [(0.0, 12.0), (120.0, 8.0)]),
}
SETTLE = 30.0  # seconds after each budget change before the bars apply: a probe costs ~1 s settling + a dwell
SEEDS = range(10)
# The windows bar holds for every seed, except under 30% meter noise and the 0.1-s counter: there a probe over the
# budget takes seconds to tell from noise, and one seed in ten falls to ~90% (the average over seeds keeps 95%).
WORST_SEED_WINDOWS = {"noisy": 0.85, "counter": 0.85}


def run_device(name, seed, settle_s=1.0):
    device, meter, budgets = DEVICES[name]
    dev = SimDevice(seed, **device)
    ctl = PowerController(WIDTHS, GAMMAS, budget_w=budgets[0][1], start=(1, 4), settle_s=settle_s)
    log, trace = simulate(ctl, dev, SimMeter(seed, **meter), budgets, total=240.0)
    ends = [t for t, _ in budgets[1:]] + [240.0]
    return ctl, [bars(log, trace, dev, t0 + SETTLE, t1, b) for (t0, b), t1 in zip(budgets, ends)]


@pytest.mark.parametrize("name", DEVICES)
def test_bars_on_lagged_floored_dvfs_noisy_and_stepped_meters(name):
    """Each device, each budget, over seeds: >= 95% of 1-s windows within budget + 5% (every seed; averaged over the
    seeds where WORST_SEED_WINDOWS says otherwise) and >= 90% of the best static throughput (every seed)."""
    results = [run_device(name, seed) for seed in SEEDS]
    for i, (_, budget) in enumerate(DEVICES[name][2]):
        within = [r[1][i][0] for r in results]
        ratio = [r[1][i][1] for r in results]
        assert statistics.mean(within) >= 0.95 and min(within) >= WORST_SEED_WINDOWS.get(name, 0.95), (name, within)
        assert min(ratio) >= 0.90, (name, budget, ratio)
    for ctl, _ in results:  # probing cost stays bounded
        assert ctl.probe_cost_s <= PROBE_SHARE * ctl.elapsed_s + 10.0


def test_without_settling_the_lagged_meter_fails():
    """The issue's failure, kept as a check that the bars can fail: a lagged reading counted at once makes probes'
    power spill into the configuration after them, false over-budget steps follow."""
    for seed in range(3):
        ctl, (_, (_, low)) = run_device("lagged", seed, settle_s=0.0)
        assert low < 0.8
        assert sum(d.reason.startswith("over budget") for d in ctl.history) >= 5


@pytest.mark.parametrize("name, budget", [("floor", 9.0), ("lagged", 2.0), ("noisy", 4.0)])
def test_an_infeasible_budget_is_reported_once_and_the_cheapest_configuration_kept(name, budget):
    device, meter, _ = DEVICES[name]
    dev = SimDevice(3, **device)  # floor: even (1, 1) draws 10.9 W
    ctl = PowerController(WIDTHS, GAMMAS, budget_w=budget, start=(2, 3), settle_s=1.0)
    simulate(ctl, dev, SimMeter(3, **meter), [(0.0, budget)], total=30.0)
    assert ctl.choose() == (1, 1)
    reasons = [d.reason for d in ctl.history]
    assert reasons.count(INFEASIBLE) == 1 and ctl.infeasible is not None
    assert ctl.infeasible.watts == pytest.approx(dev.mean_watts(1, 1), rel=0.15)
    msg = budget_warning([d.to_dict() for d in ctl.history])
    assert msg.startswith(f"warning: power budget {budget:g} W is infeasible") and "(beam width 1, gamma 1)" in msg
    ctl.set_budget(50.0)  # a budget that can be met clears it
    assert ctl.infeasible is None and budget_warning([d.to_dict() for d in ctl.history]) is None


def test_a_feasible_budget_is_not_reported():
    ctl, _ = run_device("noisy", 0)
    assert ctl.infeasible is None and budget_warning([d.to_dict() for d in ctl.history]) is None


def test_expected_tokens_from_acceptance_counts():
    # 1000 rounds drafting 4 at a per-token rate of 0.8: reached 1000, 800, 640, 512; passed 800, 640, 512, 410
    reached, passed = [1000, 800, 640, 512], [800, 640, 512, 410]
    mean, se = expected_tokens(reached, passed, 4)
    assert mean == pytest.approx((1 - 0.8 ** 5) / 0.2, rel=0.01) and 0 < se < 0.1
    longer, se8 = expected_tokens(reached, passed, 8)  # positions 5-8 take the last rate, with a larger error
    assert longer == pytest.approx((1 - 0.8 ** 9) / 0.2, rel=0.02) and se8 > se
    assert expected_tokens([], [], 3) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_energy_objective_finds_a_frugal_configuration(seed):
    dev = SimDevice(seed)
    ctl = PowerController(WIDTHS, GAMMAS, objective="energy", start=(2, 6))  # 26% worse than the best
    log, trace = simulate(ctl, dev, SimMeter(seed), [(0.0, None)], total=150.0)
    rounds = [r for r in log if r[0] >= 30.0]
    joules = trace.energy(log[-1][0] + log[-1][1]) - trace.energy(rounds[0][0])
    best = max(dev.tokens_per_j(w, g) for w in WIDTHS for g in GAMMAS)
    assert sum(r[2] for r in rounds) / joules >= 0.9 * best


def test_configurations_are_held_not_flipped_round_by_round():
    ctl, _ = run_device("lagged", 0)
    changes = [d.round for d in ctl.history if d.reason != "budget changed"]
    assert min(b - a for a, b in zip(changes, changes[1:])) >= 2
    assert len(changes) < ctl.rounds / 50
    assert any(d.reason == "budget changed" and d.budget_w == 8.0 for d in ctl.history)


def test_settling_rounds_are_not_measured():
    ctl = PowerController((1, 2), (1, 2), budget_w=10.0, start=(1, 1), settle_s=0.5, dwell_rounds=2)
    ctl._move((2, 2), "test")
    for _ in range(4):  # rounds that start within 0.5 s of the change: the reading still holds the previous one
        ctl.observe(2, 2, tokens=2, seconds=0.125, watts=9.0)
    assert (2, 2) not in ctl._powers
    ctl.observe(2, 2, tokens=2, seconds=0.125, watts=9.0)
    assert ctl._powers[(2, 2)].n == 1


def test_history_and_profile_defaults():
    ctl = PowerController.from_profile(load_profile("orin-nano"), mode="7W")
    assert (ctl.budget_w, ctl.choose(), ctl.dwell, ctl.settle_s) == (7.0, (1, 4), 12, 0.1)
    d = ctl.history[0].to_dict()
    assert d["reason"] == "start" and d["width"] == 1 and d["gamma"] == 4
    assert PowerController.from_profile(load_profile("orin-nano"), budget_w=9.5).budget_w == 9.5
    # the default mode's "15W" is a set of clock caps, not a power limit: no budget unless one is asked for
    assert PowerController.from_profile(load_profile("orin-nano"), objective="energy").budget_w is None
    ctl.expect_lag(1.0)  # NVML power: a 1-s average
    assert ctl.settle_s == 1.0
    ctl.expect_lag(0.1)
    assert ctl.settle_s == 1.0


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="objective"):
        PowerController(objective="speed")
    with pytest.raises(ConfigError, match="start"):
        PowerController(widths=(1, 2), start=(4, 1))
    with pytest.raises(ConfigError, match="budget"):
        PowerController(budget_w=-3)
    with pytest.raises(ConfigError, match="settle_s"):
        PowerController(settle_s=-1)
    ctl = PowerController()
    with pytest.raises(ConfigError, match="exactly one of"):
        ctl.observe(1, 3, tokens=2, seconds=0.1)
    with pytest.raises(ConfigError, match="seconds > 0"):
        ctl.observe(1, 3, tokens=2, seconds=0.0, watts=5.0)


def test_from_profile_offers_nothing_above_the_runs_gamma_and_width():
    ctl = PowerController.from_profile(load_profile("generic-cpu"), 20.0, max_width=2, max_gamma=3)
    assert max(ctl.widths) <= 2 and max(ctl.gammas) <= 3 and ctl.choose() in [(w, g) for w in ctl.widths
                                                                               for g in ctl.gammas]


def test_chasing_tokens_per_s_does_not_walk_among_equally_fast_configurations():
    """No budget, throughput: every gamma equally fast (each drafted token accepted, round time proportional to the
    tokens it yields) with 5% noise. Undecided probes are rejected, so the controller stays where it started instead
    of following noise (kept at >= 100%, half such probes would be kept and compound into a walk)."""
    for seed in range(6):
        rng = random.Random(seed)
        ctl = PowerController([2], [12, 14, 16], None, "throughput", (2, 16), probe_dwells=2)
        for _ in range(600):
            w, g = ctl.choose()
            ctl.observe(w, g, tokens=g + 1, seconds=0.0005 * (g + 1) * rng.uniform(0.95, 1.05), watts=0.0,
                        drafted=g, accepted=g)
        reasons = [d.reason for d in ctl.history]
        assert "probe rejected" in reasons and "probe kept" not in reasons, (seed, reasons)
        assert ctl.choose() in ((2, 16), (2, 14))  # at most a probe running at the end
