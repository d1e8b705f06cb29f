"""The meter interface every power/energy backend implements, and the sysfs helpers they share.

A meter answers `read() -> Reading`: either an instantaneous power (watts, "power" meters: Jetson INA3221, NVML power
samples) or a cumulative energy counter (joules since the meter was opened, "energy" meters: RAPL, NVML's energy
counter, the CPU-time estimate). `read()` raises `SensorError` when the sensor is gone or returns garbage; the
sampler retries transient errors (an I2C read that failed with EIO, a torn value) for a bounded gap, then fails over to
the next meter with a warning, never a crash. A reading that is usable but incomplete (a known total rail missing)
carries `degraded`, and so does every report built from it.
"""
from __future__ import annotations

import errno
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MjsdError

SYSFS_ENV = "MJSD_SYSFS_ROOT"
# No edge device or workstation draws more; a larger value is a garbage reading (wrong units, torn read).
MAX_PLAUSIBLE_W = 5000.0


class SensorError(MjsdError):
    """A power sensor could not be read (missing, unreadable, or returning garbage).

    `transient`: worth retrying (an I/O error on the bus, a torn or implausible value); False when the sensor is gone
    (the file or device vanished) or refuses access, where retrying cannot help."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class ChannelDisabled(SensorError):
    """A hwmon channel that is switched off answers ENODATA (hwmon ABI; ina3221 since Linux 4.20, commit a9e9dd9c6de5):
    not a rail, and not an error of the sensor."""


# errno values of a bus transfer that failed once and may well succeed on the next try (I2C NACK, arbitration lost,
# timeout); ENOENT/ENODEV/ENXIO mean the device is gone.
_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.EREMOTEIO, errno.EBUSY, errno.EINTR}


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
        if e.errno == errno.ENODATA:
            raise ChannelDisabled(f"{path}: channel disabled (ENODATA)") from e
        raise SensorError(f"cannot read {path}: {e.strerror or e}", transient=e.errno in _TRANSIENT_ERRNOS) from e
    try:
        value = float(text)
    except ValueError:  # a torn read: the next one is usually whole
        raise SensorError(f"{path} holds {text[:40]!r}, not a number", transient=True) from None
    if not math.isfinite(value):
        raise SensorError(f"{path} holds {text[:40]!r}, not a finite number", transient=True)
    return value


def check_watts(watts: float, what: str) -> float:
    """Reject readings no real sensor produces, so garbage degrades the run instead of poisoning the energy."""
    if not math.isfinite(watts) or watts < 0 or watts > MAX_PLAUSIBLE_W:
        raise SensorError(f"{what} read an implausible {watts!r} W", transient=True)
    return watts


@dataclass(frozen=True)
class Reading:
    """One read of a meter at monotonic time `t`.

    Power meters fill `watts` (and `rails`: watts per module rail, `carrier`: rails of the carrier board, reported
    but not in the total); energy meters fill `energy_j` (cumulative since open). `degraded` says why `watts` is not
    the full measurement it claims to be (None when it is).
    """

    t: float
    watts: float | None = None
    energy_j: float | None = None
    rails: dict[str, float] = field(default_factory=dict)
    carrier: dict[str, float] = field(default_factory=dict)
    degraded: str | None = None


class Meter:
    """Base class of the backends. Subclasses set `name`, `kind` and `estimated`, and implement `read()`."""

    name: str = "meter"
    kind: str = "power"  # "power" (instantaneous watts) or "energy" (cumulative joules)
    estimated: bool = False
    # Energy counters can be read at phase boundaries only; power meters need a sampling thread.
    needs_thread: bool = True
    # Seconds over which the sensor itself averages power (NVML power on Ampere+: 1 s) or between counter steps: a
    # reading lags a change of load by about this much, and a peak is a peak over windows at least this long.
    averaging_s: float = 0.0
    degraded: str | None = None  # set at open when a known total rail is unreadable

    def read(self) -> Reading:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the meter measures, for `mjsd power` and reports."""
        d = {"name": self.name, "kind": self.kind, "estimated": self.estimated, "averaging_s": self.averaging_s}
        return {**d, "degraded": self.degraded} if self.degraded else d

    def close(self) -> None:
        """Release the sensor (NVML handle...). Reading after close is an error."""
