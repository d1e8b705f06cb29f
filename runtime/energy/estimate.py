"""Estimated energy where no sensor exists: a linear model of this process's CPU use.

    energy = idle_w * wall_seconds + (active_w - idle_w) * cpu_seconds / cores

`active_w` is the device's power with all `cores` busy, `idle_w` its power doing nothing (both from the profile).
CPU time comes from `time.process_time()`, which counts every thread of the process (ONNX Runtime's pool too). It is a
counter, so it needs no sampling thread: reading it at phase boundaries is exact for the model. Every figure it
produces is an estimate and is labelled so.
"""
from __future__ import annotations

import os
import time

from ..errors import ConfigError
from .base import Meter, Reading


def estimated_joules(wall_s: float, cpu_s: float, idle_w: float, active_w: float, cores: int) -> float:
    """The model above; CPU time is capped at all cores busy for the whole interval."""
    busy = min(cpu_s / cores, wall_s) if wall_s > 0 else 0.0
    return idle_w * wall_s + (active_w - idle_w) * busy


class EstimateMeter(Meter):
    kind = "energy"
    estimated = True
    needs_thread = False
    name = "estimated"

    def __init__(self, idle_w: float, active_w: float, cores: int | None = None,
                 clock=time.monotonic, cpu_clock=time.process_time):
        if not 0 <= idle_w <= active_w:
            raise ConfigError(f"estimate needs 0 <= idle_w <= active_w, got idle_w={idle_w}, active_w={active_w}; "
                              "fix the profile's [power] idle_w/active_w")
        self.idle_w, self.active_w = idle_w, active_w
        self.cores = cores or os.cpu_count() or 1
        self._clock, self._cpu_clock = clock, cpu_clock
        self._t0, self._cpu0 = clock(), cpu_clock()

    def read(self) -> Reading:
        t = self._clock()
        joules = estimated_joules(t - self._t0, self._cpu_clock() - self._cpu0, self.idle_w, self.active_w, self.cores)
        return Reading(t=t, energy_j=joules)

    def describe(self) -> dict:
        return {**super().describe(), "idle_w": self.idle_w, "active_w": self.active_w, "cores": self.cores,
                "model": "idle_w*wall + (active_w-idle_w)*process_cpu/cores"}
