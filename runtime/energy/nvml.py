"""NVIDIA GPU power through NVML (`pynvml`, from the optional nvidia-ml-py package).

Support is decided by probing a real reading, never by `nvmlInit` succeeding: on Jetson NVML initialises and then
answers NOT_SUPPORTED for power. Preferred is the energy counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ since
the driver loaded, Volta and newer; it steps about every 100 ms, measured on an H200); else power samples
(`nvmlDeviceGetPowerUsage`, mW: "On Ampere (except GA100) or newer GPUs, the API returns power averaged over 1 sec
interval", NVML reference). All GPUs that support the chosen reading are summed. `averaging_s` says how far a
reading lags the load, for the peak's label and the controller's settling time.
"""
from __future__ import annotations

import importlib
import time

NVML_DEVICE_ARCH_AMPERE = 7  # nvmlDeviceArchitecture_t
COUNTER_STEP_S = 0.1
from .base import Meter, Reading, SensorError, check_watts


def import_pynvml():
    """The pynvml module (tests put a stand-in into sys.modules["pynvml"])."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise SensorError("pynvml is not installed (pip install 'mjsd[gpu]' or nvidia-ml-py)") from None


def _probe(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:  # NVMLError_NotSupported and friends; any failure means "cannot use this reading"
        return False


class NvmlMeter(Meter):
    """GPU energy (counter) or power (samples) summed over the GPUs that support it."""

    def __init__(self, nvml, handles: list, names: list[str], use_energy: bool):
        self.nvml = nvml
        self.handles = handles
        self.gpus = names
        self.kind = "energy" if use_energy else "power"
        self.needs_thread = not use_energy
        self.name = "nvml-" + ("energy" if use_energy else "power")
        self.averaging_s = COUNTER_STEP_S if use_energy else max(_averaging_s(nvml, h, n) for h, n in zip(handles, names))
        self._start_mj: list[float] | None = None

    @classmethod
    def detect(cls, nvml=None) -> NvmlMeter:
        nvml = nvml or import_pynvml()
        try:
            nvml.nvmlInit()
        except Exception as e:
            raise SensorError(f"NVML did not initialise ({e}): no NVIDIA driver") from None
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            energy = [h for h in handles if _probe(nvml.nvmlDeviceGetTotalEnergyConsumption, h)]
            power = [h for h in handles if _probe(nvml.nvmlDeviceGetPowerUsage, h)]
            # The counter only when every power-capable GPU has it, so no GPU is silently left out of the sum.
            use_energy = bool(energy) and len(energy) >= len(power)
            chosen = energy if use_energy else power
            if not chosen:
                raise SensorError(f"NVML found {len(handles)} GPU(s) but none reports power or energy "
                                  "(NOT_SUPPORTED; on Jetson use the INA3221 meter)")
            names = [_name(nvml, h) for h in chosen]
        except Exception:
            nvml.nvmlShutdown()
            raise
        return cls(nvml, chosen, names, use_energy)

    def read(self) -> Reading:
        t = time.monotonic()
        try:
            if self.kind == "energy":
                mj = [float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self.handles]
                if self._start_mj is None:
                    self._start_mj = mj
                joules = sum(now - start for now, start in zip(mj, self._start_mj)) / 1e3
                if joules < 0:
                    raise SensorError(f"NVML energy counter went backwards ({joules:.1f} J)")
                return Reading(t=t, energy_j=joules)
            rails = {f"gpu{i}": check_watts(self.nvml.nvmlDeviceGetPowerUsage(h) / 1e3, f"GPU {i}")
                     for i, h in enumerate(self.handles)}
        except SensorError:
            raise
        except Exception as e:  # an NVMLError (GPU lost, driver reset): degrade, don't crash
            raise SensorError(f"NVML read failed: {e}") from None
        return Reading(t=t, watts=sum(rails.values()), rails=rails)

    def describe(self) -> dict:
        return {**super().describe(), "gpus": self.gpus}

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass  # shutting down a lost driver must not mask the run's result


def _averaging_s(nvml, handle, name: str) -> float:
    """1.0 where the driver averages power over 1 s (Ampere and newer except GA100, and when the architecture cannot
    be read), else 0 (older GPUs and GA100 return instantaneous power)."""
    try:
        arch = nvml.nvmlDeviceGetArchitecture(handle)
    except Exception:
        return 1.0
    return 1.0 if arch >= NVML_DEVICE_ARCH_AMPERE and not any(g in name for g in ("A100", "A30")) else 0.0


def _name(nvml, handle) -> str:
    try:
        name = nvml.nvmlDeviceGetName(handle)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return "unknown GPU"
