"""Intel RAPL energy counters through the powercap sysfs (`class/powercap/intel-rapl:N/energy_uj`).

The counters are cumulative microjoules that wrap at `max_energy_range_uj`; this meter unwraps them into joules
since it was opened. Since Linux 5.10 `energy_uj` is readable by root only (CVE-2020-8694, PLATYPUS).
Top-level zones only: subzones (`intel-rapl:0:0` core, uncore, dram) are parts of their package. The package zones
are used, unless a `psys` zone (the whole platform) is present and its counter advances: many platforms expose psys
without implementing it, and a counter that never moves is not a 0 J measurement. The MMIO interface
(`intel-rapl-mmio:N`) exposes the same package domain again; it is used only where the MSR zones are absent.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from .base import MAX_PLAUSIBLE_W, Meter, Reading, SensorError, read_number, sysfs_root

_TOP_ZONE = re.compile(r"intel-rapl(-mmio)?:\d+$")
PSYS_PROBE_S = 0.05  # RAPL counters update about every millisecond: a live psys moves within this
UNREADABLE_HINT = ("RAPL energy counters are readable by root only since Linux 5.10: run as root, or grant read access "
                   "with `sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj` (resets at reboot)")


@dataclass
class Zone:
    name: str
    energy_file: Path
    max_range_uj: float
    last_uj: float | None = None


def unwrap_delta(last_uj: float, now_uj: float, max_range_uj: float) -> float:
    """Microjoules consumed between two counter reads; a smaller second read means the counter wrapped once."""
    delta = now_uj - last_uj
    return delta + max_range_uj if delta < 0 else delta


def find_zones(root: Path | None = None, notes: list[str] | None = None) -> list[Zone]:
    """The zones to sum (see module doc); `notes` collects why psys or the MMIO zones were passed over."""
    root = root or sysfs_root()
    notes = [] if notes is None else notes
    zones = {"msr": [], "mmio": []}
    for d in sorted(root.glob("class/powercap/intel-rapl*:*")):
        if not _TOP_ZONE.fullmatch(d.name):
            continue
        name = (d / "name").read_text().strip() if (d / "name").exists() else d.name
        zones["mmio" if "mmio" in d.name else "msr"].append(
            Zone(name, d / "energy_uj", read_number(d / "max_energy_range_uj")))
    if zones["msr"] and zones["mmio"]:
        notes.append("intel-rapl-mmio zones skipped: they count the MSR package zones again")
    found = zones["msr"] or zones["mmio"]
    psys = [z for z in found if z.name == "psys"]
    packages = [z for z in found if z.name != "psys"]
    if psys and packages:
        if _advances(psys[0]):
            return psys
        notes.append("psys zone skipped: its counter does not advance (not implemented on this platform)")
    return packages or psys


def _advances(zone: Zone) -> bool:
    try:
        before = read_number(zone.energy_file)
        time.sleep(PSYS_PROBE_S)
        return read_number(zone.energy_file) != before
    except SensorError:
        return False


class RaplMeter(Meter):
    """Package (or platform) energy in joules since open, summed over the top-level RAPL zones."""

    kind = "energy"
    needs_thread = False

    def __init__(self, zones: list[Zone], notes: list[str] | None = None):
        if not zones:
            raise SensorError("no RAPL zones")
        self.zones = zones
        self.notes = notes or []
        self.name = "rapl:" + "+".join(z.name for z in zones)
        self._joules = 0.0
        self._t: float | None = None

    @classmethod
    def detect(cls, root: Path | None = None) -> RaplMeter:
        root = root or sysfs_root()
        notes: list[str] = []
        zones = find_zones(root, notes)
        if not zones:
            raise SensorError(f"no RAPL zones under {root}/class/powercap/ (not Intel/AMD, or powercap not loaded)")
        meter = cls(zones, notes)
        try:
            meter.read()  # probe: the files exist for everyone but are often root-only
        except SensorError as e:
            if "not readable" in str(e):
                raise SensorError(f"{e}. {UNREADABLE_HINT}") from None
            raise
        return meter

    def read(self) -> Reading:
        t = time.monotonic()
        delta_j = 0.0
        for z in self.zones:
            now = read_number(z.energy_file)
            if now < 0 or now > z.max_range_uj:
                raise SensorError(f"{z.energy_file} read {now:.0f} uJ, outside 0..{z.max_range_uj:.0f}")
            if z.last_uj is not None:
                delta_j += unwrap_delta(z.last_uj, now, z.max_range_uj) / 1e6
            z.last_uj = now
        if self._t is not None and t - self._t > 1e-3 and delta_j / (t - self._t) > MAX_PLAUSIBLE_W:
            raise SensorError(f"{self.name} counter jumped by {delta_j:.1f} J in {t - self._t:.3f} s")
        self._t = t
        self._joules += delta_j
        return Reading(t=t, energy_j=self._joules)

    def describe(self) -> dict:
        return {**super().describe(), "zones": [z.name for z in self.zones], "notes": self.notes}
