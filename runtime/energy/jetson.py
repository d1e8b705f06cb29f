"""Jetson power from the INA3221 monitors (sysfs; no root needed).

Two driver layouts exist (the driver paths are symlinks into /sys/devices; globbing follows them):
- JetPack 5/6 (mainline hwmon driver): `bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon*/in{N}_label`,
  `in{N}_input` (bus voltage, mV), `curr{N}_input` (mA), `in{N}_enable`; power = V * I. Not rails: channel 7 ("sum of
  shunt voltages"), channels labelled "NC" (unconnected), channels without a label (the driver hides the label file
  when the device tree gives none), and disabled channels (`in{N}_enable` 0; their reads fail with ENODATA).
- JetPack 4 (L4T iio driver): `bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device*/rail_name_{N}`,
  `in_power{N}_input` (mW). The AGX Xavier has two chips (1-0040: GPU, CPU, SOC; 1-0041: CV, VDDRQ, SYS5V).

Which rails make up the module total is a per-board rule (profile `[power.total]`: chips and rails). Carrier boards
can carry INA3221s of their own (AGX Orin Industrial: CVB_ATX_12V/3V3/5V at 2-0041); their rails are reported in
`Reading.carrier`, never added to the module. Without a board rule only the module's own bus counts: the bus of the
chip with the input rail (VDD_IN, POM_5V_IN), else the lowest-numbered bus with an INA3221 (the module monitors sit on
bus 0, 1, 6 or 7 on every Jetson module; a carrier's on another). The total is the input rail when the board has one
(the other rails are its branches), else the sum of the module rails. A known total rail that cannot be read is never
silently replaced: the meter's readings carry `degraded` and the total is the lower bound of what remains.

Not supported: Jetson Thor's INA238 (mainline hwmon driver ina238: `power1_input` in uW). On Thor it measures VIN,
the module and carrier together (NVIDIA forum, "power monitor with additional load on Jetson Thor"), so it is not a
module total either; without a recorded Thor tree its bus, address and labels are unknown here. Its presence is
noted in `describe()["notes"]`, and `mjsd power --record` captures it for a fixture.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .base import ChannelDisabled, Meter, Reading, SensorError, check_watts, read_number, sysfs_root

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
# Branch rails that show a board has an input rail (Orin Nano/NX, Xavier NX: VDD_IN; Nano: POM_5V_IN), so a missing
# input rail is an unreadable one, not an absent one.
BRANCHES = {"VDD_IN": ("VDD_CPU_GPU_CV", "VDD_SOC"), "POM_5V_IN": ("POM_5V_GPU", "POM_5V_CPU")}
_NOT_RAILS = {"NC", "SUM OF SHUNT VOLTAGES"}
_CHIP = re.compile(r"(\d+)-([0-9a-fA-F]{4})$")


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: its label, its chip ("<bus>-<addr>", e.g. "1-0040") and the files that give its power."""

    name: str
    chip: str
    power_mw: Path | None = None  # JetPack 4: power directly
    volts_mv: Path | None = None  # JetPack 5+: voltage and current
    amps_ma: Path | None = None

    @property
    def bus(self) -> int:
        return int(self.chip.split("-")[0])

    def watts(self) -> float:
        if self.power_mw is not None:
            return read_number(self.power_mw) / 1e3
        return read_number(self.volts_mv) * read_number(self.amps_ma) / 1e6


