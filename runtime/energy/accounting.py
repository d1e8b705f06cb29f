"""Energy accounting around a generation: per-phase energy, J/token, tokens/J, power, idle-subtracted figures.

Usage (the generation driver wraps prefill and decode)::

    from mjsd.runtime.energy import EnergyMonitor, measure_idle, open_meters
    meters = open_meters(profile=profile)           # once per process; best sensor first, the estimate last
    idle_w = measure_idle(meters, seconds=1.0)      # optional: enables the idle-subtracted figures
    with EnergyMonitor(meters, idle_w=idle_w) as mon:
        mon.phase("prefill"); ...run prefill...
        mon.phase("decode");  ...run decode rounds...
        report = mon.report(tokens=n_generated, prompt_tokens=n_prompt)
    report.to_dict()   # {"energy_j", "j_per_token", "tokens_per_j", "avg_w", "peak_w", "peak_basis", "source",
                       #  "estimated", "degraded", "failovers", "idle_subtracted_j_per_token",
                       #  "phases": {"prefill": {...}, "decode": {...}}, ...}

Per-round energy for the power-budget controller: `t0, j0 = mon.energy()` before a round, `t1, j1 = mon.energy()`
after it, then `controller.observe(w, gamma, tokens, t1 - t0, joules=j1 - j0)`.

`phase(name)` ends the previous phase; a name used twice accumulates; phase "wait" is left out of the totals. Prefill per-token figures are per prompt token,
decode and overall ones per generated token. With a power meter a background thread samples at `hz`; with a counter
(RAPL, NVML energy, the estimate) nothing runs between phase boundaries. Every figure of a run that used the estimate,
even in part after a sensor failed, carries estimated=True; every figure of a run with a degraded reading (a known
total rail unreadable, a counter that does not move) carries the reasons in `degraded` (empty when the measurement is
whole), and a failover to another meter is in `failovers` with its time.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .base import Meter
from .sampler import PEAK_WINDOW_S, Mark, Sampler

WAIT = "wait"  # the phase that report() leaves out of the totals


def per_token(joules: float | None, tokens: int | None) -> float | None:
    return joules / tokens if joules is not None and tokens else None


def tokens_per_joule(joules: float | None, tokens: int | None) -> float | None:
    return tokens / joules if joules and tokens is not None else None


def above_idle(joules: float, seconds: float, idle_w: float | None) -> float | None:
    """Energy beyond what the device draws doing nothing over the same time (never negative)."""
    return None if idle_w is None else max(0.0, joules - idle_w * seconds)


@dataclass
class PhaseReport:
    name: str
    seconds: float = 0.0
    energy_j: float = 0.0
    peak_w: float = 0.0
    tokens: int | None = None
    idle_subtracted_j: float | None = None

    @property
    def avg_w(self) -> float:
        return self.energy_j / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "avg_w": self.avg_w, "j_per_token": per_token(self.energy_j, self.tokens),
                "tokens_per_j": tokens_per_joule(self.energy_j, self.tokens),
                "idle_subtracted_j_per_token": per_token(self.idle_subtracted_j, self.tokens)}


@dataclass
class EnergyReport:
    source: str  # the meter(s) used, "a -> b" after a failover; "estimated" for the CPU-time model
    estimated: bool
    seconds: float
    energy_j: float
    peak_w: float
    tokens: int
    idle_w: float | None
    idle_subtracted_j: float | None
    phases: dict[str, PhaseReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    meter: dict = field(default_factory=dict)  # the primary meter's description (rails, nvpmodel, ...)
    complete: bool = True  # False when every meter failed and part of the run was not counted
    degraded: list[str] = field(default_factory=list)  # why the figures are not whole measurements; empty if they are
    failovers: list[dict] = field(default_factory=list)  # {"t_s", "from", "to", "error"} per meter change
    retries: int = 0  # transient read errors bridged
    peak_basis: str = ""  # what peak_w is a peak of ("1-s average ..." for NVML power)

    @property
    def avg_w(self) -> float:
        return self.energy_j / self.seconds if self.seconds > 0 else 0.0

    @property
    def j_per_token(self) -> float | None:
        return per_token(self.energy_j, self.tokens)

    @property
    def tokens_per_j(self) -> float | None:
        return tokens_per_joule(self.energy_j, self.tokens)

    @property
    def idle_subtracted_j_per_token(self) -> float | None:
        return per_token(self.idle_subtracted_j, self.tokens)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "phases"}
        return {**d, "avg_w": self.avg_w, "j_per_token": self.j_per_token, "tokens_per_j": self.tokens_per_j,
                "idle_subtracted_j_per_token": self.idle_subtracted_j_per_token,
                "phases": {name: p.to_dict() for name, p in self.phases.items()}}


def measure_idle(meters: Meter | list[Meter], seconds: float = 1.0, hz: float = 50.0) -> float:
    """Average power while this process sleeps: the baseline for idle-subtracted energy."""
    sampler = Sampler(meters, hz)
    start = sampler.start()
    time.sleep(seconds)
    end = sampler.stop()
    return (end.energy_j - start.energy_j) / max(end.t - start.t, 1e-9)


class EnergyMonitor:
    def __init__(self, meters: Meter | list[Meter], hz: float = 50.0, idle_w: float | None = None):
        self.sampler = Sampler(meters, hz, busy=True)
        self.idle_w = idle_w
        self._phases: dict[str, PhaseReport] = {}
        self._start: Mark | None = None
        self._end: Mark | None = None
        self._current: tuple[str, Mark] | None = None
        self._peak = 0.0

    def __enter__(self) -> EnergyMonitor:
        self._start = self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        self.sampler.stop()

    def energy(self) -> tuple[float, float]:
        """(monotonic time, joules since the monitor started counting), sampled now."""
        return self.sampler.peek()

    def phase(self, name: str) -> None:
        """End the current phase (if any) and start `name`."""
        mark = self._end_phase()
        self._current = (name, mark)

    def _end_phase(self) -> Mark:
        mark = self.sampler.mark()
        self._peak = max(self._peak, mark.peak_w)
        if self._current is not None:
            name, begin = self._current
            p = self._phases.setdefault(name, PhaseReport(name))
            p.seconds += mark.t - begin.t
            p.energy_j += mark.energy_j - begin.energy_j
            # A phase shorter than one sample drew at least its average power; below a peak window a counter's
            # average is not a power (one step in a short phase reads as a spike).
            avg = (mark.energy_j - begin.energy_j) / max(mark.t - begin.t, 1e-9)
            p.peak_w = max(p.peak_w, mark.peak_w, avg if mark.t - begin.t >= PEAK_WINDOW_S else 0.0)
            self._current = None
        return mark

    def _close(self) -> None:
        if self._end is None:
            if self._start is None:
                raise RuntimeError("EnergyMonitor used outside its `with` block")
            self._end = self._end_phase()

    def report(self, tokens: int, prompt_tokens: int | None = None) -> EnergyReport:
        """End the monitored span (if not yet ended) and summarise it; `tokens` = generated tokens."""
        self._close()
        start, end = self._start, self._end
        seconds, joules = end.t - start.t, end.energy_j - start.energy_j
        if WAIT in self._phases:  # a generation waiting for its turn while others ran (Engine): not its energy
            seconds, joules = seconds - self._phases[WAIT].seconds, joules - self._phases[WAIT].energy_j
        for p in self._phases.values():
            p.tokens = {"prefill": prompt_tokens, "decode": tokens}.get(p.name)
            p.idle_subtracted_j = above_idle(p.energy_j, p.seconds, self.idle_w)
        s = self.sampler
        return EnergyReport(
            source=" -> ".join(s.sources) or s.meter.name, estimated=s.estimated, seconds=seconds, energy_j=joules,
            peak_w=max([self._peak, *(p.peak_w for p in self._phases.values())]), tokens=tokens,
            idle_w=self.idle_w, idle_subtracted_j=above_idle(joules, seconds, self.idle_w),
            phases=dict(self._phases), warnings=list(s.warnings), meter=s.meters[0].describe(), complete=not s.failed,
            degraded=list(s.degraded), failovers=list(s.failovers), retries=s.retries, peak_basis=s.peak_basis)
