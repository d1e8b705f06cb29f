"""Fake sysfs trees with the real layouts of Jetson INA3221 (hwmon and JetPack 4 iio) and Intel RAPL powercap.

Each builder writes the files the kernel exposes (values as the drivers print them: integers, mV/mA/mW/uJ) under
`root`, which stands for /sys (point MJSD_SYSFS_ROOT at it), and returns a `FakeSysfs` to change or delete them.
As on a real system the driver and class paths are symlinks into /sys/devices: `bus/i2c/drivers/ina3221/1-0040 ->
../../../../devices/platform/bus@0/c240000.i2c/i2c-1/1-0040`, `class/hwmon/hwmon3 -> ../../devices/.../hwmon/hwmon3`,
`class/powercap/intel-rapl:0 -> ../../devices/virtual/powercap/intel-rapl/intel-rapl:0`. Tegra234 I2C controllers:
c240000 is bus 1, c250000 bus 2 (tegra234.dtsi); other controller names here are placeholders of the same shape.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

INA = "bus/i2c/drivers/ina3221"
INA_JP4 = "bus/i2c/drivers/ina3221x"
_CONTROLLERS = {1: "bus@0/c240000.i2c", 2: "bus@0/c250000.i2c"}


class FakeSysfs:
    def __init__(self, root: Path):
        self.root = Path(root)

    def write(self, rel: str, value) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")

    def link(self, rel: str, target_rel: str) -> None:
        """A relative symlink at `rel` pointing to `target_rel` (both relative to the root), as sysfs makes them."""
        path, target = self.root / rel, self.root / target_rel
        path.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        path.symlink_to(os.path.relpath(target, path.parent))

    def remove(self, rel: str) -> None:
        path = self.root / rel
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)


def _i2c_device(fs: FakeSysfs, driver: str, chip: str) -> str:
    """The chip's directory under /sys/devices, with the driver's symlink to it; returns the driver path."""
    bus = int(chip.split("-")[0])
    dev = f"devices/platform/{_CONTROLLERS.get(bus, f'i2c-controller{bus}')}/i2c-{bus}/{chip}"
    fs.link(f"{driver}/{chip}", dev)
    fs.write(f"{dev}/name", driver.rsplit("/", 1)[1])
    return f"{driver}/{chip}"


def hwmon_chip(fs: FakeSysfs, chip: str, hwmon: str, rails: list[tuple[str | None, int, int]],
               disabled: tuple[int, ...] = ()) -> str:
    """One INA3221 on the mainline hwmon driver: channels 1-3 (label or None, bus mV, mA), shunt inputs 4-6, the sum
    channel 7. Channels in `disabled` (1-based) have in{N}_enable 0 (their reads fail with ENODATA on a real kernel)."""
    base = _i2c_device(fs, INA, chip)
    d = f"{base}/hwmon/{hwmon}"
    fs.write(f"{d}/name", "ina3221")
    for n, (label, mv, ma) in enumerate(rails, 1):
        if label is not None:  # the driver hides in{N}_label when the device tree gives no label
            fs.write(f"{d}/in{n}_label", label)
        fs.write(f"{d}/in{n}_enable", 0 if n in disabled else 1)
        fs.write(f"{d}/in{n}_input", mv)
        fs.write(f"{d}/curr{n}_input", ma)
        fs.write(f"{d}/curr{n}_crit", 32760)
        fs.write(f"{d}/in{n + 3}_input", 12)  # shunt voltage, not a rail
    fs.write(f"{d}/in7_label", "sum of shunt voltages")
    fs.write(f"{d}/in7_input", 36)
    fs.write(f"{d}/curr4_input", sum(ma for _, _, ma in rails))  # summation channel, not a rail
    real = os.path.realpath(fs.root / d)
    fs.link(f"class/hwmon/{hwmon}", os.path.relpath(real, fs.root))
    return d


def orin_nano(root: Path, vdd_in_ma: int = 1400, cpu_gpu_cv_ma: int = 500, soc_ma: int = 300) -> FakeSysfs:
    """Orin Nano / NX (JetPack 5/6): one INA3221 at 1-0040. Default VDD_IN 5.0 V * 1.4 A = 7.0 W module total."""
    fs = FakeSysfs(root)
    hwmon_chip(fs, "1-0040", "hwmon3", [("VDD_IN", 5000, vdd_in_ma), ("VDD_CPU_GPU_CV", 5000, cpu_gpu_cv_ma),
                                        ("VDD_SOC", 5000, soc_ma)])
    return fs


ORIN_NANO_HWMON = f"{INA}/1-0040/hwmon/hwmon3"


def agx_orin(root: Path, jetpack: int = 5) -> FakeSysfs:
    """AGX Orin: two INA3221s at 1-0040/1-0041, no VDD_IN. Module total = 9.5+5.7+3.0+0.9 W. Unconnected channels:
    JetPack 5 labels them "NC" (readable, 0); JetPack 6 disables them (no label, in{N}_enable 0, ENODATA)."""
    fs = FakeSysfs(root)
    hwmon_chip(fs, "1-0040", "hwmon1", [("VDD_GPU_SOC", 19000, 500), ("VDD_CPU_CV", 19000, 300),
                                        ("VIN_SYS_5V0", 5000, 600)])
    nc = "NC" if jetpack == 5 else None
    hwmon_chip(fs, "1-0041", "hwmon2", [(nc, 0, 0), ("VDDQ_VDD2_1V8AO", 4500, 200), (nc, 0, 0)],
               disabled=() if jetpack == 5 else (1, 3))
    return fs


def agx_orin_industrial(root: Path) -> FakeSysfs:
    """AGX Orin Industrial on its carrier: module chips on bus 1 (12.4 W: 4.75 + 3.8 + 3.0 + 0.85) plus the carrier's
    INA3221 at 2-0041 (tegra234-p3701-0008.dtsi) with CVB_ATX_12V/3V3/5V (20.3 W: 14.4 + 3.3 + 2.6). Summing every
    labelled rail gives 32.7 W."""
    fs = FakeSysfs(root)
    hwmon_chip(fs, "1-0040", "hwmon1", [("VDD_GPU_SOC", 19000, 250), ("VDD_CPU_CV", 19000, 200),
                                        ("VIN_SYS_5V0", 5000, 600)])
    hwmon_chip(fs, "1-0041", "hwmon2", [(None, 0, 0), ("VDDQ_VDD2_1V8AO", 5000, 170), (None, 0, 0)],
               disabled=(1, 3))
    hwmon_chip(fs, "2-0041", "hwmon3", [("CVB_ATX_12V", 12000, 1200), ("CVB_ATX_3V3", 3300, 1000),
                                        ("CVB_ATX_5V", 5000, 520)])
    return fs


def thor_ina238(fs: FakeSysfs, chip: str = "2-0044", hwmon: str = "hwmon5", mv: int = 19000, ma: int = 3000) -> str:
    """An INA238 on the mainline hwmon driver (Documentation/hwmon/ina238.rst: in0 shunt mV, in1 bus mV, curr1 mA,
    power1 uW, temp1 mC), as Jetson Thor has for VIN. The bus and address are placeholders: no Thor tree was recorded."""
    base = _i2c_device(fs, "bus/i2c/drivers/ina238", chip)
    d = f"{base}/hwmon/{hwmon}"
    for key, value in (("name", "ina238"), ("in0_input", 12), ("in1_input", mv), ("curr1_input", ma),
                       ("power1_input", mv * ma), ("temp1_input", 41000)):
        fs.write(f"{d}/{key}", value)
    fs.link(f"class/hwmon/{hwmon}", os.path.relpath(os.path.realpath(fs.root / d), fs.root))
    return d


def _iio_chip(fs: FakeSysfs, chip: str, device: str, rails: list[tuple[str, int, int]]) -> str:
    d = f"{_i2c_device(fs, INA_JP4, chip)}/{device}"
    for n, (name, mw, mv) in enumerate(rails):
        fs.write(f"{d}/rail_name_{n}", name)
        fs.write(f"{d}/in_power{n}_input", mw)
        fs.write(f"{d}/in_voltage{n}_input", mv)
        fs.write(f"{d}/in_current{n}_input", mw * 1000 // mv)
    fs.write(f"{d}/name", "ina3221x")
    fs.link(f"bus/iio/devices/{device}", os.path.relpath(os.path.realpath(fs.root / d), fs.root))
    return d


def jetson_nano_jp4(root: Path) -> FakeSysfs:
    """Jetson Nano on JetPack 4: L4T iio driver ina3221x at 6-0040, power in mW. POM_5V_IN = 3.2 W."""
    fs = FakeSysfs(root)
    _iio_chip(fs, "6-0040", "iio:device0", [("POM_5V_IN", 3200, 5080), ("POM_5V_GPU", 400, 5072),
                                            ("POM_5V_CPU", 1100, 5064)])
    return fs


def agx_xavier_jp4(root: Path) -> FakeSysfs:
    """AGX Xavier on JetPack 4: two ina3221x chips, 1-0040 (GPU, CPU, SOC) and 1-0041 (CV, VDDRQ, SYS5V), no input
    rail: the total is the sum of all six, 2.0+1.5+1.2+0.3+0.6+1.4 = 7.0 W."""
    fs = FakeSysfs(root)
    _iio_chip(fs, "1-0040", "iio:device0", [("GPU", 2000, 19000), ("CPU", 1500, 19000), ("SOC", 1200, 19000)])
    _iio_chip(fs, "1-0041", "iio:device1", [("CV", 300, 19000), ("VDDRQ", 600, 19000), ("SYS5V", 1400, 5000)])
    return fs


RAPL_MAX_UJ = 262143328850  # a real max_energy_range_uj (~262 kJ)
POWERCAP = "devices/virtual/powercap"


def _zone(fs: FakeSysfs, rel: str, name: str, uj: int) -> None:
    for key, value in (("name", name), ("energy_uj", uj), ("max_energy_range_uj", RAPL_MAX_UJ), ("enabled", 1)):
        fs.write(f"{rel}/{key}", value)


def rapl(root: Path, package_uj: int = 1_000_000, psys: bool = False, mmio: bool = False,
         msr: bool = True) -> FakeSysfs:
    """intel-rapl:0 (package-0) with its core and dram subzones, which must not be double counted; optionally psys
    (intel-rapl:1) and the MMIO interface's package zone (intel-rapl-mmio:0, the same package counted again)."""
    fs = FakeSysfs(root)
    if msr:
        pkg = f"{POWERCAP}/intel-rapl/intel-rapl:0"
        _zone(fs, pkg, "package-0", package_uj)
        _zone(fs, f"{pkg}/intel-rapl:0:0", "core", 500_000)
        _zone(fs, f"{pkg}/intel-rapl:0:1", "dram", 100_000)
        fs.link("class/powercap/intel-rapl", f"{POWERCAP}/intel-rapl")
        fs.link("class/powercap/intel-rapl:0", pkg)
        fs.link("class/powercap/intel-rapl:0:0", f"{pkg}/intel-rapl:0:0")
        fs.link("class/powercap/intel-rapl:0:1", f"{pkg}/intel-rapl:0:1")
        if psys:
            _zone(fs, f"{POWERCAP}/intel-rapl/intel-rapl:1", "psys", 2_000_000)
            fs.link("class/powercap/intel-rapl:1", f"{POWERCAP}/intel-rapl/intel-rapl:1")
    if mmio:
        _zone(fs, f"{POWERCAP}/intel-rapl-mmio/intel-rapl-mmio:0", "package-0", package_uj)
        fs.link("class/powercap/intel-rapl-mmio", f"{POWERCAP}/intel-rapl-mmio")
        fs.link("class/powercap/intel-rapl-mmio:0", f"{POWERCAP}/intel-rapl-mmio/intel-rapl-mmio:0")
    return fs
