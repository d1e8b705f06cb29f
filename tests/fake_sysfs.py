"""Fake sysfs trees with the real layouts of Jetson INA3221 (hwmon and JetPack 4 iio) and Intel RAPL powercap.

Each builder writes the files the kernel exposes (values as the drivers print them: integers, mV/mA/mW/uJ) under
`root`, which stands for /sys (point MJSD_SYSFS_ROOT at it), and returns a `FakeSysfs` to change or delete them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

INA = "bus/i2c/drivers/ina3221"
INA_JP4 = "bus/i2c/drivers/ina3221x"


class FakeSysfs:
    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, rel: str, value) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")

    def remove(self, rel: str) -> None:
        path = self.root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _hwmon_chip(fs: FakeSysfs, chip: str, hwmon: str, rails: list[tuple[str, int, int]]) -> str:
    """One INA3221 on the mainline hwmon driver: channels 1-3 (label, bus mV, mA), shunt inputs 4-6, sum channel 7."""
    d = f"{INA}/{chip}/hwmon/{hwmon}"
    fs.write(f"{d}/name", "ina3221")
    for n, (label, mv, ma) in enumerate(rails, 1):
        fs.write(f"{d}/in{n}_label", label)
        fs.write(f"{d}/in{n}_input", mv)
        fs.write(f"{d}/curr{n}_input", ma)
        fs.write(f"{d}/curr{n}_crit", 32760)
        fs.write(f"{d}/in{n + 3}_input", 12)  # shunt voltage, not a rail
    fs.write(f"{d}/in7_label", "sum of shunt voltages")
    fs.write(f"{d}/in7_input", 36)
    fs.write(f"{d}/curr4_input", sum(ma for _, _, ma in rails))  # summation channel, not a rail
    return d


def orin_nano(root: Path) -> FakeSysfs:
    """Orin Nano / NX (JetPack 5/6): one INA3221 at 1-0040. VDD_IN 5.0 V * 1.4 A = 7.0 W module total."""
    fs = FakeSysfs(root)
    _hwmon_chip(fs, "1-0040", "hwmon3", [("VDD_IN", 5000, 1400), ("VDD_CPU_GPU_CV", 5000, 500),
                                         ("VDD_SOC", 5000, 300)])
    return fs


ORIN_NANO_HWMON = f"{INA}/1-0040/hwmon/hwmon3"


def agx_orin(root: Path) -> FakeSysfs:
    """AGX Orin: two INA3221s, no VDD_IN; unconnected channels are labelled NC. Total = 9.5+5.7+3.0+0.9 W."""
    fs = FakeSysfs(root)
    _hwmon_chip(fs, "1-0040", "hwmon1", [("VDD_GPU_SOC", 19000, 500), ("VDD_CPU_CV", 19000, 300),
                                         ("VIN_SYS_5V0", 5000, 600)])
    _hwmon_chip(fs, "1-0041", "hwmon2", [("NC", 0, 0), ("VDDQ_VDD2_1V8AO", 4500, 200), ("NC", 0, 0)])
    return fs


def jetson_nano_jp4(root: Path) -> FakeSysfs:
    """Jetson Nano on JetPack 4: L4T iio driver ina3221x at 6-0040, power in mW. POM_5V_IN = 3.2 W."""
    fs = FakeSysfs(root)
    d = f"{INA_JP4}/6-0040/iio:device0"
    for n, (name, mw, mv) in enumerate([("POM_5V_IN", 3200, 5080), ("POM_5V_GPU", 400, 5072),
                                        ("POM_5V_CPU", 1100, 5064)]):
        fs.write(f"{d}/rail_name_{n}", name)
        fs.write(f"{d}/in_power{n}_input", mw)
        fs.write(f"{d}/in_voltage{n}_input", mv)
        fs.write(f"{d}/in_current{n}_input", mw * 1000 // mv)
    fs.write(f"{d}/name", "ina3221x")
    return fs


RAPL_MAX_UJ = 262143328850  # a real max_energy_range_uj (~262 kJ)


def rapl(root: Path, package_uj: int = 1_000_000, psys: bool = False) -> FakeSysfs:
    """intel-rapl:0 (package-0) with its core and dram subzones, which must not be double counted."""
    fs = FakeSysfs(root)
    zones = {"intel-rapl:0": ("package-0", package_uj), "intel-rapl:0/intel-rapl:0:0": ("core", 500_000),
             "intel-rapl:0/intel-rapl:0:1": ("dram", 100_000), "intel-rapl:0:0": ("core", 500_000)}
    if psys:
        zones["intel-rapl:1"] = ("psys", 2_000_000)
    for rel, (name, uj) in zones.items():
        fs.write(f"class/powercap/{rel}/name", name)
        fs.write(f"class/powercap/{rel}/energy_uj", uj)
        fs.write(f"class/powercap/{rel}/max_energy_range_uj", RAPL_MAX_UJ)
        fs.write(f"class/powercap/{rel}/enabled", 1)
    return fs
