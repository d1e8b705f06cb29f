"""The meter interface every power/energy backend implements, and the sysfs helpers they share.

A meter answers `read() -> Reading`: either an instantaneous power (watts, "power" meters: Jetson INA3221, NVML power
samples) or a cumulative energy counter (joules since the meter was opened, "energy" meters: RAPL, NVML's energy
counter, the CPU-time estimate). `read()` raises `SensorError` when the sensor is gone or returns garbage; the
sampler turns that into a warning and a fallback, never a crash.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MjsdError

SYSFS_ENV = "MJSD_SYSFS_ROOT"
# No edge device or workstation draws more; a larger value is a garbage reading (wrong units, torn read).
MAX_PLAUSIBLE_W = 5000.0


class SensorError(MjsdError):
    """A power sensor could not be read (missing, unreadable, or returning garbage)."""


def sysfs_root() -> Path:
    """The directory that stands for /sys. MJSD_SYSFS_ROOT points the meters at a captured or fake tree."""
    return Path(os.environ.get(SYSFS_ENV) or "/sys")


def read_number(path: Path) -> float:
    """One numeric sysfs attribute. Raises SensorError naming the file when it is gone, unreadable or not a number."""
    try:
        text = path.read_text().strip()
    except PermissionError as e:
        raise SensorError(f"{path} is not readable by this user ({e.strerror}); run as root or grant read access") from e
    except OSError as e:
        raise SensorError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        value = float(text)
    except ValueError:
        raise SensorError(f"{path} holds {text[:40]!r}, not a number") from None
    if not math.isfinite(value):
        raise SensorError(f"{path} holds {text[:40]!r}, not a finite number")
    return value


def check_watts(watts: float, what: str) -> float:
    """Reject readings no real sensor produces, so garbage degrades the run instead of poisoning the energy."""
    if not math.isfinite(watts) or watts < 0 or watts > MAX_PLAUSIBLE_W:
        raise SensorError(f"{what} read an implausible {watts!r} W")
    return watts


@dataclass(frozen=True)
class Reading:
    """One read of a meter at monotonic time `t`.

    Power meters fill `watts` (and `rails`: watts per rail); energy meters fill `energy_j` (cumulative since open).
    """

    t: float
    watts: float | None = None
    energy_j: float | None = None
    rails: dict[str, float] = field(default_factory=dict)


class Meter:
    """Base class of the backends. Subclasses set `name`, `kind` and `estimated`, and implement `read()`."""

    name: str = "meter"
    kind: str = "power"  # "power" (instantaneous watts) or "energy" (cumulative joules)
    estimated: bool = False
    # Energy counters can be read at phase boundaries only; power meters need a sampling thread.
    needs_thread: bool = True

    def read(self) -> Reading:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the meter measures, for `mjsd power` and reports."""
        return {"name": self.name, "kind": self.kind, "estimated": self.estimated}

    def close(self) -> None:
        """Release the sensor (NVML handle...). Reading after close is an error."""
