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

How it decides (after onnxruntime-genai's adaptive-K rule, made safe for noisy rounds):
- every configuration keeps EWMA estimates (25% weight on the newest) of tokens/s, watts, tokens/J and acceptance,
  updated once per `dwell_rounds` rounds: one round's token count (0..gamma accepted) is far too noisy to move an
  estimate by 25% on its own;
- over budget: when the mean power since entering the current configuration, less two standard errors (so noise
  alone rarely trips it), exceeds the budget, step down at once to the best known configuration under the budget,
  or to a cheaper neighbour, and do not probe the offender again for a while;
- otherwise, every `interval` rounds, probe one neighbour (gamma +-1, the next width, or a trade of one for the
  other), untried ones first, gamma in the direction the acceptance rate suggests (shrink below 50%, grow at >= 75%);
  neighbours known to exceed the budget are skipped, untried costlier ones are tried only with headroom;
- a probe runs at least `dwell_rounds` rounds and ends early when clearly better or clearly worse (three standard
  errors after one dwell, two later) than all rounds so far at the prior configuration; else after 4 dwells it is kept only at >= 97% of the
  prior's score. A rejected probe doubles the probe interval (backoff), so the controller never oscillates round by round.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ConfigError

KEEP_RATIO = 0.97  # an undecided probe survives at >= 97% of the prior score
SHRINK_BELOW, GROW_AT = 0.50, 0.75  # acceptance thresholds that steer gamma
HEADROOM = 0.03  # untried costlier neighbours are probed only below budget * (1 - HEADROOM)
PROBE_DWELLS = 4  # an undecided probe is settled by the 97% rule after this many dwells
MAX_BACKOFF = 8  # the probe interval grows up to dwell_rounds * MAX_BACKOFF after failed probes
TABU_DWELLS = 10  # a configuration that failed a probe or broke the budget is not probed for this many dwells
BEST_MARGIN = 1.05  # after a probe, jump to a well-measured configuration that beats the current by this much


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


class PowerController:
    def __init__(self, widths=(1, 2, 4), gammas=(1, 2, 3, 4, 5, 6), budget_w: float | None = None,
                 objective: str = "throughput", start: tuple[int, int] | None = None, ewma_alpha: float = 0.25,
                 dwell_rounds: int = 12):
        self.widths, self.gammas = sorted(set(widths)), sorted(set(gammas))
        if not self.widths or not self.gammas or min(self.widths + self.gammas) < 1:
            raise ConfigError(f"controller needs positive widths and gammas, got {widths!r}, {gammas!r}")
        if objective not in ("throughput", "energy"):
            raise ConfigError(f"objective must be 'throughput' or 'energy', got {objective!r}")
        if not 0 < ewma_alpha <= 1 or dwell_rounds < 2:
            raise ConfigError(f"ewma_alpha must be in (0, 1] and dwell_rounds >= 2, got {ewma_alpha}, {dwell_rounds}")
        self.objective, self.alpha, self.dwell = objective, ewma_alpha, dwell_rounds
        start = tuple(start or (self.widths[0], self.gammas[len(self.gammas) // 2]))
        if start[0] not in self.widths or start[1] not in self.gammas:
            raise ConfigError(f"start {start} is not in widths {self.widths} x gammas {self.gammas}")
        self.current: tuple[int, int] = start
        self.estimates: dict[tuple[int, int], Estimate] = {}
        self.history: list[Decision] = []
        self.rounds = 0
        self.smoothed_w: float | None = None  # power over all rounds, ~1 s time constant, for display and stats
        self.budget_w: float | None = None
        self._prior: tuple[int, int] | None = None  # the configuration a running probe is measured against
        self._visit = _Visit()
        self._scores: dict[tuple[int, int], Welford] = {}  # per-round scores of every round at each configuration
        self._here = 0  # rounds at the current configuration
        self._interval = dwell_rounds
        self._tabu: dict[tuple[int, int], int] = {}
        self.set_budget(budget_w)
        self._record("start")

    @classmethod
    def from_profile(cls, profile, budget_w: float | None = None, mode: str | None = None,
                     objective: str | None = None, max_width: int | None = None,
                     max_gamma: int | None = None) -> PowerController:
        """A controller with the profile's defaults; the budget is `budget_w` or the power mode's. max_width /
        max_gamma drop larger configurations (a run reserves its context for its own gamma and beam width)."""
        c = profile.controller
        widths = [w for w in c.widths if max_width is None or w <= max_width] or [max_width]
        gammas = [g for g in c.gammas if max_gamma is None or g <= max_gamma] or [max_gamma]
        start = (min(c.start[0], widths[-1]), min(c.start[1], gammas[-1]))  # the profile's start, clamped
        return cls(widths, gammas, budget_w if budget_w is not None else profile.budget_w(mode),
                   objective or c.objective, start, c.ewma, c.dwell_rounds)

    # --- public API -------------------------------------------------------------------------------------------
    def choose(self) -> tuple[int, int]:
        return self.current

    def set_budget(self, watts: float | None) -> None:
        """A new budget (e.g. the power mode changed): forget probe failures; the guard re-checks the current one."""
        if watts is not None and not (watts > 0 and math.isfinite(watts)):
            raise ConfigError(f"power budget must be a finite number of watts > 0, got {watts!r}")
        if watts != self.budget_w:
            self.budget_w = watts
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
        self.smoothed_w = ewma(self.smoothed_w, w, min(1.0, seconds))
        if (width, gamma) != self.current:
            return  # a round the driver ran with another configuration says nothing about the current one
        score = tokens / seconds if self.objective == "throughput" else (tokens / (w * seconds) if w > 0 else 0.0)
        self._here += 1
        self._visit.add(tokens, seconds, w, accepted or 0, drafted or 0, score)
        self._scores.setdefault(self.current, Welford()).add(score)
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

    def _score(self, cfg) -> float:
        e = self.estimates.get(cfg)
        if e is None or e.tps is None:
            return -math.inf
        return e.tps if self.objective == "throughput" else e.tokens_per_j

    def _feasible(self, cfg) -> bool | None:
        """True/False when the estimate says so, None when the configuration is untried."""
        e = self.estimates.get(cfg)
        if e is None or e.watts is None:
            return None
        return self.budget_w is None or e.watts <= self.budget_w

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
        p = self._visit.power
        if self.budget_w is not None and p.n >= 2 and p.mean - 2 * p.se() > self.budget_w:
            self._step_down()
        elif self._prior is not None:
            if self._here % self.dwell == 0:
                self._judge_probe()
        elif self._here >= self._interval and self._scores[self.current].n >= 2 * self.dwell:
            self._probe()

    def _step_down(self) -> None:
        cfg = self.current
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
        elif self.history[-1].reason != "over budget: nothing cheaper":
            self._record("over budget: nothing cheaper")

    def _probe(self) -> None:
        """Move to the most promising neighbour by upper confidence bound (mean score + 2 standard errors): untried
        ones first, and a neighbour measured only briefly stays worth another look after its tabu."""
        if self._jump_to_best():
            return
        budget, here = self.budget_w, self.estimates.get(self.current)
        candidates = []
        for order, cfg in enumerate(self._neighbours(self.current)):
            known = self._feasible(cfg)
            if self.rounds - self._tabu.get(cfg, -math.inf) < TABU_DWELLS * self.dwell or known is False:
                continue
            costlier = cfg[0] > self.current[0] or cfg[1] > self.current[1] and cfg[0] >= self.current[0]
            if (known is None and costlier and budget is not None
                    and (here is None or here.watts > budget * (1 - HEADROOM))):
                continue
            stats = self._scores.get(cfg)
            candidates.append((stats.mean + 2 * stats.se() if stats else math.inf, -order, cfg))
        if not candidates:
            self._here = 0  # nothing worth probing now; look again after another interval
            return
        self._prior = self.current
        self._move(max(candidates)[2], "probe")

    def _judge_probe(self) -> None:
        probe, prior = self._visit.score, self._scores.get(self._prior) or Welford()
        # A stricter bar after one dwell: a single chunk's spread is itself poorly known.
        margin = (3 if self._here < 2 * self.dwell else 2) * math.hypot(probe.se(), prior.se())
        if self._feasible(self.current) is False or probe.mean < prior.mean - margin:
            self._reject_probe()
        elif probe.mean > prior.mean + margin:
            self._keep_probe(improved=True)
        elif self._here >= PROBE_DWELLS * self.dwell:
            if probe.mean >= KEEP_RATIO * prior.mean:
                self._keep_probe(improved=False)
            else:
                self._reject_probe()

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
        self._tabu[self.current] = self.rounds
        self._interval = min(self._interval * 2, self.dwell * MAX_BACKOFF)
        self._move(prior, "probe rejected")

    def _move(self, cfg, reason: str) -> None:
        if self._visit.rounds >= 2:
            self._fold()  # a short visit (a budget breach) still teaches its power
        self.current = cfg
        self._here = 0
        self._visit = _Visit()
        self._record(reason)

    def _record(self, reason: str) -> None:
        e = self.estimates.get(self.current) or Estimate()
        self.history.append(Decision(self.rounds, *self.current, reason, e.tps, e.watts, self.budget_w))
