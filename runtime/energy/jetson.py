"""Jetson power from the on-module INA3221 monitors (sysfs; no root needed).

Two driver layouts exist:
- JetPack 5/6 (mainline hwmon driver): `bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmon*/in{N}_label`,
  `in{N}_input` (bus voltage, mV), `curr{N}_input` (mA); power = V * I. Channel 7 ("sum of shunt voltages") and
  unconnected channels ("NC") are not rails.
- JetPack 4 (L4T iio driver): `bus/i2c/drivers/ina3221x/<bus-addr>/iio:device*/rail_name_{N}`,
  `in_power{N}_input` (mW).

The module total is VDD_IN (POM_5V_IN on the Nano) when that rail exists, since the others are branches of it;
boards without such a rail (AGX Orin: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, ...) report the sum of their rails.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .base import Meter, Reading, SensorError, check_watts, read_number, sysfs_root

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
_NOT_RAILS = {"NC", "SUM OF SHUNT VOLTAGES"}


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: its label and the files that give its power."""

    name: str
    power_mw: Path | None = None  # JetPack 4: power directly
    volts_mv: Path | None = None  # JetPack 5+: voltage and current
    amps_ma: Path | None = None

    def watts(self) -> float:
        if self.power_mw is not None:
            return read_number(self.power_mw) / 1e3
        return read_number(self.volts_mv) * read_number(self.amps_ma) / 1e6


def _label(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _hwmon_rails(root: Path) -> list[Rail]:
    rails = []
    for label_file in sorted(root.glob("bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label")):
        n = label_file.name[2:-len("_label")]
        name = _label(label_file)
        curr = label_file.with_name(f"curr{n}_input")
        if not name or name.upper() in _NOT_RAILS or not curr.exists():
            continue
        rails.append(Rail(name, volts_mv=label_file.with_name(f"in{n}_input"), amps_ma=curr))
    return rails


def _iio_rails(root: Path) -> list[Rail]:
    rails = []
    for label_file in sorted(root.glob("bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_*")):
        n = label_file.name.rsplit("_", 1)[1]
        name = _label(label_file)
        power = label_file.with_name(f"in_power{n}_input")
        if not name or name.upper() in _NOT_RAILS or not power.exists():
            continue
        rails.append(Rail(name, power_mw=power))
    return rails


def find_rails(root: Path | None = None) -> list[Rail]:
    """Every INA3221 rail under the sysfs root, hwmon layout first (a kernel exposes one or the other)."""
    root = root or sysfs_root()
    return _hwmon_rails(root) or _iio_rails(root)


def total_watts(rails: dict[str, float]) -> float:
    """The module total: the input rail when present (the others are parts of it), else the sum of all rails."""
    for name in TOTAL_RAILS:
        if name in rails:
            return rails[name]
    return sum(rails.values())


def nvpmodel_query(timeout: float = 2.0) -> str | None:
    """`nvpmodel -q` output (the power mode in force), or None off Jetson. Record it with every measurement."""
    exe = shutil.which("nvpmodel")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout + out.stderr).strip() or None


def nvpmodel_mode(query_output: str | None) -> str | None:
    """The mode name from `nvpmodel -q` output ("NV Power Mode: 15W" -> "15W")."""
    m = re.search(r"NV Power Mode:\s*(\S+)", query_output or "")
    return m.group(1) if m else None


class JetsonMeter(Meter):
    """Instantaneous module power from the INA3221 rails; per-rail watts in `Reading.rails`."""

    kind = "power"

    def __init__(self, rails: list[Rail], only: list[str] | None = None):
        if only:
            missing = sorted(set(only) - {r.name for r in rails})
            if missing:
                raise SensorError(f"INA3221 rails {missing} not found; this board has {[r.name for r in rails]}")
            rails = [r for r in rails if r.name in only]
        if not rails:
            raise SensorError("no INA3221 rails found")
        self.rails = rails
        self.name = "jetson-ina3221"
        self.nvpmodel = nvpmodel_query()

    @classmethod
    def detect(cls, root: Path | None = None, only: list[str] | None = None) -> JetsonMeter:
        rails = find_rails(root)
        if not rails:
            raise SensorError(f"no INA3221 rails under {root or sysfs_root()}/bus/i2c/drivers/ina3221*/ (not a Jetson)")
        meter = cls(rails, only)
        meter.read()  # probe a real reading
        return meter

    def read(self) -> Reading:
        t = time.monotonic()
        rails = {r.name: check_watts(r.watts(), f"rail {r.name}") for r in self.rails}
        return Reading(t=t, watts=total_watts(rails), rails=rails)

    def describe(self) -> dict:
        total = next((n for n in TOTAL_RAILS if any(r.name == n for r in self.rails)), None)
        return {**super().describe(), "rails": [r.name for r in self.rails],
                "total": total or "sum of rails", "nvpmodel": self.nvpmodel}
