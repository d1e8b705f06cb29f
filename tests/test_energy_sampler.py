"""The sampler and the accounting API: integration, counters, failover when a sensor vanishes mid-run."""
from __future__ import annotations

import logging
import time

import pytest

from mjsd.runtime.energy import EnergyMonitor, Meter, Reading, Sampler, SensorError, measure_idle
from mjsd.runtime.energy.estimate import EstimateMeter
from mjsd.runtime.energy.jetson import JetsonMeter
from mjsd.runtime.energy.rapl import RaplMeter
from mjsd.runtime.errors import ConfigError
from tests import fake_sysfs


class Scripted(Meter):
    """A meter replaying (t, watts or joules) readings, for exact arithmetic without clocks; an exception in the script
    is raised instead of a reading. Ends with an error."""

    needs_thread = False

    def __init__(self, name, readings, kind="power", estimated=False, degraded=None):
        self.name, self.kind, self.estimated, self._it = name, kind, estimated, iter(readings)
        self._degraded = degraded

    def read(self):
        try:
            item = next(self._it)
        except StopIteration:
            raise SensorError(f"{self.name} is gone") from None
        if isinstance(item, Exception):
            raise item
        t, v = item
        if self.kind == "power":
            return Reading(t=t, watts=v, degraded=self._degraded)
        return Reading(t=t, energy_j=v)


def test_bad_sampling_rate_and_no_meter():
    with pytest.raises(ConfigError, match="10-100 Hz"):
        Sampler(EstimateMeter(1.0, 2.0), hz=1000)
    with pytest.raises(SensorError, match="no meter"):
        Sampler([])


def test_trapezoid_integration_and_peak():
    s = Sampler(Scripted("ramp", [(0.0, 10.0), (1.0, 20.0), (3.0, 20.0)]))
    assert s.start().energy_j == 0.0
    assert s.mark().energy_j == pytest.approx(15.0)  # (10 + 20) / 2 * 1 s
    m = s.mark()
    assert (m.energy_j, m.peak_w) == (pytest.approx(55.0), 20.0)


def test_counter_meter_and_failover_bridges_the_gap(caplog):
    counter = Scripted("counter", [(0.0, 100.0), (1.0, 108.0), (2.0, 116.0)], kind="energy")
    backup = Scripted("backup", [(4.0, 0.0), (5.0, 6.0)], kind="energy", estimated=True)
    s = Sampler([counter, backup])
    s.start()
    assert s.mark().energy_j == pytest.approx(8.0)
    assert s.mark().energy_j == pytest.approx(16.0)
    with caplog.at_level(logging.WARNING, logger="mjsd.energy"):
        m = s.mark()  # counter is gone: backup takes over; 2 s gap bridged at the last known 8 W
    assert m.energy_j == pytest.approx(32.0)
    assert s.mark().energy_j == pytest.approx(38.0)
    assert s.sources == ["counter", "backup"] and s.estimated
    assert "counter failed" in caplog.text and "continuing with backup" in caplog.text
    s.mark()  # every meter gone: energy stops, nothing raises
    assert s.failed and s.energy_j == pytest.approx(38.0)


def test_real_sampling_thread_on_a_fake_jetson(tmp_path):
    fake_sysfs.orin_nano(tmp_path)  # a constant 7.0 W on VDD_IN
    meter = JetsonMeter.detect(tmp_path)
    with EnergyMonitor(meter, hz=50) as mon:
        mon.phase("prefill")
        time.sleep(0.1)
        mon.phase("decode")
        time.sleep(0.2)
        report = mon.report(tokens=20, prompt_tokens=8)
    assert mon.sampler.samples >= 8  # the thread ran at ~50 Hz
    assert report.source == "jetson-ina3221" and not report.estimated and report.complete
    assert report.avg_w == pytest.approx(7.0) and report.peak_w == pytest.approx(7.0)
    assert report.energy_j == pytest.approx(7.0 * report.seconds)
    dec = report.phases["decode"]
    assert dec.tokens == 20 and dec.energy_j == pytest.approx(7.0 * dec.seconds)
    assert report.phases["prefill"].tokens == 8
    assert report.j_per_token == pytest.approx(report.energy_j / 20)
    assert report.tokens_per_j == pytest.approx(20 / report.energy_j)
    d = report.to_dict()
    assert d["meter"]["rails"] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert d["phases"]["decode"]["j_per_token"] == pytest.approx(dec.energy_j / 20)


def test_sensor_removed_mid_run_degrades_to_the_estimate(tmp_path, caplog):
    fs = fake_sysfs.orin_nano(tmp_path)
    meters = [JetsonMeter.detect(tmp_path), EstimateMeter(idle_w=3.0, active_w=10.0)]
    with caplog.at_level(logging.WARNING, logger="mjsd.energy"):
        with EnergyMonitor(meters, hz=50) as mon:
            mon.phase("decode")
            time.sleep(0.15)
            fs.remove("bus/i2c/drivers/ina3221")  # the whole driver tree disappears
            time.sleep(0.15)
            report = mon.report(tokens=10)
    assert report.complete and report.estimated
    assert report.source == "jetson-ina3221 -> estimated"
    assert any("jetson-ina3221 failed" in w for w in report.warnings) and "cannot read" in caplog.text
    # measured 7 W for about half the run, then at least the estimate's 3 W idle
    assert 3.0 * report.seconds < report.energy_j < 10.0 * report.seconds
    assert report.to_dict()["estimated"] is True


