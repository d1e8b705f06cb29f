"""Device profiles: every bundled one loads; malformed ones are refused naming the line or key at fault."""
from __future__ import annotations

import pytest

from mjsd.runtime.errors import ConfigError
from mjsd.runtime.profiles import bundled_profiles, load_profile, parse_profile

REQUIRED = {"orin-nano", "orin-nx", "agx-orin", "x86-rapl", "nvidia-desktop", "generic-cpu"}

GOOD = """\
name = "mine"
description = "a test device"
[power]
idle_w = 2.0
active_w = 9.0
default_mode = "low"
[[power.modes]]
name = "low"
budget_w = 5.0
[controller]
widths = [1, 2]
gammas = [2, 3]
start = [1, 3]
"""


def test_bundled_profiles_all_load():
    names = set(bundled_profiles())
    assert REQUIRED <= names
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.description and 0 <= p.idle_w <= p.active_w


def test_orin_nano_modes_and_rails():
    p = load_profile("orin-nano")
    assert sorted(p.modes) == ["15W", "25W", "7W", "MAXN_SUPER"]
    assert (p.budget_w(), p.budget_w("7W"), p.budget_w("25W"), p.budget_w("MAXN_SUPER")) == (15.0, 7.0, 25.0, None)
    # JetPack 6.2 ids of the 8GB module
    assert {m.name: m.nvpmodel for m in p.modes.values()} == {"15W": 0, "25W": 1, "MAXN_SUPER": 2, "7W": 3}
    assert (p.total_chips, p.total_rails) == (("1-0040",), ("VDD_IN",))
    nx = load_profile("orin-nx")
    assert {"MAXN_SUPER", "40W", "20W"} <= set(nx.modes) and nx.budget_w("40W") == 40.0
    agx = load_profile("agx-orin")
    assert agx.total_chips == ("1-0040", "1-0041") and agx.modes["MAXN"].nvpmodel == 0
    assert load_profile("nvidia-desktop").controller.settle_s == 1.0
    assert p.rails == ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC") and p.meters == ("jetson", "estimate")
    assert load_profile("agx-orin").rails[:3] == ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")
    assert load_profile("generic-cpu").budget_w() is None
    with pytest.raises(ConfigError, match="no power mode '99W'"):
        p.budget_w("99W")


def test_total_rule_and_settle_are_checked():
    with pytest.raises(ConfigError, match="power.total.chips.*<bus>-<addr>"):
        parse_profile(GOOD.replace("[controller]", '[power.total]\nchips = ["bus1"]\n[controller]'), "bad.toml")
    with pytest.raises(ConfigError, match="settle_s"):
        parse_profile(GOOD.replace("[controller]", "[controller]\nsettle_s = -1"), "bad.toml")


def test_load_by_path_and_unknown_name(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text(GOOD)
    p = load_profile(str(f))
    assert (p.name, p.budget_w(), p.controller.widths, p.controller.start) == ("mine", 5.0, (1, 2), (1, 3))
    with pytest.raises(ConfigError, match="unknown profile 'orin-mega'.*orin-nano"):
        load_profile("orin-mega")
    with pytest.raises(ConfigError, match="cannot read profile"):
        load_profile(str(tmp_path / "missing.toml"))


def test_toml_syntax_error_names_the_line():
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 4"):
        parse_profile(GOOD.replace("idle_w = 2.0", "idle_w = = 2.0"), "bad.toml")


@pytest.mark.parametrize("old, new, message", [
    ("idle_w = 2.0", "idle_w = \"two\"", r"line 4: key 'power.idle_w' must be a number, got 'two'"),
    ("idle_w = 2.0", "idle_w = 2.0\nidel_w = 1.0", r"line 5: unknown key 'power.idel_w'"),
    ("active_w = 9.0\n", "", r"missing required key 'power.active_w'"),
    ("default_mode = \"low\"", "default_mode = \"high\"", r"line 6: key 'power.default_mode' is 'high'"),
    ("budget_w = 5.0", "budget_w = -5.0", r"key 'power.modes' budget_w must be positive"),
    ("start = [1, 3]", "start = [4, 3]", r"line 13: key 'controller.start' must be"),
    ("gammas = [2, 3]", "gammas = [0, 3]", r"key 'controller.gammas' must be a non-empty list of positive"),
    ("[power]", "[power]\nmeters = [\"jetson\", \"solar\"]", r"unknown meter\(s\) \['solar'\]"),
    ("idle_w = 2.0", "idle_w = 20.0", r"0 <= idle_w <= active_w"),
])
def test_schema_errors_name_the_key(old, new, message):
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        parse_profile(GOOD.replace(old, new, 1), "bad.toml")
