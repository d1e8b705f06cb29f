"""Choosing meters: try the backends in order and keep the ones that give a real reading.

Order: the CLI's `--meter` when given, else the profile's `power.meters`, else AUTO_ORDER. Jetson comes before NVML
because NVML initialises on Jetson but cannot read power there; RAPL comes after NVML because on a GPU box the GPU
dominates. The estimate is always last: it is the fallback when every sensor fails mid-run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..profiles import Profile, load_profile
from .base import Meter, SensorError
from .estimate import EstimateMeter
from .jetson import JetsonMeter, TotalRule
from .nvml import NvmlMeter
from .rapl import RaplMeter

AUTO_ORDER = ("jetson", "nvml", "rapl", "estimate")
DEFAULT_PROFILE = "generic-cpu"  # gives the estimate its idle/active watts when no profile is chosen


@dataclass
class Detection:
    """The outcome of trying one backend: the meter, or why it is not usable here."""

    backend: str
    meter: Meter | None
    detail: str

    def to_dict(self) -> dict:
        return {"backend": self.backend, "available": self.meter is not None,
                "detail": self.detail if self.meter is None else self.meter.describe()}


def _open(backend: str, profile: Profile, root: Path | None, nvml) -> Meter:
    if backend == "jetson":
        rule = TotalRule(profile.total_chips, profile.total_rails, f"profile {profile.name}")
        return JetsonMeter.detect(root, rule if rule.chips or rule.rails else TotalRule())
    if backend == "nvml":
        return NvmlMeter.detect(nvml)
    if backend == "rapl":
        return RaplMeter.detect(root)
    if backend == "estimate":
        return EstimateMeter(profile.idle_w, profile.active_w)
    raise SensorError(f"unknown meter {backend!r}; choose one of {', '.join(AUTO_ORDER)} or auto")


def detect(meter: str = "auto", profile: Profile | None = None, root: Path | None = None,
           nvml=None) -> list[Detection]:
    """Try every backend in order (see module doc); the estimate is always tried last."""
    if meter != "auto":
        order = [meter]
    elif profile is not None and profile.meters:
        order = list(profile.meters)
    else:
        order = list(AUTO_ORDER)
    profile = profile or load_profile(DEFAULT_PROFILE)
    if "estimate" not in order:
        order.append("estimate")
    found = []
    for backend in order:
        try:
            found.append(Detection(backend, _open(backend, profile, root, nvml), "ok"))
        except SensorError as e:
            found.append(Detection(backend, None, str(e)))
    return found


def usable(found: list[Detection], meter: str = "auto") -> list[Meter]:
    """The meters that work, best first (the estimate last). An explicitly chosen meter that fails is an error."""
    meters = [d.meter for d in found if d.meter is not None]
    if meter not in ("auto", "estimate") and found[0].meter is None:
        for m in meters:
            m.close()
        raise SensorError(f"meter {meter!r} is not usable here: {found[0].detail}")
    return meters


def open_meters(meter: str = "auto", profile: Profile | None = None, root: Path | None = None,
                nvml=None) -> list[Meter]:
    """The usable meters, best first (the estimate last). An explicitly chosen meter that fails is an error."""
    return usable(detect(meter, profile, root, nvml), meter)