def test_garbage_reading_mid_run_degrades(tmp_path):
    fs = fake_sysfs.jetson_nano_jp4(tmp_path)
    meters = [JetsonMeter.detect(tmp_path), EstimateMeter(idle_w=1.0, active_w=5.0)]
    with EnergyMonitor(meters, hz=100) as mon:
        time.sleep(0.05)
        fs.write("bus/i2c/drivers/ina3221x/6-0040/iio:device0/in_power0_input", "-")
        time.sleep(0.05)
        report = mon.report(tokens=1)
    assert report.source == "jetson-ina3221 -> estimated" and report.complete


def test_counter_meters_need_no_thread_and_report_idle_subtracted(tmp_path, monkeypatch):
    from mjsd.runtime.energy import rapl

    # the fake counter jumps by joules within milliseconds: no plausibility limit here (it has its own tests)
    monkeypatch.setattr(rapl, "MAX_PLAUSIBLE_W", float("inf"))
    fs = fake_sysfs.rapl(tmp_path)
    meter = RaplMeter.detect(tmp_path)
    with EnergyMonitor(meter, idle_w=2.0) as mon:
        assert mon.sampler._thread is None
        mon.phase("prefill")
        fs.write("class/powercap/intel-rapl:0/energy_uj", 1_000_000 + 3_000_000)
        assert mon.energy()[1] == pytest.approx(3.0)  # per-round energy for the controller
        mon.phase("decode")
        fs.write("class/powercap/intel-rapl:0/energy_uj", 1_000_000 + 9_000_000)
        report = mon.report(tokens=6, prompt_tokens=4)
    assert report.energy_j == pytest.approx(9.0)
    assert report.phases["prefill"].energy_j == pytest.approx(3.0)
    assert report.phases["decode"].energy_j == pytest.approx(6.0)
    assert report.idle_subtracted_j == pytest.approx(9.0 - 2.0 * report.seconds)
    assert report.idle_subtracted_j_per_token == pytest.approx(report.idle_subtracted_j / 6)
    # phases far shorter than a peak window: their average (~1e4 W here) is no power, so no peak is claimed
    assert report.phases["decode"].peak_w == 0.0 and "counter steps" in report.peak_basis


def test_estimate_monitor_is_labelled_and_measure_idle(tmp_path):
    meter = EstimateMeter(idle_w=10.0, active_w=35.0)
    idle = measure_idle(meter, seconds=0.05)
    assert 10.0 <= idle < 12.0  # sleeping burns almost no CPU time
    with EnergyMonitor(meter, idle_w=idle) as mon:
        mon.phase("decode")
        sum(i * i for i in range(200_000))  # some real CPU work
        report = mon.report(tokens=5)
    assert report.estimated and report.source == "estimated"
    assert report.energy_j > 10.0 * report.seconds  # CPU work costs more than idle
    assert report.idle_subtracted_j > 0


def test_counter_peak_is_over_windows_aligned_to_counter_steps():
    # a 300 W load on a counter that steps by 30 J every 100 ms, read every 40 ms: 0.1-s windows gave ~500 W peaks
    reads = [(0.04 * i + 0.013, 30.0 * int((0.04 * i + 0.013) / 0.1)) for i in range(100)]
    s = Sampler(Scripted("nvml-energy", reads, kind="energy"))
    s.start()
    for _ in range(98):
        s.peek()
    peak = s.mark().peak_w
    assert 290 <= peak <= 330, peak
    assert "counter steps >= 0.5 s" in s.peak_basis


def test_transient_errors_are_retried_and_bridged_lasting_ones_fail_over_with_their_time():
    eio = SensorError("cannot read curr1_input: Input/output error", transient=True)
    meter = Scripted("jetson", [(0.0, 10.0), eio, eio, (0.3, 10.0), (0.4, 10.0)])
    s = Sampler([meter, Scripted("backup", [(0.5, 0.0), (0.6, 1.0)], kind="energy", estimated=True)])
    s.start()
    for _ in range(3):
        s.mark()
    # 10 W over 0 .. 0.3 s, the two failed reads bridged
    assert s.energy_j == pytest.approx(3.0) and s.retries == 2 and s.sources == ["jetson"] and not s.failovers
    assert "transient read error" in s.warnings[0]
    s.mark()
    s.mark()  # the script ends: a lasting error, the backup takes over
    assert s.failovers and s.failovers[0]["from"] == "jetson" and s.failovers[0]["to"] == "backup"
    assert s.failovers[0]["t_s"] >= 0 and "failed at t=" in s.warnings[-1]


def test_a_streak_of_transient_errors_longer_than_the_retry_bound_fails_over():
    eio = SensorError("EIO", transient=True)
    s = Sampler([Scripted("flaky", [(0.0, 5.0)] + [eio] * 10), EstimateMeter(1.0, 2.0)])
    s.start()
    for _ in range(7):
        s.mark()
    assert s.sources == ["flaky", "estimated"] and s.retries == 5 and s.failovers[0]["to"] == "estimated"


def test_degraded_readings_and_stuck_counters_are_reported():
    degraded = "total rail(s) ['VDD_IN'] unreadable"
    with EnergyMonitor(Scripted("jetson", [(0.0, 4.0), (1.0, 4.0), (2.0, 4.0)], degraded=degraded)) as mon:
        report = mon.report(tokens=3)
    assert report.degraded == [degraded] and report.to_dict()["degraded"] == [degraded]
    stuck = Scripted("rapl:psys", [(t, 0.0) for t in (0.0, 1.0, 2.5, 3.0)], kind="energy")
    with EnergyMonitor(stuck) as mon:
        mon.energy()
        mon.energy()
        report = mon.report(tokens=3)
    assert "has not advanced for 2.5 s while busy" in report.degraded[0]
    s = Sampler(Scripted("idle", [(t, 0.0) for t in (0.0, 3.0)], kind="energy"))  # not busy: no verdict
    s.start(), s.mark()
    assert not s.degraded
