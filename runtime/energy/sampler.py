"""A background sampler that turns meter readings into integrated energy, and survives sensors that fail.

Power meters are integrated with the trapezoid rule on `time.monotonic()`; energy meters (RAPL, NVML's counter, the
estimate) are used as counters. A meter that raises, vanishes or returns garbage is dropped with a warning and the
next meter in the chain takes over (the estimate is last); the gap between the last good reading and the new meter's
first one is bridged with the last known power. Meters that are counters need no thread: `mark()` reads them on
demand at phase boundaries.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Meter, Reading, SensorError

log = logging.getLogger("mjsd.energy")
# Counters that update in steps (NVML's ~every 20-100 ms) give spiky dE/dt; peak power is taken over windows this long.
PEAK_WINDOW_S = 0.1


def trapezoid(w0: float, w1: float, dt: float) -> float:
    return 0.5 * (w0 + w1) * dt


@dataclass(frozen=True)
class Mark:
    """The integrated energy at time t, and the peak power since the previous mark."""

    t: float
    energy_j: float
    peak_w: float


class Sampler:
    def __init__(self, meters: Meter | list[Meter], hz: float = 50.0):
        self.meters = [meters] if isinstance(meters, Meter) else list(meters)
        if not self.meters:
            raise SensorError("no meter to sample")
        if not 10 <= hz <= 100:
            raise ConfigError(f"sampling rate {hz} Hz is out of range; use 10-100 Hz")
        self.period = 1.0 / hz
        self.warnings: list[str] = []
        self.sources: list[str] = []  # every meter that contributed, in order
        self.samples = 0
        self.energy_j = 0.0
        self.rail_energy_j: dict[str, float] = {}
        self.failed = False  # every meter failed: energy stops growing, the run goes on
        self._i = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: Reading | None = None  # last reading of the active meter
        self._t = None  # time of the last good reading, any meter
        self._w = 0.0  # last known power
        self._peak = 0.0
        self._anchor: tuple[float, float] | None = None  # (t, energy) where the current peak window began

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
                self._fail_over(meter, e)
                continue
            self._integrate(meter, reading)
            return

    def _fail_over(self, meter: Meter, error: Exception) -> None:
        self._i += 1
        self._last = None
        if self._i >= len(self.meters):
            self.failed = True
            msg = f"power meter {meter.name} failed ({error}); no meter left, energy stops counting here"
        else:
            msg = f"power meter {meter.name} failed ({error}); continuing with {self.meter.name}"
            self._ensure_thread()
        log.warning(msg)
        self.warnings.append(msg)

    def _integrate(self, meter: Meter, r: Reading) -> None:
        if meter.name not in self.sources:
            self.sources.append(meter.name)
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
        elif self._anchor is None or prev is None:
            self._anchor = (r.t, self.energy_j)
        elif r.t - self._anchor[0] >= PEAK_WINDOW_S:
            self._w = (self.energy_j - self._anchor[1]) / (r.t - self._anchor[0])
            self._peak = max(self._peak, self._w)
            self._anchor = (r.t, self.energy_j)