def _label(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _chip_of(path: Path, root: Path) -> str:
    """The "<bus>-<addr>" directory under the driver, as the glob found it (not the symlink's target)."""
    for part in path.relative_to(root).parts:
        if _CHIP.fullmatch(part):
            return part
    return "?"


def _hwmon_channels(root: Path) -> list[Rail]:
    rails = []
    for label_file in sorted(root.glob("bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label")):
        n = label_file.name[2:-len("_label")]
        name = _label(label_file)
        enable = label_file.with_name(f"in{n}_enable")
        if not name or name.upper() in _NOT_RAILS or (enable.exists() and _label(enable) == "0"):
            continue
        rails.append(Rail(name, _chip_of(label_file, root), volts_mv=label_file.with_name(f"in{n}_input"),
                          amps_ma=label_file.with_name(f"curr{n}_input")))
    return rails


def update_interval_s(rails: list[Rail]) -> float:
    """The longest hwmon `update_interval` (ms; the ina3221 driver's conversion time x samples averaged x enabled
    channels) of the rails' chips: a reading lags the load by about this much. 0 where not exposed (iio layout)."""
    seconds = []
    for d in {r.volts_mv.parent for r in rails if r.volts_mv is not None}:
        try:
            seconds.append(read_number(d / "update_interval") / 1e3)
        except SensorError:
            continue
    return max(seconds, default=0.0)


def _iio_channels(root: Path) -> list[Rail]:
    rails = []
    for label_file in sorted(root.glob("bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_*")):
        n = label_file.name.rsplit("_", 1)[1]
        name = _label(label_file)
        if not name or name.upper() in _NOT_RAILS:
            continue
        rails.append(Rail(name, _chip_of(label_file, root), power_mw=label_file.with_name(f"in_power{n}_input")))
    return rails


def find_channels(root: Path | None = None) -> list[Rail]:
    """Every labelled, enabled INA3221 channel under the sysfs root, hwmon layout first (a kernel has one or the
    other), sorted by (bus, address). Whether each can be read is `probe`'s business."""
    root = root or sysfs_root()
    rails = _hwmon_channels(root) or _iio_channels(root)
    return sorted(rails, key=lambda r: (r.bus, r.chip))


def probe(channels: list[Rail]) -> tuple[list[Rail], dict[str, str]]:
    """(readable rails, {name: error} of the labelled channels that cannot be read). Disabled channels are neither."""
    ok, bad = [], {}
    for r in channels:
        try:
            check_watts(r.watts(), f"rail {r.name}")
            ok.append(r)
        except ChannelDisabled:
            continue
        except SensorError as e:
            bad[r.name] = str(e)
    return ok, bad


def unsupported_monitors(root: Path | None = None) -> list[str]:
    """Notes on power monitors present but not read (Jetson Thor's INA238)."""
    root = root or sysfs_root()
    chips = sorted(p.name for p in root.glob("bus/i2c/drivers/ina238/*") if _CHIP.fullmatch(p.name))
    return [f"INA238 at {c} not read: Jetson Thor's board input (module + carrier) is not supported yet; "
            "`mjsd power --record FILE` captures it for a fixture" for c in chips]


def find_rails(root: Path | None = None) -> list[Rail]:
    """The readable rails (module and carrier) under the sysfs root."""
    return probe(find_channels(root))[0]


@dataclass(frozen=True)
class TotalRule:
    """Which chips are the module's and which of their rails sum to the module total (empty: see module doc)."""

    chips: tuple[str, ...] = ()
    rails: tuple[str, ...] = ()
    source: str = "default"  # "profile <name>" or "default"


def split(rails: list[Rail], rule: TotalRule) -> tuple[list[Rail], list[Rail], str]:
    """(module rails, carrier rails, a sentence saying which rule chose them), for `rails` sorted by (bus, chip)."""
    if rule.chips:
        module = [r for r in rails if r.chip in rule.chips]
        how = f"{rule.source}: module chips {', '.join(rule.chips)}"
    else:
        inputs = [r for r in rails if r.name in TOTAL_RAILS]
        buses = [r.bus for r in inputs] or [r.bus for r in rails]
        bus = buses[0] if buses else None
        module = [r for r in rails if r.bus == bus]
        how = f"default (no board rule): the module's own bus {bus}"
    carrier = [r for r in rails if r not in module]
    if carrier:
        how += f"; carrier rails {[r.name for r in carrier]} reported separately, not in the total"
    return module, carrier, how


def total_rails(module: list[Rail], rule: TotalRule, unreadable: dict[str, str]) -> tuple[list[str], str, str | None]:
    """(rails summed into the total, its description, why it is degraded or None)."""
    names = [r.name for r in module]
    if rule.rails:
        wanted = list(rule.rails)
    else:
        wanted = [n for n in TOTAL_RAILS if n in names or n in unreadable
                  or any(b in names for b in BRANCHES[n])][:1] or names
    present = [n for n in wanted if n in names]
    missing = [n for n in wanted if n not in names]
    if not missing:
        return present, "+".join(present) if len(present) > 1 else present[0], None
    used = present or names
    why = "; ".join(f"{n}: {unreadable[n]}" if n in unreadable else f"{n}: not found" for n in missing)
    return used, "+".join(used), (f"total rail(s) {missing} unreadable ({why}); the total is {'+'.join(used)}, a lower "
                                  "bound of the module's power, not a measurement of it")


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
    """Module power from the INA3221 rails (per the board's total rule); module and carrier rails in the reading."""

    kind = "power"

    def __init__(self, rails: list[Rail], rule: TotalRule = TotalRule(), unreadable: dict[str, str] | None = None):
        unreadable = unreadable or {}
        if rule.rails and not set(rule.rails) & ({r.name for r in rails} | set(unreadable)):
            raise SensorError(f"INA3221 rails {list(rule.rails)} of the total rule ({rule.source}) not found; this "
                              f"board has {[r.name for r in rails]}: choose the profile of this board")
        self.module, self.carrier, self.rule = split(rails, rule)
        if not self.module:
            raise SensorError(f"no INA3221 rails of the module found ({self.rule})")
        self.total, self.total_name, self.degraded = total_rails(self.module, rule, unreadable)
        self.averaging_s = update_interval_s(self.module)
        self.rails = self.module + self.carrier
        self.name = "jetson-ina3221"
        self.nvpmodel = nvpmodel_query()
        self.notes: list[str] = []

    @classmethod
    def detect(cls, root: Path | None = None, rule: TotalRule = TotalRule()) -> JetsonMeter:
        channels, notes = find_channels(root), unsupported_monitors(root)
        if not channels:
            raise SensorError(f"no INA3221 rails under {root or sysfs_root()}/bus/i2c/drivers/ina3221*/ "
                              + (f"({'; '.join(notes)})" if notes else "(not a Jetson)"))
        rails, unreadable = probe(channels)
        meter = cls(rails, rule, unreadable)
        meter.notes = notes
        return meter

    def read(self) -> Reading:
        t = time.monotonic()
        watts = {r.name: check_watts(r.watts(), f"rail {r.name}") for r in self.rails}
        module = {r.name: watts[r.name] for r in self.module}
        return Reading(t=t, watts=sum(module[n] for n in self.total), rails=module,
                       carrier={r.name: watts[r.name] for r in self.carrier}, degraded=self.degraded)

    def describe(self) -> dict:
        return {**super().describe(), "rails": [r.name for r in self.module], "carrier": [r.name for r in self.carrier],
                "chips": sorted({r.chip for r in self.module}), "total": self.total_name, "rule": self.rule,
                "nvpmodel": self.nvpmodel, **({"notes": self.notes} if self.notes else {})}
