"""Meter backends against fake sysfs trees with the real layouts, and NVML through stand-in pynvml modules."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mjsd.runtime.energy import SensorError, detect, open_meters, sysfs_root
from mjsd.runtime.energy.estimate import EstimateMeter, estimated_joules
from mjsd.runtime.energy.jetson import JetsonMeter, nvpmodel_mode
from mjsd.runtime.energy.nvml import NvmlMeter
from mjsd.runtime.energy.rapl import RaplMeter, unwrap_delta
from mjsd.runtime.profiles import load_profile
from tests import fake_nvml, fake_sysfs


def test_orin_nano_hwmon_total_is_vdd_in_and_rails_are_kept(tmp_path):
    fake_sysfs.orin_nano(tmp_path)
    meter = JetsonMeter.detect(tmp_path)
    r = meter.read()
    assert r.rails == pytest.approx({"VDD_IN": 7.0, "VDD_CPU_GPU_CV": 2.5, "VDD_SOC": 1.5})
    assert r.watts == pytest.approx(7.0)  # VDD_IN, not the sum: the others are branches of it
    assert meter.describe()["total"] == "VDD_IN"


def test_agx_orin_sums_rails_and_skips_unconnected_channels(tmp_path):
    fake_sysfs.agx_orin(tmp_path)
    r = JetsonMeter.detect(tmp_path).read()
    assert set(r.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert r.watts == pytest.approx(9.5 + 5.7 + 3.0 + 0.9)


def test_jetpack4_iio_layout_reads_milliwatts(tmp_path):
    fake_sysfs.jetson_nano_jp4(tmp_path)
    r = JetsonMeter.detect(tmp_path).read()
    assert r.rails == pytest.approx({"POM_5V_IN": 3.2, "POM_5V_GPU": 0.4, "POM_5V_CPU": 1.1})
    assert r.watts == pytest.approx(3.2)


def test_jetson_garbage_and_missing_files_raise_sensor_error(tmp_path):
    fs = fake_sysfs.orin_nano(tmp_path)
    meter = JetsonMeter.detect(tmp_path)
    fs.write(f"{fake_sysfs.ORIN_NANO_HWMON}/curr1_input", "garbage")
    with pytest.raises(SensorError, match="not a number"):
        meter.read()
    fs.write(f"{fake_sysfs.ORIN_NANO_HWMON}/curr1_input", 10**9)  # 5 MW: wrong units or a torn read
    with pytest.raises(SensorError, match="implausible"):
        meter.read()
    fs.remove(fake_sysfs.ORIN_NANO_HWMON)
    with pytest.raises(SensorError, match="cannot read"):
        meter.read()


def test_jetson_absent_and_rail_selection(tmp_path):
    with pytest.raises(SensorError, match="not a Jetson"):
        JetsonMeter.detect(tmp_path)
    fake_sysfs.orin_nano(tmp_path)
    with pytest.raises(SensorError, match=r"\['VDD_GPU'\] not found"):
        JetsonMeter.detect(tmp_path, only=["VDD_GPU"])
    assert nvpmodel_mode("NV Power Mode: 15W\n0") == "15W"
    assert nvpmodel_mode(None) is None


def test_rapl_counter_unwraps_and_ignores_subzones(tmp_path):
    fs = fake_sysfs.rapl(tmp_path, package_uj=fake_sysfs.RAPL_MAX_UJ - 2_000_000)
    meter = RaplMeter.detect(tmp_path)
    assert meter.name == "rapl:package-0"  # not core/dram, which are parts of the package
    fs.write("class/powercap/intel-rapl:0/energy_uj", 3_000_000)  # wrapped: 2 J before the wrap + 3 J after
    assert meter.read().energy_j == pytest.approx(5.0)
    fs.write("class/powercap/intel-rapl:0/energy_uj", 4_500_000)
    assert meter.read().energy_j == pytest.approx(6.5)
    assert unwrap_delta(10, 4, 20) == 14


def test_rapl_prefers_psys_and_rejects_out_of_range(tmp_path):
    fs = fake_sysfs.rapl(tmp_path, psys=True)
    meter = RaplMeter.detect(tmp_path)
    assert meter.name == "rapl:psys"
    fs.write("class/powercap/intel-rapl:1/energy_uj", fake_sysfs.RAPL_MAX_UJ + 5)
    with pytest.raises(SensorError, match="outside"):
        meter.read()


def test_rapl_root_only_counter_gives_a_clear_message(tmp_path, monkeypatch):
    fake_sysfs.rapl(tmp_path)
    real_read_text = Path.read_text

    def read_text(self, *a, **k):  # what a non-root user gets from energy_uj since Linux 5.10
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real_read_text(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(SensorError, match="root only.*chmod o\\+r"):
        RaplMeter.detect(tmp_path)


def test_nvml_on_jetson_initialises_but_is_not_used(monkeypatch):
    fake = fake_nvml.make("jetson")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(SensorError, match="NOT_SUPPORTED"):
        NvmlMeter.detect()
    assert fake.state.initialised and fake.state.shutdown


def test_nvml_desktop_uses_the_energy_counter(monkeypatch):
    fake = fake_nvml.make("desktop")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = NvmlMeter.detect()
    assert (meter.kind, meter.needs_thread, meter.gpus) == ("energy", False, ["NVIDIA GeForce RTX 4090"])
    assert meter.read().energy_j == 0.0
    fake.state.mj += 2500
    assert meter.read().energy_j == pytest.approx(2.5)
    fake.state.lost = True
    with pytest.raises(SensorError, match="GPU is lost"):
        meter.read()
    meter.close()
    assert fake.state.shutdown


def test_nvml_power_samples_without_counter(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml.make("power-only", watts=87.5))
    meter = NvmlMeter.detect()
    assert meter.kind == "power" and meter.needs_thread
    assert meter.read().watts == pytest.approx(87.5)


def test_nvml_missing_module_is_a_sensor_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if nvidia-ml-py were not installed
    with pytest.raises(SensorError, match="nvidia-ml-py"):
        NvmlMeter.detect()


def test_estimate_model_and_labels():
    clock = iter([0.0, 2.0])
    cpu = iter([10.0, 11.0])
    meter = EstimateMeter(idle_w=10.0, active_w=30.0, cores=2, clock=lambda: next(clock), cpu_clock=lambda: next(cpu))
    # 2 s at 10 W idle + 1 CPU-second on 2 cores = 0.5 s of all-cores-busy at +20 W
    assert meter.read().energy_j == pytest.approx(10 * 2 + 20 * 0.5)
    assert meter.estimated and meter.describe()["estimated"]
    assert estimated_joules(1.0, 100.0, 10.0, 30.0, 2) == pytest.approx(30.0)  # capped at all cores busy


def test_detection_order_root_override_and_fallback(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml.make("jetson"))
    fake_sysfs.orin_nano(tmp_path)
    monkeypatch.setenv("MJSD_SYSFS_ROOT", str(tmp_path))
    assert sysfs_root() == tmp_path
    found = detect()
    assert [d.backend for d in found] == ["jetson", "nvml", "rapl", "estimate"]
    assert [d.meter is not None for d in found] == [True, False, False, True]
    assert [m.name for m in open_meters()] == ["jetson-ina3221", "estimated"]
    # a profile's order wins over auto; an explicit meter wins over the profile and fails loudly when absent
    assert [m.name for m in open_meters(profile=load_profile("x86-rapl"))] == ["estimated"]
    with pytest.raises(SensorError, match="meter 'rapl' is not usable here: no RAPL zones"):
        open_meters("rapl")
