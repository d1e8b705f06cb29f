"""`mjsd power` and `mjsd profiles` end to end through click, on fake sysfs trees and a stand-in pynvml."""
from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from mjsd.runtime.cli import main
from tests import fake_nvml, fake_sysfs


def run(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env)


def test_power_json_on_a_fake_orin_nano(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml.make("jetson"))
    fake_sysfs.orin_nano(tmp_path)
    r = run("power", "--json", "--profile", "orin-nano", "--duration", "0.3", "--hz", "50",
            env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["profile"] == "orin-nano" and out["source"] == "jetson-ina3221" and not out["estimated"]
    assert [m["available"] for m in out["meters"]] == [True, True]  # the profile's order: jetson, estimate
    assert out["readings"] and out["readings"][-1]["rails"]["VDD_IN"] == pytest.approx(7.0)
    assert out["avg_w"] == pytest.approx(7.0) and "missing_rails" not in out


def test_power_text_refuses_another_boards_rule_and_estimates(tmp_path):
    fake_sysfs.agx_orin(tmp_path)
    r = run("power", "--profile", "orin-nano", "--duration", "0.2", env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert r.exit_code == 0, r.output
    assert "jetson    no" in r.output and "['VDD_IN'] of the total rule (profile orin-nano) not found" in r.output
    r = run("power", "--meter", "estimate", "--duration", "0.2", env={"MJSD_SYSFS_ROOT": str(tmp_path / "none")})
    assert r.exit_code == 0 and "ESTIMATED" in r.output and "(estimated)" in r.output


def test_power_prints_the_total_rule_and_carrier_rails(tmp_path):
    fake_sysfs.agx_orin_industrial(tmp_path)
    r = run("power", "--duration", "0.1", env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert r.exit_code == 0, r.output
    assert "total     VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO (default (no board rule): the module's own bus 1;" \
        in r.output and "CVB_ATX_12V" in r.output
    assert "12.40 W" in r.output


def test_power_flags_a_degraded_total(tmp_path):
    fs = fake_sysfs.orin_nano(tmp_path)
    fs.remove(f"{fake_sysfs.ORIN_NANO_HWMON}/curr1_input")
    r = run("power", "--json", "--profile", "orin-nano", "--duration", "0.1", env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    out = json.loads(r.stdout)  # the warnings go to stderr
    assert r.exit_code == 0 and "VDD_IN" in out["degraded"][0] and out["readings"][0]["degraded"]
    r = run("power", "--profile", "orin-nano", "--duration", "0.1", env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert "DEGRADED" in r.output


def test_power_with_nvml_energy_counter(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml.make("desktop"))
    r = run("power", "--json", "--meter", "nvml", "--duration", "0", env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["meters"][0]["detail"]["name"] == "nvml-energy" and out["readings"] == []


def test_power_refuses_an_unusable_meter(tmp_path):
    r = run("power", "--meter", "rapl", env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert r.exit_code == 1 and "error: meter 'rapl' is not usable here: no RAPL zones" in r.output


def test_profiles_list_show_and_refuse(tmp_path):
    r = run("profiles")
    assert r.exit_code == 0 and "orin-nano" in r.output and "7W 7 W" in r.output
    r = run("profiles", "--json")
    names = {p["name"] for p in json.loads(r.output)}
    assert {"orin-nano", "orin-nx", "agx-orin", "x86-rapl", "nvidia-desktop", "generic-cpu"} <= names
    r = run("profiles", "agx-orin")
    assert r.exit_code == 0 and "VDD_GPU_SOC" in r.output and "MAXN 60 W" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ndescription = "x"\n[power]\nidle_w = 1\nactive_w = 2\nsample_hz = 500\n')
    r = run("profiles", str(bad))
    assert r.exit_code == 1 and "line 6: key 'power.sample_hz' must be 10..100 Hz" in r.output


def test_generate_samples_at_the_profiles_rate(llama_bundle, monkeypatch):
    from mjsd.runtime import energy
    from mjsd.runtime.engine import Engine

    rates = []
    real = energy.EnergyMonitor.__init__

    def init(self, meters, hz=50.0, idle_w=None):
        rates.append(hz)
        real(self, meters, hz, idle_w)

    monkeypatch.setattr(energy.EnergyMonitor, "__init__", init)
    eng = Engine.from_bundle(llama_bundle, meter="estimate", profile="generic-cpu")  # sample_hz = 20
    eng.generate("def f(x):", algo="ar", max_new_tokens=3)
    assert rates == [20.0]


def test_record_keeps_a_thor_ina238(tmp_path):
    from mjsd.runtime.energy.record import replay

    fake_sysfs.thor_ina238(fake_sysfs.orin_nano(tmp_path / "sys"))
    archive = tmp_path / "thor.tar.gz"
    assert run("power", "--record", str(archive), env={"MJSD_SYSFS_ROOT": str(tmp_path / "sys")}).exit_code == 0
    root = replay(archive, tmp_path / "replayed")
    d = root / "bus/i2c/drivers/ina238/2-0044"
    assert d.is_symlink() and (d / "hwmon/hwmon5/power1_input").read_text().strip() == str(19000 * 3000)


@pytest.mark.parametrize("tree", ["agx_orin_industrial", "agx_xavier_jp4", "rapl"])
def test_record_a_tree_and_replay_it(tmp_path, tree):
    from mjsd.runtime.energy import open_meters
    from mjsd.runtime.energy.record import MANIFEST, replay

    getattr(fake_sysfs, tree)(tmp_path / "sys")
    (tmp_path / "sys/devices/platform/unrelated").mkdir(parents=True)
    (tmp_path / "sys/devices/platform/unrelated/secret").write_text("not a power file\n")
    archive = tmp_path / "fixture.tar.gz"
    r = run("power", "--record", str(archive), env={"MJSD_SYSFS_ROOT": str(tmp_path / "sys")})
    assert r.exit_code == 0, r.output
    assert "recorded" in r.output and archive.exists() and not list(tmp_path.glob(".fixture*"))  # written atomically
    root = replay(archive, tmp_path / "replayed")
    assert not (root / "devices/platform/unrelated").exists() and (root / MANIFEST).exists()
    want = [m.read() for m in open_meters("auto", root=tmp_path / "sys")[:1]]
    got = [m.read() for m in open_meters("auto", root=root)[:1]]
    assert got[0].watts == pytest.approx(want[0].watts) if want[0].watts is not None else got[0].energy_j == 0
    assert got[0].rails == pytest.approx(want[0].rails) and got[0].carrier == pytest.approx(want[0].carrier)
    if tree != "rapl":
        assert (root / fake_sysfs.INA_JP4 if "xavier" in tree else root / fake_sysfs.INA).joinpath(
            "1-0040").is_symlink()


def test_generate_reports_an_infeasible_power_budget(llama_bundle):
    # the run's own (W, gamma) = (1, 1) is the only configuration; the estimate never draws under its 10 W idle
    args = ["generate", "def f(x):", "--bundle", str(llama_bundle), "--algo", "sps", "--gamma", "1", "--beam-width",
            "1", "-n", "16", "--ignore-eos", "--meter", "estimate", "--power-budget", "0.5"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "warning: power budget 0.5 W is infeasible: the cheapest configuration (beam width 1, gamma 1) draws" \
        in r.stderr and "Raise --power-budget" in r.stderr
    out = json.loads(run(*args, "--json").stdout)
    assert [d["reason"] for d in out["stats"]["controller"]][-1] == "budget infeasible"
    assert out["stats"]["controller"][-1]["watts"] > 0.5
    r = run(*args[:-1], "500")  # a budget that is met: no warning
    assert r.exit_code == 0 and "infeasible" not in r.stderr


def test_generate_stats_flag_a_degraded_total_and_label_the_peak(tmp_path, llama_bundle):
    fs = fake_sysfs.orin_nano(tmp_path)
    fs.remove(f"{fake_sysfs.ORIN_NANO_HWMON}/curr1_input")  # VDD_IN unreadable: its branches are a lower bound
    r = run("generate", "def f(x):", "--bundle", str(llama_bundle), "--algo", "ar", "-n", "4", "--ignore-eos",
            "--meter", "jetson", "--profile", "orin-nano", "--provider", "cpu", "--stats",
            env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert r.exit_code == 0, r.output
    assert "DEGRADED total rail(s) ['VDD_IN'] unreadable" in r.stderr and "lower bound" in r.stderr
    assert "W (instantaneous samples at 50 Hz), source jetson-ina3221" in r.stderr
    r = run("power", "--json", "--meter", "jetson", "--duration", "0.1", env={"MJSD_SYSFS_ROOT": str(tmp_path)})
    assert json.loads(r.stdout)["peak_basis"] == "instantaneous samples at 50 Hz"


def test_server_usage_carries_an_infeasible_budget(llama_bundle):
    from mjsd.runtime.engine import Engine
    from mjsd.runtime.server.protocol import usage

    eng = Engine.from_bundle(llama_bundle, meter="estimate", power_budget=0.5)
    r = eng.generate("def f(x):", algo="sps", gamma=1, beam_width=1, max_new_tokens=12, ignore_eos=True)
    last = usage(r.stats)["mjsd"]["controller"]  # what an OpenAI client sees in usage.mjsd
    assert last["reason"] == "budget infeasible" and last["budget_w"] == 0.5 and last["watts"] > 0.5


def test_bench_and_profile_flag_degraded_energy(tmp_path, llama_bundle):
    """A degraded reading (VDD_IN unreadable) is never silent in the reports either: bench rows, the profile's
    results.json/csv and summary.md."""
    fs = fake_sysfs.orin_nano(tmp_path / "sys")
    fs.remove(f"{fake_sysfs.ORIN_NANO_HWMON}/curr1_input")
    env = {"MJSD_SYSFS_ROOT": str(tmp_path / "sys")}
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n")
    r = run("bench", "--bundle", str(llama_bundle), "--prompts", str(prompts), "--algos", "ar", "--temperatures", "0",
            "-n", "4", "--meter", "jetson", "--json", env=env)
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)[0] if r.stdout.lstrip().startswith("[") else json.loads(r.stdout)["results"][0]
    assert any("VDD_IN" in why for why in row["energy_degraded"])
    out = tmp_path / "run"
    r = run("profile", "--bundle", str(llama_bundle), "--prompts", str(prompts), "--out", str(out), "--algos", "ar",
            "--temperatures", "0", "-n", "4", "--meter", "jetson", "--profile", "orin-nano", env=env)
    assert r.exit_code == 0, r.output
    assert any("VDD_IN" in why for why in json.loads((out / "results.json").read_text())["energy_degraded"])
    assert "VDD_IN" in (out / "results.csv").read_text() and "DEGRADED" in (out / "summary.md").read_text()
