"""Meter backends against fake sysfs trees with the real layouts, and NVML through stand-in pynvml modules."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from mjsd.runtime.energy import PowerController, Sampler, SensorError, detect, open_meters, sysfs_root
from mjsd.runtime.energy.estimate import EstimateMeter, estimated_joules
from mjsd.runtime.energy.base import ChannelDisabled
from mjsd.runtime.energy.jetson import JetsonMeter, Rail, TotalRule, nvpmodel_mode
from mjsd.runtime.energy.nvml import NvmlMeter
from mjsd.runtime.energy import rapl
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


def test_jetson_absent_and_a_rule_for_another_board(tmp_path):
    with pytest.raises(SensorError, match="not a Jetson"):
        JetsonMeter.detect(tmp_path)
    fake_sysfs.orin_nano(tmp_path)
    with pytest.raises(SensorError, match=r"\['VDD_GPU_SOC'.*not found.*choose the profile of this board"):
        JetsonMeter.detect(tmp_path, TotalRule(rails=("VDD_GPU_SOC", "VDD_CPU_CV"), source="profile agx-orin"))
    assert nvpmodel_mode("NV Power Mode: 15W\n0") == "15W"
    assert nvpmodel_mode(None) is None


def test_trees_are_symlinked_like_sysfs(tmp_path):
    fake_sysfs.agx_orin_industrial(tmp_path)
    link = tmp_path / fake_sysfs.INA / "2-0041"
    assert link.is_symlink() and "devices/platform/bus@0/c250000.i2c/i2c-2/2-0041" in str(link.resolve())
    assert (tmp_path / "class/hwmon/hwmon3").is_symlink()


@pytest.mark.parametrize("rule", [TotalRule(), "agx-orin"])
def test_agx_orin_industrial_total_excludes_the_carrier(tmp_path, rule):
    fake_sysfs.agx_orin_industrial(tmp_path)
    if rule == "agx-orin":
        p = load_profile("agx-orin")
        rule = TotalRule(p.total_chips, p.total_rails, "profile agx-orin")
    meter = JetsonMeter.detect(tmp_path, rule)
    r = meter.read()
    assert r.watts == pytest.approx(12.4)  # not 32.7: the carrier's ATX rails are not module power
    assert r.carrier == pytest.approx({"CVB_ATX_12V": 14.4, "CVB_ATX_3V3": 3.3, "CVB_ATX_5V": 2.6})
    assert set(r.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"} and r.degraded is None
    d = meter.describe()
    assert d["chips"] == ["1-0040", "1-0041"] and d["carrier"] == ["CVB_ATX_12V", "CVB_ATX_3V3", "CVB_ATX_5V"]
    assert ("bus 1" in d["rule"] if rule.source == "default" else "profile agx-orin" in d["rule"])
    assert "reported separately" in d["rule"]


@pytest.mark.parametrize("profile", [None, "orin-nano"])
def test_unreadable_vdd_in_is_flagged_not_replaced(tmp_path, profile):
    # the case: VDD_IN 8.61 W, its branches 2.87 + 1.50 = 4.37 W
    fs = fake_sysfs.orin_nano(tmp_path, vdd_in_ma=1722, cpu_gpu_cv_ma=574, soc_ma=300)
    assert JetsonMeter.detect(tmp_path).read().watts == pytest.approx(8.61)
    fs.remove(f"{fake_sysfs.ORIN_NANO_HWMON}/curr1_input")
    p = load_profile(profile) if profile else None
    meter = JetsonMeter.detect(tmp_path, TotalRule(p.total_chips, p.total_rails) if p else TotalRule())
    r = meter.read()
    assert r.watts == pytest.approx(4.37)
    assert r.degraded and "VDD_IN" in r.degraded and "lower bound" in r.degraded and "cannot read" in r.degraded
    assert meter.describe()["degraded"] == r.degraded


@pytest.mark.parametrize("jetpack", [5, 6])
def test_agx_orin_sums_module_rails_and_skips_nc_and_disabled_channels(tmp_path, jetpack):
    fake_sysfs.agx_orin(tmp_path, jetpack=jetpack)
    r = JetsonMeter.detect(tmp_path).read()
    assert set(r.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert r.watts == pytest.approx(9.5 + 5.7 + 3.0 + 0.9) and not r.carrier and r.degraded is None


def test_agx_xavier_two_chip_iio(tmp_path):
    fake_sysfs.agx_xavier_jp4(tmp_path)
    meter = JetsonMeter.detect(tmp_path)
    r = meter.read()
    assert list(r.rails) == ["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"]
    assert r.watts == pytest.approx(7.0) and meter.describe()["chips"] == ["1-0040", "1-0041"]


def test_enodata_channel_is_disabled_not_broken_and_errnos_are_classified(tmp_path, monkeypatch):
    fs = fake_sysfs.orin_nano(tmp_path)
    fs.remove(f"{fake_sysfs.ORIN_NANO_HWMON}/in3_enable")  # a kernel without in_enable: only ENODATA tells
    real_read_text = Path.read_text
    fail = {"errno": errno.ENODATA}

    def read_text(self, *a, **k):
        if self.name in ("in3_input", "curr3_input"):
            raise OSError(fail["errno"], os.strerror(fail["errno"]))
        return real_read_text(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    meter = JetsonMeter.detect(tmp_path)
    assert [r.name for r in meter.module] == ["VDD_IN", "VDD_CPU_GPU_CV"] and meter.degraded is None
    rail = Rail("VDD_SOC", "1-0040", volts_mv=tmp_path / fake_sysfs.ORIN_NANO_HWMON / "in3_input",
                amps_ma=tmp_path / fake_sysfs.ORIN_NANO_HWMON / "curr3_input")
    for code, transient in ((errno.EIO, True), (errno.EREMOTEIO, True), (errno.ENOENT, False), (errno.ENODEV, False)):
        fail["errno"] = code
        with pytest.raises(SensorError) as e:
            rail.watts()
        assert e.value.transient is transient and not isinstance(e.value, ChannelDisabled)


def test_rapl_counter_unwraps_and_ignores_subzones(tmp_path):
    fs = fake_sysfs.rapl(tmp_path, package_uj=fake_sysfs.RAPL_MAX_UJ - 2_000_000)
    meter = RaplMeter.detect(tmp_path)
    assert meter.name == "rapl:package-0"  # not core/dram, which are parts of the package
    fs.write("class/powercap/intel-rapl:0/energy_uj", 3_000_000)  # wrapped: 2 J before the wrap + 3 J after
    assert meter.read().energy_j == pytest.approx(5.0)
    fs.write("class/powercap/intel-rapl:0/energy_uj", 4_500_000)
    assert meter.read().energy_j == pytest.approx(6.5)
    assert unwrap_delta(10, 4, 20) == 14


def test_rapl_prefers_packages_unless_psys_advances(tmp_path, monkeypatch):
    fs = fake_sysfs.rapl(tmp_path, psys=True)
    meter = RaplMeter.detect(tmp_path)  # the fake psys counter never moves, as where psys is not implemented
    assert meter.name == "rapl:package-0" and "psys zone skipped" in meter.describe()["notes"][0]
    # a live psys (its counter moves while we look) covers the whole platform and is used alone
    monkeypatch.setattr(rapl.time, "sleep", lambda s: fs.write("class/powercap/intel-rapl:1/energy_uj", 2_500_000))
    meter = RaplMeter.detect(tmp_path)
    assert meter.name == "rapl:psys"
    fs.write("class/powercap/intel-rapl:1/energy_uj", fake_sysfs.RAPL_MAX_UJ + 5)
    with pytest.raises(SensorError, match="outside"):
        meter.read()


def test_rapl_mmio_is_used_only_without_msr_zones(tmp_path):
    fake_sysfs.rapl(tmp_path / "both", mmio=True)
    meter = RaplMeter.detect(tmp_path / "both")
    assert [z.energy_file.parent.name for z in meter.zones] == ["intel-rapl:0"]  # the package, not counted twice
    assert "mmio zones skipped" in meter.describe()["notes"][0]
    fs = fake_sysfs.rapl(tmp_path / "mmio", msr=False, mmio=True)
    meter = RaplMeter.detect(tmp_path / "mmio")
    assert meter.name == "rapl:package-0" and meter.zones[0].energy_file.parent.name == "intel-rapl-mmio:0"
    fs.write("class/powercap/intel-rapl-mmio:0/energy_uj", 1_000_000 + 4_000_000)
    assert meter.read().energy_j == pytest.approx(4.0)


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
    # nvmlDeviceGetPowerUsage is a 1-s average on Ampere+: its peak is labelled as one (and it lags the load by ~1 s)
    assert meter.averaging_s == 1.0 and "1-s average" in Sampler(meter).peak_basis


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


def test_jetson_thor_ina238_is_noted_not_read(tmp_path):
    # Thor: INA238 on VIN (module + carrier) beside the module's INA3221; only the INA3221 rails are read
    fs = fake_sysfs.orin_nano(tmp_path)
    fake_sysfs.thor_ina238(fs)
    meter = JetsonMeter.detect(tmp_path)
    assert meter.read().watts == pytest.approx(7.0) and not meter.read().carrier
    assert "INA238 at 2-0044 not read" in meter.describe()["notes"][0]
    fs.remove(fake_sysfs.INA)  # an INA238 alone: no meter, and the error says why
    with pytest.raises(SensorError, match="INA238 at 2-0044 not read: Jetson Thor"):
        JetsonMeter.detect(tmp_path)


def test_jetson_lag_is_the_ina3221_update_interval(tmp_path):
    fs = fake_sysfs.orin_nano(tmp_path)
    assert JetsonMeter.detect(tmp_path).averaging_s == 0.0  # not exposed: no lag assumed
    fs.write(f"{fake_sysfs.ORIN_NANO_HWMON}/update_interval", 140)  # ms, as the ina3221 hwmon driver reports it
    meter = JetsonMeter.detect(tmp_path)
    assert meter.averaging_s == pytest.approx(0.14) and meter.describe()["averaging_s"] == pytest.approx(0.14)
    ctl = PowerController.from_profile(load_profile("orin-nano"))
    ctl.expect_lag(meter.averaging_s)  # what the engine does: settle at least as long as the sensor lags
    assert ctl.settle_s == pytest.approx(0.14)
