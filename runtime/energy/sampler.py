"""A background sampler that turns meter readings into integrated energy, and survives sensors that fail.

Power meters are integrated with the trapezoid rule on `time.monotonic()`; energy meters (RAPL, NVML's counter, the
estimate) are used as counters. Meters that are counters need no thread: `mark()` reads them on demand at phase
boundaries. Failures, in order of what is done about them:
- a transient read error (an I2C transfer that failed with EIO, a torn value) is retried on the next sample, up to
  MAX_RETRIES in a row and MAX_GAP_S without a good reading; the gap is bridged by the trapezoid between the good
  readings on either side, and counted in `retries`;
- a lasting error (the sensor vanished, the retries ran out) drops the meter: the next one in the chain takes over
  (the estimate is last), the gap bridged with the last known power, and `failovers` records when and why;
- a reading that is usable but incomplete (`Reading.degraded`: a known total rail unreadable) and a counter that
  has not advanced for STUCK_S while the device is busy are recorded in `degraded`: never silent.

Peak power: the maximum sample for power meters (over the sensor's own averaging window: NVML power is a 1-s
average); for counters, the energy between counter steps at least PEAK_WINDOW_S apart, since a counter that steps
every ~100 ms read over 0.1 s windows gives peaks of nearly twice the real power.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Meter, Reading, SensorError

log = logging.getLogger("mjsd.energy")
PEAK_WINDOW_S = 0.5
MAX_RETRIES = 5
MAX_GAP_S = 1.0
STUCK_S = 2.0


def trapezoid(w0: float, w1: float, dt: float) -> float:
    return 0.5 * (w0 + w1) * dt


@dataclass(frozen=True)
class Mark:
    """The integrated energy at time t, and the peak power since the previous mark."""

    t: float
    energy_j: float
    peak_w: float


class Sampler:
    def __init__(self, meters: Meter | list[Meter], hz: float = 50.0, busy: bool = False):
        """`busy`: the device is working between start and stop (a generation), so a counter must advance."""
        self.meters = [meters] if isinstance(meters, Meter) else list(meters)
        if not self.meters:
            raise SensorError("no meter to sample")
        if not 10 <= hz <= 100:
            raise ConfigError(f"sampling rate {hz} Hz is out of range; use 10-100 Hz")
        self.period = 1.0 / hz
        self.busy = busy
        self.warnings: list[str] = []
        self.degraded: list[str] = []  # why the energy is not the full measurement it claims to be, each reason once
        self.failovers: list[dict] = []  # {"t_s": seconds after start, "from", "to", "error"}
        self.retries = 0  # transient read errors bridged
        self.sources: list[str] = []  # every meter that contributed, in order
        self.samples = 0
        self.energy_j = 0.0
        self.rail_energy_j: dict[str, float] = {}
        self.failed = False  # every meter failed: energy stops growing, the run goes on
        self._i = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._began = time.monotonic()
        self._last: Reading | None = None  # last reading of the active meter
        self._t = None  # time of the last good reading, any meter
        self._w = 0.0  # last known power
        self._peak = 0.0
        self._fails, self._fail_since = 0, None  # the current streak of transient errors
        self._step: tuple[float, float] | None = None  # (t, energy) at the counter step that opened the peak window
        self._moved = 0.0  # when the counter last advanced

    @property
    def meter(self) -> Meter:
        return self.meters[min(self._i, len(self.meters) - 1)]

    @property
    def last(self) -> Reading | None:
        """The active meter's latest reading (rails included), for live display."""
        return self._last

    @property
    def estimated(self) -> bool:
        return any(m.estimated for m in self.meters if m.name in self.sources)

    @property
    def peak_basis(self) -> str:
        """What `peak_w` is a peak of, for reports: averaged sources label their peak as such."""
        m = self.meter
        if m.kind == "energy":
            return f"energy between counter steps >= {PEAK_WINDOW_S:g} s apart"
        if m.averaging_s >= PEAK_WINDOW_S:
            return f"{m.averaging_s:g}-s average (the sensor averages), sampled at {1 / self.period:g} Hz"
        return f"instantaneous samples at {1 / self.period:g} Hz"

    def start(self) -> Mark:
        mark = self.mark()
        self._ensure_thread()
        return mark

    def stop(self) -> Mark:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.mark()

    def mark(self) -> Mark:
        """Sample now and return the energy so far and the peak power since the last mark."""
        with self._lock:
            self._sample()
            mark = Mark(self._t or 0.0, self.energy_j, self._peak)
            self._peak = 0.0
            return mark

    def peek(self) -> tuple[float, float]:
        """Sample now and return (t, energy so far) without touching the peak: for per-round energy."""
        with self._lock:
            self._sample()
            return self._t or 0.0, self.energy_j

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stop.is_set() and not self.failed and self.meter.needs_thread:
            self._thread = threading.Thread(target=self._run, name="mjsd-power-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                self._sample()

    def _sample(self) -> None:
        while not self.failed:
            meter = self.meter
            try:
                reading = meter.read()
            except (SensorError, OSError, ValueError, TypeError) as e:
                if self._retry(meter, e):
                    return
                self._fail_over(meter, e)
                continue
            self._fails, self._fail_since = 0, None
            self._integrate(meter, reading)
            return

    def _retry(self, meter: Meter, error: Exception) -> bool:
        """True when the error is transient and the streak is still short enough to bridge."""
        if not getattr(error, "transient", False):
            return False
        now = time.monotonic()
        self._fails += 1
        self._fail_since = self._fail_since or now
        if self._fails > MAX_RETRIES or now - self._fail_since > MAX_GAP_S:
            return False
        if not self.retries:
            self._warn(f"power meter {meter.name}: transient read error ({error}); retrying, the gap is bridged")
        self.retries += 1
        return True

    def _fail_over(self, meter: Meter, error: Exception) -> None:
        self._i += 1
        self._last = None
        self._fails, self._fail_since = 0, None
        t = time.monotonic() - self._began
        if self._i >= len(self.meters):
            self.failed = True
            self.failovers.append({"t_s": round(t, 3), "from": meter.name, "to": None, "error": str(error)})
            self._warn(f"power meter {meter.name} failed at t={t:.2f} s ({error}); no meter left, energy stops "
                       "counting here")
        else:
            self.failovers.append({"t_s": round(t, 3), "from": meter.name, "to": self.meter.name, "error": str(error)})
            self._warn(f"power meter {meter.name} failed at t={t:.2f} s ({error}); continuing with {self.meter.name}")
            self._ensure_thread()

    def _warn(self, msg: str) -> None:
        log.warning(msg)
        self.warnings.append(msg)

    def _degrade(self, why: str) -> None:
        if why not in self.degraded:
            self.degraded.append(why)
            self._warn(f"degraded reading: {why}")

    def _integrate(self, meter: Meter, r: Reading) -> None:
        if meter.name not in self.sources:
            self.sources.append(meter.name)
        if r.degraded:
            self._degrade(r.degraded)
        prev = self._last
        if prev is None:  # first reading of this meter: bridge the gap since the previous meter with its last power
            if self._t is not None:
                w_bridge = self._w if r.watts is None else 0.5 * (self._w + r.watts)
                self.energy_j += w_bridge * max(0.0, r.t - self._t)
        elif r.watts is not None:
            dt = r.t - prev.t
            self.energy_j += trapezoid(prev.watts, r.watts, dt)
            for name, w in r.rails.items():
                if name in prev.rails:
                    self.rail_energy_j[name] = self.rail_energy_j.get(name, 0.0) + trapezoid(prev.rails[name], w, dt)
        else:
            self.energy_j += r.energy_j - prev.energy_j
        self._last, self._t = r, r.t
        self.samples += 1
        if r.watts is not None:
            self._w = r.watts
            self._peak = max(self._peak, r.watts)
        else:
            self._counter_step(meter, r, prev)

    def _counter_step(self, meter: Meter, r: Reading, prev: Reading | None) -> None:
        """Peak windows that open and close on counter steps; the stuck-counter check."""
        if prev is None:
            self._step, self._moved = None, r.t
        elif r.energy_j != prev.energy_j:
            self._moved = r.t
            if self._step is None:
                self._step = (r.t, self.energy_j)
            elif r.t - self._step[0] >= PEAK_WINDOW_S:
                self._w = (self.energy_j - self._step[1]) / (r.t - self._step[0])
                self._peak = max(self._peak, self._w)
                self._step = (r.t, self.energy_j)
        elif self.busy and not meter.estimated and r.t - self._moved >= STUCK_S:
            self._degrade(f"the {meter.name} counter has not advanced for {r.t - self._moved:.1f} s while busy: "
                          "the zone is probably not implemented, its energy is not a measurement")
