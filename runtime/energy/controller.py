"""A power-budget controller: picks beam width W and draft length gamma between decoding rounds.

Objective "throughput" maximises tokens/s while the measured power stays at or under the budget; objective "energy"
maximises tokens/J (minimises J/token), under the budget when one is set. Pure Python, no clock of its own::

    ctl = PowerController(widths=(1, 2, 4), gammas=range(1, 9), budget_w=15.0)
    while generating:
        w, gamma = ctl.choose()
        ...one round with w, gamma...
        ctl.observe(w, gamma, tokens=n_emitted, seconds=round_s, joules=round_j,   # or watts= (round average)
                    drafted=n_drafted, accepted=n_accepted)                        # optional: steers gamma
    ctl.history   # every change of (W, gamma) with its reason and estimates, for stats

How it decides (after onnxruntime-genai's adaptive-K rule, made safe for real meters: issue 14):
- settling: rounds that start less than `settle_s` after a change of configuration are not measured. A meter that
  averages (NVML power: the last 1 s) or a clock governor that follows the load still shows the previous
  configuration's power then; counted, a probe's power spills into the configuration after it and reads as a false
  over-budget step. (An early guard still steps down while settling when the lagged mix, between a configuration
  that was within the budget and this one, is itself clearly over it.) The engine sets settle_s to at least the
  meter's `averaging_s` (`expect_lag`);
- measurements: every configuration keeps the mean and spread of its settled rounds' power and score, and EWMA
  estimates (25% weight per dwell of `dwell_rounds` rounds) for display. Scores use the tokens a round yields on
  average by the acceptance rates per draft position (given drafted/accepted), not the round's own geometric
  count; standard errors take the larger of a sample's own spread and the spread pooled over all configurations;
- over budget: step down at once to the best known configuration within the budget, or to a cheaper neighbour, when
  the mean power since entering (or over every settled round here) is over the budget by more than guard_z standard
  errors, or two 1.5-s blocks in a row are over it by more than 5% (an energy counter that steps every ~0.1 s makes
  per-round readings 0 or a whole step); the configuration is then not probed again under this budget;
- infeasible budget: when the cheapest configuration is itself over the budget, say so once (reason
  "budget infeasible", with its measured watts; `infeasible`, `budget_warning`) and stay there, the least power the
  run can draw;
- otherwise, every `interval` rounds, probe one neighbour (gamma +-1, the next width, or a trade of one for the
  other) by upper confidence bound, untried ones first: costlier ones first while there is headroom (throughput),
  gamma in the direction the acceptance rate suggests (shrink below 50%, grow at >= 75%). Skipped: neighbours over
  the budget, untried costlier ones without HEADROOM, well-measured ones whose upper bound is below the current mean;
- a probe runs at least `dwell_rounds` rounds; it ends early when clearly better or worse (three standard errors after
  one dwell, two later) than the prior configuration, or when its power is likely over the budget (one standard
  error); it is kept only once its power is clearly within budget + 5%; undecided after `probe_dwells` (4; the
  throughput tuner without a budget: 2) dwells it is kept at >= 97% of the prior's score, or rejected when chasing
  tokens/s with no budget (probes as fast as the current configuration, kept by noise, would walk away from it).
  A rejected probe doubles the probe interval (backoff): no oscillation round by round;
- probing cost is bounded: no probe starts while the time spent in rejected probes exceeds PROBE_SHARE of the run.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import asdict, dataclass

from ..errors import ConfigError

KEEP_RATIO = 0.97  # an undecided probe survives at >= 97% of the prior score
SHRINK_BELOW, GROW_AT = 0.50, 0.75  # acceptance thresholds that steer gamma
HEADROOM = 0.05  # untried costlier neighbours are probed only below budget * (1 - HEADROOM)
PROBE_DWELLS = 4  # an undecided probe is settled by the 97% rule after this many dwells
MAX_BACKOFF = 8  # the probe interval grows up to dwell_rounds * MAX_BACKOFF after failed probes
TABU_DWELLS = 10  # a configuration that failed a probe or broke the budget is not probed for this many dwells
BEST_MARGIN = 1.05  # after a probe, jump to a well-measured configuration that beats the current by this much
# The aggregate guard: two blocks in a row whose mean power exceeds budget * (1 + TOLERANCE) step down. It catches
# what per-round statistics miss on an energy counter that steps every ~0.1 s (a round reads 0 or a whole step).
BLOCK_S, TOLERANCE = 1.5, 0.05
PRIOR_ROUNDS = 5  # pseudo-rounds that shrink a draft position's acceptance rate toward the previous position's
PROBE_SHARE = 0.2  # at most this share of the run is spent in probes that were rejected
INFEASIBLE = "budget infeasible"


def ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class Welford:
    """Running mean and variance (Welford's algorithm)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: float) -> None:
        self.n += 1
        d = x - self.mean
        self.mean += d / self.n
        self.m2 += d * (x - self.mean)

    def se(self) -> float:
        """Standard error of the mean (infinite below two samples)."""
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n >= 2 else math.inf


@dataclass
class Estimate:
    """EWMA estimates for one (W, gamma)."""

    tps: float | None = None
    watts: float | None = None
    tokens_per_j: float | None = None
    acceptance: float | None = None
    rounds: int = 0


@dataclass(frozen=True)
class Decision:
    """One change of configuration (or of budget), for stats."""

    round: int
    width: int
    gamma: int
    reason: str
    tps: float | None
    watts: float | None
    budget_w: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def guard_z(n: int) -> float:
    """Standard errors a mean of n samples must clear: 2, widened for small n roughly as Student's t (97.5%) is, since
    two or three noisy rounds give a standard error as unreliable as their mean."""
    return 2.0 + 4.0 / (n - 1)


def expected_tokens(reached: list[int], passed: list[int], gamma: int,
                    prior: float = PRIOR_ROUNDS) -> tuple[float, float] | None:
    """(expected tokens, its standard error) of a round that drafts `gamma` (the accepted ones + the target's own),
    from per-position counts: position j is reached when every draft before it was accepted, and its acceptance rate
    passed[j] / reached[j] does not depend on gamma. Each rate is shrunk toward the one before it by `prior`
    pseudo-rounds; positions never reached take the last rate (and its error). None without data."""
    if not reached or not reached[0]:
        return None
    rates, ses, rate = [], [], passed[0] / reached[0]
    for r, p in zip(reached, passed):
        rate = (p + prior * rate) / (r + prior)
        rates.append(rate)
        ses.append(math.sqrt(max(rate * (1 - rate), 0.01) / (r + prior)))
    at = [min(j, len(rates) - 1) for j in range(gamma)]
    runs = list(itertools.accumulate((rates[i] for i in at), operator.mul))  # P(position j accepted)
    # Delta method: E = 1 + sum_k prod_{j<=k} a_j, so dE/da_j = sum_{k>=j} run_k / a_j.
    var = sum((sum(runs[j:]) / max(rates[i], 1e-9) * ses[i]) ** 2 for j, i in enumerate(at))
    return 1.0 + sum(runs), math.sqrt(var)


def pooled_se(w: Welford, pool) -> float:
    """Standard error of w's mean, its spread taken as the larger of its own and the relative spread pooled over the
    Welfords in `pool` (all configurations' rounds): a few rounds' own spread is as noisy as their mean, and once tiny
    by chance it makes noise look significant."""
    if w.n < 2 or w.mean <= 0:
        return math.inf
    pairs = [(q.m2 / q.mean ** 2, q.n - 1) for q in pool if q.n >= 2 and q.mean > 0]
    dof = sum(n for _, n in pairs)
    rel_var = max(sum(v for v, _ in pairs) / dof if dof else 0.0, w.m2 / (w.n - 1) / w.mean ** 2)
    return w.mean * math.sqrt(rel_var / w.n)


class _Visit:
    """Rounds since entering the current configuration: per-round power and score, and the chunk of rounds not
    yet folded into the EWMA estimates."""

    def __init__(self) -> None:
        self.power, self.score = Welford(), Welford()
        self.clear_chunk()

    def clear_chunk(self) -> None:
        self.rounds, self.tokens, self.seconds, self.joules, self.accepted, self.drafted = 0, 0, 0.0, 0.0, 0, 0

    def add(self, tokens: int, seconds: float, watts: float, accepted: int, drafted: int, score: float) -> None:
        self.rounds += 1
        self.tokens += tokens
        self.seconds += seconds
        self.joules += watts * seconds
        self.accepted += accepted
        self.drafted += drafted
        self.power.add(watts)
        self.score.add(score)


class _Blocks:
    """One configuration's measured rounds cut into blocks of BLOCK_S seconds (across its visits: settling rounds are
    left out, so the blocks join cleanly), for the aggregate guard."""

    def __init__(self) -> None:
        self.joules = self.seconds = 0.0
        self.over = 0  # completed blocks in a row over budget * (1 + TOLERANCE)

    def add(self, joules: float, seconds: float, budget_w: float | None) -> int:
        """Add a round; returns the completed blocks in a row over the budget."""
        self.joules += joules
        self.seconds += seconds
        if self.seconds >= BLOCK_S:
            over = budget_w is not None and self.joules / self.seconds > budget_w * (1 + TOLERANCE)
            self.over = self.over + 1 if over else 0
            self.joules = self.seconds = 0.0
        return self.over


class PowerController:
    def __init__(self, widths=(1, 2, 4), gammas=(1, 2, 3, 4, 5, 6), budget_w: float | None = None,
                 objective: str = "throughput", start: tuple[int, int] | None = None, ewma_alpha: float = 0.25,
                 dwell_rounds: int = 12, settle_s: float = 0.0, probe_dwells: int = PROBE_DWELLS):
        self.widths, self.gammas = sorted(set(widths)), sorted(set(gammas))
        if not self.widths or not self.gammas or min(self.widths + self.gammas) < 1:
            raise ConfigError(f"controller needs positive widths and gammas, got {widths!r}, {gammas!r}")
        if objective not in ("throughput", "energy"):
            raise ConfigError(f"objective must be 'throughput' or 'energy', got {objective!r}")
        if not 0 < ewma_alpha <= 1 or dwell_rounds < 2 or not 0 <= settle_s <= 10 or probe_dwells < 1:
            raise ConfigError(f"ewma_alpha must be in (0, 1], dwell_rounds >= 2, settle_s in 0..10 s and probe_dwells "
                              f">= 1, got {ewma_alpha}, {dwell_rounds}, {settle_s}, {probe_dwells}")
        self.objective, self.alpha, self.dwell, self.settle_s = objective, ewma_alpha, dwell_rounds, settle_s
        self.probe_dwells = probe_dwells  # after this many dwells an undecided probe is settled (kept or rejected)
        start = tuple(start or (self.widths[0], self.gammas[len(self.gammas) // 2]))
        if start[0] not in self.widths or start[1] not in self.gammas:
            raise ConfigError(f"start {start} is not in widths {self.widths} x gammas {self.gammas}")
        self.current: tuple[int, int] = start
        self.estimates: dict[tuple[int, int], Estimate] = {}
        self.history: list[Decision] = []
        self.rounds = 0
        self.smoothed_w: float | None = None  # power over all rounds, ~1 s time constant, for display and stats
        self.budget_w: float | None = None
        self.infeasible: Decision | None = None  # set when the cheapest configuration is over the budget
        self._prior: tuple[int, int] | None = None  # the configuration a running probe is measured against
        self._visit = _Visit()
        self._scores: dict[tuple[int, int], Welford] = {}  # per-round scores of every round at each configuration
        self._powers: dict[tuple[int, int], Welford] = {}  # per-round watts of every settled round at each
        self._totals: dict[tuple[int, int], tuple[int, int, float, float]] = {}  # (rounds, tokens, s, J) of them
        self._blocks: dict[tuple[int, int], _Blocks] = {}
        self._blocks_over = 0
        self._tripped: set[tuple[int, int]] = set()  # configurations that tripped the guard under this budget
        self._accept: dict[int, tuple[list[int], list[int]]] = {}  # width -> per draft position (reached, passed)
        self._here = 0  # rounds at the current configuration
        self._interval = dwell_rounds
        self._tabu: dict[tuple[int, int], int] = {}
        self._since_s = math.inf  # seconds since the last change of configuration (none yet: nothing to settle)
        self._settling = Welford()  # readings while settling, for the early guard
        self._from_w: float | None = None  # the power of the configuration before the last change
        self.elapsed_s = 0.0
        self.probe_cost_s = 0.0  # time spent in probes that were rejected
        self._probe_s = 0.0  # time in the running probe
        self.set_budget(budget_w)
        self._record("start")

    @classmethod
    def from_profile(cls, profile, budget_w: float | None = None, mode: str | None = None,
                     objective: str | None = None, max_width: int | None = None,
                     max_gamma: int | None = None) -> PowerController:
        """A controller with the profile's defaults. The budget is `budget_w`, or the wattage of the power mode named
        by `mode` (a set of clock caps, not a limit the module keeps to, so never taken unasked), else none.
        max_width / max_gamma drop larger configurations (a run reserves its context for its own gamma and width)."""
        c = profile.controller
        widths = [w for w in c.widths if max_width is None or w <= max_width] or [max_width]
        gammas = [g for g in c.gammas if max_gamma is None or g <= max_gamma] or [max_gamma]
        start = (min(c.start[0], widths[-1]), min(c.start[1], gammas[-1]))  # the profile's start, clamped
        if budget_w is None and mode is not None:
            budget_w = profile.budget_w(mode)
        return cls(widths, gammas, budget_w, objective or c.objective, start, c.ewma, c.dwell_rounds, c.settle_s)

    # --- public API -------------------------------------------------------------------------------------------
    def choose(self) -> tuple[int, int]:
        return self.current

    def expect_lag(self, seconds: float) -> None:
        """The meter lags the load by `seconds` (`Meter.averaging_s`: NVML power is a 1-s average): settle at least
        that long after each change."""
        self.settle_s = min(10.0, max(self.settle_s, seconds))

    def set_budget(self, watts: float | None) -> None:
        """A new budget (e.g. the power mode changed): forget probe failures; the guard re-checks the current one."""
        if watts is not None and not (watts > 0 and math.isfinite(watts)):
            raise ConfigError(f"power budget must be a finite number of watts > 0, got {watts!r}")
        if watts != self.budget_w:
            self.budget_w = watts
            self.infeasible = None
            self._blocks.clear()
            self._tripped.clear()
            self._tabu.clear()
            self._interval = self.dwell
            if self.history:
                self._record("budget changed")

    def observe(self, width: int, gamma: int, tokens: int, seconds: float, joules: float | None = None,
                watts: float | None = None, accepted: int | None = None, drafted: int | None = None) -> None:
        """Feed one round's outcome; the next `choose()` reflects it. Give joules or watts (average over the round)."""
        if not seconds > 0 or tokens < 0:
            raise ConfigError(f"a round needs seconds > 0 and tokens >= 0, got {seconds!r}, {tokens!r}")
        if (joules is None) == (watts is None):
            raise ConfigError("observe() needs exactly one of joules= or watts=")
        w = watts if watts is not None else joules / seconds
        self.rounds += 1
        self.elapsed_s += seconds
        self.smoothed_w = ewma(self.smoothed_w, w, min(1.0, seconds))
        settling, self._since_s = self._since_s < self.settle_s, self._since_s + seconds
        if self._prior is not None:
            self._probe_s += seconds
        if accepted is not None and drafted:
            self._count_acceptance(width, min(accepted, drafted), drafted)
        if (width, gamma) != self.current:
            return  # a round the driver ran with another configuration says nothing about the current one
        if settling:  # the reading still holds (part of) the previous configuration's power: not this one's
            self._early_guard(w)
            return
        # Scores use the tokens a round of this (W, gamma) yields on average, by the acceptance rates, where known: a
        # round's own count is geometric (coefficient of variation ~0.7), its time and energy far steadier.
        expected = self._expected_tokens(self.current)
        gain = tokens if expected is None else expected[0]
        score = gain / seconds if self.objective == "throughput" else (gain / (w * seconds) if w > 0 else 0.0)
        self._here += 1
        self._visit.add(tokens, seconds, w, accepted or 0, drafted or 0, score)
        self._scores.setdefault(self.current, Welford()).add(score)
        self._powers.setdefault(self.current, Welford()).add(w)
        self._blocks_over = self._blocks.setdefault(self.current, _Blocks()).add(w * seconds, seconds, self.budget_w)
        n0, tokens0, seconds0, joules0 = self._totals.get(self.current, (0, 0, 0.0, 0.0))
        self._totals[self.current] = (n0 + 1, tokens0 + tokens, seconds0 + seconds, joules0 + w * seconds)
        if self._visit.rounds >= self.dwell:
            self._fold()
        self._decide()

    # --- estimates --------------------------------------------------------------------------------------------
    def _fold(self) -> None:
        """Fold the visit's chunk of rounds into the EWMA estimates."""
        v = self._visit
        e = self.estimates.setdefault(self.current, Estimate())
        e.tps = ewma(e.tps, v.tokens / v.seconds, self.alpha)
        e.watts = ewma(e.watts, v.joules / v.seconds, self.alpha)
        e.tokens_per_j = ewma(e.tokens_per_j, v.tokens / v.joules if v.joules > 0 else 0.0, self.alpha)
        if v.drafted:
            e.acceptance = ewma(e.acceptance, v.accepted / v.drafted, self.alpha)
        e.rounds += v.rounds
        v.clear_chunk()

    def _count_acceptance(self, width: int, accepted: int, drafted: int) -> None:
        reached, passed = self._accept.setdefault(width, ([], []))
        while len(reached) < drafted:
            reached.append(0)
            passed.append(0)
        for j in range(min(accepted + 1, drafted)):
            reached[j] += 1
        for j in range(accepted):
            passed[j] += 1

    def _expected_tokens(self, cfg) -> tuple[float, float] | None:
        counts = self._accept.get(cfg[0])
        return expected_tokens(*counts, cfg[1]) if counts else None

    def _model_se(self, cfg, score: float) -> float:
        """The part of a score's error that comes from the acceptance rates it was computed with (shared by all its
        rounds, so not in their spread)."""
        expected = self._expected_tokens(cfg)
        return score * expected[1] / expected[0] if expected else 0.0

    def _score(self, cfg) -> float:
        """Tokens/s (or tokens/J) over every measured round at `cfg`, with the tokens per round expected from the
        acceptance rates where known: far steadier than the EWMA for comparing configurations."""
        rounds, tokens, seconds, joules = self._totals.get(cfg, (0, 0, 0.0, 0.0))
        if not seconds:
            return -math.inf
        expected = self._expected_tokens(cfg)
        gain = tokens if expected is None else expected[0] * rounds
        return gain / seconds if self.objective == "throughput" else (gain / joules if joules > 0 else 0.0)

    def _feasible(self, cfg) -> bool | None:
        """By every measured round at `cfg` (steadier than the EWMA under noisy meters): True when their mean power is
        within the budget, False when it is over it beyond noise or tripped the guard, None when untried or unclear."""
        p = self._powers.get(cfg)
        if p is None or p.n < 2:
            return None if cfg not in self._tripped else False
        if self.budget_w is None or p.mean <= self.budget_w:
            return True
        over = cfg in self._tripped or p.mean - 2 * pooled_se(p, self._powers.values()) > self.budget_w
        return False if over else None

    def _neighbours(self, cfg) -> list[tuple[int, int]]:
        """gamma +-1, the next width up or down, and the two trades of one for the other (which walk along the
        budget's frontier); gamma first, in the direction the acceptance rate suggests."""
        wi, gi = self.widths.index(cfg[0]), self.gammas.index(cfg[1])

        def at(dw: int, dg: int) -> list[tuple[int, int]]:
            i, j = wi + dw, gi + dg
            return [(self.widths[i], self.gammas[j])] if 0 <= i < len(self.widths) and 0 <= j < len(self.gammas) else []

        acc = (self.estimates.get(cfg) or Estimate()).acceptance
        widths = at(1, 0) + at(-1, 0) + at(1, -1) + at(-1, 1)
        if acc is not None and acc < SHRINK_BELOW:
            return at(0, -1) + widths + at(0, 1)
        if acc is not None and acc < GROW_AT:
            return widths + at(0, 1) + at(0, -1)  # gamma is about right: try the width first
        return at(0, 1) + at(0, -1) + widths

    # --- decisions --------------------------------------------------------------------------------------------
    def _decide(self) -> None:
        if self.budget_w is not None and (self._over_budget(self._visit.power) or self._blocks_over >= 2
                                          or self._over_budget(self._powers[self.current])):
            self._step_down()
        elif self._prior is not None:
            if self._here % self.dwell == 0:
                self._judge_probe()
        elif self._here >= self._interval and self._scores[self.current].n >= 2 * self.dwell:
            self._probe()

    def _over_budget(self, p: Welford) -> bool:
        """The mean of p is over the budget beyond noise (guard_z pooled standard errors)."""
        if self.budget_w is None or p.n < 3 or p.mean <= self.budget_w:
            return False
        return p.mean - guard_z(p.n) * pooled_se(p, self._powers.values()) > self.budget_w

    def _early_guard(self, watts: float) -> None:
        """While settling, a lagged reading mixes the previous configuration's power with this one's. If the previous
        one was within the budget and the mix is clearly over it, this one is over it: step down without waiting."""
        s = self._settling
        s.add(watts)
        if (self.budget_w is not None and self._from_w is not None and self._from_w <= self.budget_w
                and self._over_budget(s)):
            # The mix is a lower bound of this configuration's power: keep it as its measured power.
            self._powers[self.current] = s
            self._step_down()

    def _step_down(self) -> None:
        cfg = self.current
        self._tripped.add(cfg)
        self._tabu[cfg] = self.rounds
        self._prior = None
        known = [c for c in self.estimates if c != cfg and self._feasible(c)]
        if known:
            self._move(max(known, key=self._score), "over budget: best known configuration under it")
            return
        cheaper = [c for c in self._neighbours(cfg) if c[0] <= cfg[0] and c[1] <= cfg[1]]
        # Untried: shrink the width first, since every beam multiplies both the draft and the verify work.
        cheaper.sort(key=lambda c: (self.estimates[c].watts if c in self.estimates else math.inf, c[0] >= cfg[0]))
        if cheaper:
            self._move(cheaper[0], "over budget: cheaper neighbour")
        elif self.infeasible is None:
            # The cheapest configuration breaks the budget: nothing to trade for it. Say so once, with the measured
            # watts, and stay here: the least power this run can draw.
            self._record(INFEASIBLE, watts=(self._visit.power if self._visit.power.n else self._settling).mean)
            self.infeasible = self.history[-1]

    def _probe(self) -> None:
        """Move to the most promising neighbour by upper confidence bound (mean score + 2 standard errors): untried
        ones first, and a neighbour measured only briefly stays worth another look after its tabu."""
        if self._jump_to_best():
            return
        if self.probe_cost_s > PROBE_SHARE * self.elapsed_s:
            self._here = 0  # probes have cost enough for now; look again after another interval
            return
        budget, mean_here = self.budget_w, self._scores[self.current].mean
        power = self._powers.get(self.current)
        headroom = budget is None or power is not None and power.n >= 2 and power.mean <= budget * (1 - HEADROOM)
        candidates = []
        for order, cfg in enumerate(self._neighbours(self.current)):
            known = self._feasible(cfg)
            if self.rounds - self._tabu.get(cfg, -math.inf) < TABU_DWELLS * self.dwell or known is False:
                continue
            costlier = cfg[0] > self.current[0] or cfg[1] > self.current[1] and cfg[0] >= self.current[0]
            if known is None and costlier and not headroom:
                continue
            stats = self._scores.get(cfg)
            upper = stats.mean + 2 * math.hypot(stats.se(), self._model_se(cfg, stats.mean)) if stats else math.inf
            if stats and stats.n >= 2 * self.dwell and upper < mean_here:
                continue  # measured enough to know it is worse
            # Chasing throughput with headroom left, more work per round (costlier) is the likelier gain.
            ahead = costlier and self.objective == "throughput" and headroom
            candidates.append((upper, ahead, -order, cfg))
        if not candidates:
            self._here = 0  # nothing worth probing now; look again after another interval
            return
        self._prior, self._probe_s = self.current, 0.0
        self._move(max(candidates)[-1], "probe")

    def _judge_probe(self) -> None:
        probe, prior = self._visit.score, self._scores.get(self._prior) or Welford()
        # A stricter bar after one dwell: a single chunk's spread is itself poorly known.
        pool = self._scores.values()
        margin = (3 if self._here < 2 * self.dwell else 2) * math.hypot(
            pooled_se(probe, pool), pooled_se(prior, pool), self._model_se(self.current, probe.mean),
            self._model_se(self._prior, prior.mean))
        power = self._visit.power
        likely_over = self.budget_w is not None and power.mean - pooled_se(power, self._powers.values()) > self.budget_w
        if likely_over:  # ends before the guard must be sure, and is not probed again under this budget
            self._tripped.add(self.current)
        if self._feasible(self.current) is False or likely_over or probe.mean < prior.mean - margin:
            self._reject_probe()
        elif self._power_unsure():
            if self._here >= 2 * self.probe_dwells * self.dwell and self._visit.power.mean > self.budget_w:
                self._reject_probe()  # long measured and more likely over the budget than not
            # else not kept while its power may still be over the budget: measure on
        elif probe.mean > prior.mean + margin:
            self._keep_probe(improved=True)
        elif self._here >= self.probe_dwells * self.dwell:
            # Under a budget an undecided probe may cost up to 3% of the score (it may also draw less power); chasing
            # tokens/s alone it is rejected: kept at >= 100%, noise alone kept half the probes of configurations as
            # fast as the current one, and those steps compounded into a walk (MTAD gamma 16 -> 14 -> 12, -10%)
            speed_only = self.budget_w is None and self.objective == "throughput"
            if not speed_only and probe.mean >= KEEP_RATIO * prior.mean:
                self._keep_probe(improved=False)
            else:
                self._reject_probe()

    def _power_unsure(self) -> bool:
        """The probe's power may exceed the budget (+ tolerance): within three standard errors of it."""
        p = self._visit.power
        return self.budget_w is not None and p.mean + 3 * pooled_se(p, self._powers.values()) > self.budget_w * (
            1 + TOLERANCE)

    def _keep_probe(self, improved: bool) -> None:
        self._prior = None
        # On a plateau, probe less often; after a clear gain, look around again soon.
        self._interval = self.dwell if improved else min(self._interval * 2, self.dwell * MAX_BACKOFF)
        if not self._jump_to_best():
            self._record("probe kept")
            self._here = 0

    def _jump_to_best(self) -> bool:
        """Kept probes may lose up to 3% each; return to a well-measured configuration that is clearly better."""
        best = max((c for c in self.estimates if self._feasible(c) and self.estimates[c].rounds >= 4 * self.dwell),
                   key=self._score, default=self.current)
        if self._score(best) > BEST_MARGIN * self._score(self.current):
            self._move(best, "best known configuration")
            return True
        return False

    def _reject_probe(self) -> None:
        prior, self._prior = self._prior, None
        self.probe_cost_s += self._probe_s
        self._tabu[self.current] = self.rounds
        self._interval = min(self._interval * 2, self.dwell * MAX_BACKOFF)
        self._move(prior, "probe rejected")

    def _move(self, cfg, reason: str) -> None:
        if self._visit.rounds >= 2:
            self._fold()  # a short visit (a budget breach) still teaches its power
        left = self._visit.power  # the visit being left (not older ones: the meter shows what just ran)
        self._from_w = left.mean if left.n >= 3 else None
        self.current = cfg
        self._here, self._since_s, self._settling = 0, 0.0, Welford()
        self._visit = _Visit()
        self._record(reason)

    def _record(self, reason: str, watts: float | None = None) -> None:
        e = self.estimates.get(self.current) or Estimate()
        self.history.append(Decision(self.rounds, *self.current, reason, e.tps, e.watts if watts is None else watts,
                                     self.budget_w))


def budget_warning(decisions: list[dict] | None) -> str | None:
    """One line for the user when the run's (latest) budget could not be met, from stats' controller decisions."""
    for d in reversed(decisions or []):
        if d["reason"] == "budget changed":
            return None
        if d["reason"] == INFEASIBLE:
            return (f"warning: power budget {d['budget_w']:g} W is infeasible: the cheapest configuration (beam width "
                    f"{d['width']}, gamma {d['gamma']}) draws {d['watts']:.2f} W; the run stayed there. Raise "
                    "--power-budget or choose a lower power mode")
    return None
