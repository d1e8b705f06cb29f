"""Stand-ins for the pynvml module, behaving as NVML does on a Jetson (initialises, power NOT_SUPPORTED) and on a
desktop GPU (energy counter in mJ, power in mW). Install one with monkeypatch.setitem(sys.modules, "pynvml", ...)."""
from __future__ import annotations

import types

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_GPU_IS_LOST = 15


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_GPU_IS_LOST: "GPU is lost"}.get(
            self.value, f"NVML error {self.value}")


def make(kind: str, watts: float = 120.0) -> types.ModuleType:
    """kind: "jetson" (NOT_SUPPORTED for power and energy), "desktop" (energy counter + power),
    "power-only" (power samples, no counter, like pre-Volta GPUs). The energy counter advances by `state.mj`."""
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    m.state = types.SimpleNamespace(initialised=False, shutdown=False, mj=5_000_000, watts=watts, lost=False)

    def not_supported(*_):
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)

    def check(handle):
        if not m.state.initialised:
            raise NVMLError(1)  # UNINITIALIZED
        if m.state.lost:
            raise NVMLError(NVML_ERROR_GPU_IS_LOST)

    def init():
        m.state.initialised = True

    def shutdown():
        m.state.shutdown = True

    def energy(handle):
        check(handle)
        return m.state.mj

    def power(handle):
        check(handle)
        return int(m.state.watts * 1000)

    m.nvmlInit = init
    m.nvmlShutdown = shutdown
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: f"handle{i}"
    m.nvmlDeviceGetName = lambda h: "Orin (nvgpu)" if kind == "jetson" else "NVIDIA GeForce RTX 4090"
    m.nvmlDeviceGetTotalEnergyConsumption = energy if kind == "desktop" else not_supported
    m.nvmlDeviceGetPowerUsage = power if kind in ("desktop", "power-only") else not_supported
    return m
