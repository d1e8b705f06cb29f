"""Energy awareness: power meters, energy accounting, a power-budget controller.

- Meters (`base.Meter`): `jetson` (INA3221 rails), `nvml` (NVIDIA GPUs), `rapl` (Intel/AMD package counters),
  `estimate` (CPU-time model, labelled estimated). `open_meters(meter="auto", profile=...)` returns the usable ones,
  best first; `detect()` also says why the others are not usable. MJSD_SYSFS_ROOT re-roots /sys.
- Accounting: `EnergyMonitor` (see `accounting` for the driver-facing usage), `measure_idle`.
- Control: `PowerController` picks (W, gamma) per round under a power budget.
"""
from .accounting import EnergyMonitor, EnergyReport, PhaseReport, measure_idle
from .base import Meter, Reading, SensorError, sysfs_root
from .controller import PowerController
from .detect import AUTO_ORDER, Detection, detect, open_meters
from .sampler import Sampler

__all__ = ["AUTO_ORDER", "Detection", "EnergyMonitor", "EnergyReport", "Meter", "PhaseReport", "PowerController",
           "Reading", "Sampler", "SensorError", "detect", "measure_idle", "open_meters", "sysfs_root"]
