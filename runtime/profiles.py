"""Device profiles: TOML files describing a device's power sensors, power modes, runtime and controller defaults.

The bundled profiles ship in `mjsd.profiles` (`profiles/*.toml`); `load_profile("orin-nano")` loads one by name,
`load_profile("path/to/my.toml")` a file. A malformed profile is refused with the line at fault (TOML syntax) or the
key at fault (schema). Schema (every table optional except [power])::

    name = "orin-nano"                  # must match the file name for bundled profiles
    description = "..."
    [power]
    meters = ["jetson", "estimate"]      # detection order (jetson, nvml, rapl, estimate); default: auto
    rails = ["VDD_IN", ...]              # INA3221 rails this board has (checked by `mjsd power`)
    idle_w = 3.0                         # estimate model: device idle watts
    active_w = 12.0                      #                 all cores busy
    sample_hz = 50                       # sampler rate, 10..100
    default_mode = "15W"
    [power.total]                        # which INA3221s and rails make up the module total (default: see jetson.py)
    chips = ["1-0040"]                   # <bus>-<addr> of the module's chips; rails on other chips are carrier rails
    rails = ["VDD_IN"]                   # summed into the total (default: the input rail, else every module rail)
    [[power.modes]]                      # nvpmodel power modes; budget_w: the budget when the mode is named
    name = "15W"
    budget_w = 15.0
    nvpmodel = 0                         # optional: the nvpmodel id of the mode
    [runtime]
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    intra_op_threads = 6
    inter_op_threads = 1
    [runtime.provider_options.CUDAExecutionProvider]
    ...                                  # passed to ONNX Runtime as given
    [controller]
    objective = "throughput"             # or "energy"
    widths = [1, 2, 4]
    gammas = [1, 2, 3, 4, 5, 6]
    start = [1, 4]                       # (W, gamma)
    ewma = 0.25
    dwell_rounds = 12
    settle_s = 1.0                       # after a change, rounds this long are not measured (meter lag)

A mode's wattage is the name NVIDIA gives a set of clock caps, not a limit the hardware enforces: the module can draw
more (or much less) than it. No run takes it as its budget unasked; measure and pass --power-budget for a real limit.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

METERS = ("jetson", "nvml", "rapl", "estimate")
OBJECTIVES = ("throughput", "energy")
_NUM = (int, float)

# key -> (type(s), required). Nested dicts are tables; a list [spec] is an array of tables.
_MODE = {"name": (str, True), "budget_w": (_NUM, False), "nvpmodel": (int, False), "description": (str, False)}
_SCHEMA: dict[str, Any] = {
    "name": (str, True),
    "description": (str, True),
    "power": ({
        "meters": (list, False), "rails": (list, False), "idle_w": (_NUM, True), "active_w": (_NUM, True),
        "sample_hz": (_NUM, False), "default_mode": (str, False), "modes": ([_MODE], False),
        "total": ({"chips": (list, False), "rails": (list, False)}, False),
    }, True),
    "runtime": ({
        "providers": (list, False), "provider_options": (dict, False),
        "intra_op_threads": (int, False), "inter_op_threads": (int, False),
    }, False),
    "controller": ({
        "objective": (str, False), "widths": (list, False), "gammas": (list, False), "start": (list, False),
        "ewma": (_NUM, False), "dwell_rounds": (int, False), "settle_s": (_NUM, False),
    }, False),
}
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "a table"}


@dataclass(frozen=True)
class PowerMode:
    name: str
    budget_w: float | None  # None: a mode without clock caps (MAXN), so no budget of its own
    nvpmodel: int | None = None
    description: str = ""


@dataclass(frozen=True)
class ControllerDefaults:
    objective: str = "throughput"
    widths: tuple[int, ...] = (1, 2, 4)
    gammas: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    start: tuple[int, int] = (1, 4)
    ewma: float = 0.25
    dwell_rounds: int = 12
    settle_s: float = 1.0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    path: str
    idle_w: float
    active_w: float
    meters: tuple[str, ...] = ()  # empty: automatic detection order
    rails: tuple[str, ...] = ()
    total_chips: tuple[str, ...] = ()  # [power.total]: empty means the default rule
    total_rails: tuple[str, ...] = ()
    sample_hz: float = 50.0
    modes: dict[str, PowerMode] = field(default_factory=dict)
    default_mode: str | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    provider_options: dict[str, dict] = field(default_factory=dict)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    controller: ControllerDefaults = ControllerDefaults()

    def budget_w(self, mode: str | None = None) -> float | None:
        """The power budget of `mode` (default: the profile's default mode); None when the profile has no modes or the
        mode has no budget."""
        mode = mode or self.default_mode
        if mode is None:
            return None
        if mode not in self.modes:
            raise ConfigError(f"profile {self.name!r} has no power mode {mode!r}; it has {sorted(self.modes)}")
        return self.modes[mode].budget_w

    def to_dict(self) -> dict:
        return asdict(self)


def bundled_profiles() -> dict[str, Path]:
    """Name -> file of every profile shipped with mjsd."""
    root = resources.files("mjsd.profiles")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def load_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name, or a profile file by path. Raises ConfigError saying what is wrong and where."""
    text_arg = str(name_or_path)
    path = Path(text_arg)
    if not (text_arg.endswith(".toml") or path.is_file() or "/" in text_arg):
        known = bundled_profiles()
        if text_arg not in known:
            raise ConfigError(f"unknown profile {text_arg!r}; bundled profiles: {', '.join(sorted(known))} "
                              "(or give the path of a .toml file)")
        path = known[text_arg]
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read profile {path}: {e.strerror or e}") from None
    profile = parse_profile(text, str(path))
    if path.parent == Path(str(resources.files("mjsd.profiles"))) and profile.name != path.stem:
        raise ConfigError(f"bundled profile {path} is named {profile.name!r}; rename it to {path.stem!r}")
    return profile


def parse_profile(text: str, where: str = "<profile>") -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # its message carries "(at line L, column C)"
        raise ConfigError(f"profile {where} is not valid TOML: {e}") from None
    _check_table(data, _SCHEMA, "", text, where)
    power, runtime, ctl = data["power"], data.get("runtime", {}), data.get("controller", {})
    modes = {m["name"]: PowerMode(m["name"], float(m["budget_w"]) if "budget_w" in m else None, m.get("nvpmodel"),
                                  m.get("description", ""))
             for m in power.get("modes", [])}

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"profile {where}{_line_of(text, key)}: key {key!r} {why}")

    meters = tuple(power.get("meters", ()))
    if unknown := [m for m in meters if m not in METERS]:
        raise bad("power.meters", f"names unknown meter(s) {unknown}; known: {list(METERS)}")
    if not 0 <= power["idle_w"] <= power["active_w"]:
        raise bad("power.idle_w", f"must satisfy 0 <= idle_w <= active_w (got {power['idle_w']}, {power['active_w']})")
    if not 10 <= power.get("sample_hz", 50) <= 100:
        raise bad("power.sample_hz", f"must be 10..100 Hz, got {power['sample_hz']}")
    if (dm := power.get("default_mode")) is not None and dm not in modes:
        raise bad("power.default_mode", f"is {dm!r}, which is not one of the modes {sorted(modes)}")
    if any(m.budget_w is not None and m.budget_w <= 0 for m in modes.values()):
        raise bad("power.modes", "budget_w must be positive")
    defaults = ControllerDefaults()
    objective = ctl.get("objective", defaults.objective)
    if objective not in OBJECTIVES:
        raise bad("controller.objective", f"must be one of {list(OBJECTIVES)}, got {objective!r}")
    widths, gammas = _positive_ints(ctl, "widths", defaults.widths, bad), _positive_ints(ctl, "gammas", defaults.gammas, bad)
    start = tuple(ctl.get("start", defaults.start))
    if len(start) != 2 or start[0] not in widths or start[1] not in gammas:
        raise bad("controller.start", f"must be [W, gamma] from widths {list(widths)} and gammas {list(gammas)}")
    if not 0 < ctl.get("ewma", defaults.ewma) <= 1:
        raise bad("controller.ewma", "must be in (0, 1]")
    if not 0 <= ctl.get("settle_s", defaults.settle_s) <= 10:
        raise bad("controller.settle_s", "must be 0..10 seconds")
    total = power.get("total", {})
    for key in ("chips", "rails"):
        if not all(isinstance(v, str) for v in total.get(key, ())):
            raise bad(f"power.total.{key}", "must be a list of strings")
    if bad_chips := [c for c in total.get("chips", ()) if not re.fullmatch(r"\d+-[0-9a-fA-F]{4}", c)]:
        raise bad("power.total.chips", f"names {bad_chips}, not <bus>-<addr> like \"1-0040\"")
    return Profile(
        name=data["name"], description=data["description"], path=where,
        idle_w=float(power["idle_w"]), active_w=float(power["active_w"]),
        meters=meters, rails=tuple(power.get("rails", ())), total_chips=tuple(total.get("chips", ())),
        total_rails=tuple(total.get("rails", ())), sample_hz=float(power.get("sample_hz", 50)),
        modes=modes, default_mode=power.get("default_mode"),
        providers=tuple(runtime.get("providers", ("CPUExecutionProvider",))),
        provider_options=runtime.get("provider_options", {}),
        intra_op_threads=runtime.get("intra_op_threads"), inter_op_threads=runtime.get("inter_op_threads"),
        controller=ControllerDefaults(objective, widths, gammas, start, float(ctl.get("ewma", defaults.ewma)),
                                      ctl.get("dwell_rounds", defaults.dwell_rounds),
                                      float(ctl.get("settle_s", defaults.settle_s))),
    )


def _positive_ints(table: dict, key: str, default: tuple[int, ...], bad) -> tuple[int, ...]:
    values = table.get(key, default)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise bad(f"controller.{key}", f"must be a non-empty list of positive integers, got {values!r}")
    return tuple(sorted(set(values)))


def _check_table(data: dict, schema: dict, prefix: str, text: str, where: str) -> None:
    """Refuse unknown keys, missing required keys and wrong types, naming the key (and its line when found)."""
    for key in data:
        if key not in schema:
            raise ConfigError(f"profile {where}{_line_of(text, prefix + key)}: unknown key {prefix + key!r}; "
                              f"known keys here: {', '.join(schema)}")
    for key, (kind, required) in schema.items():
        full = prefix + key
        if key not in data:
            if required:
                raise ConfigError(f"profile {where}: missing required key {full!r}")
            continue
        value = data[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"profile {where}{_line_of(text, full)}: key {full!r} must be a table")
            _check_table(value, kind, full + ".", text, where)
        elif isinstance(kind, list):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"profile {where}{_line_of(text, full)}: key {full!r} must be an array of tables "
                                  f"([[{full}]])")
            for i, item in enumerate(value):
                _check_table(item, kind[0], f"{full}[{i}].", text, where)
        elif isinstance(value, bool) or not isinstance(value, kind):
            name = "a number" if kind is _NUM else _TYPE_NAMES.get(kind, str(kind))
            raise ConfigError(f"profile {where}{_line_of(text, full)}: key {full!r} must be {name}, got {value!r}")
        elif kind is _NUM and not math.isfinite(value):  # TOML allows inf and nan
            raise ConfigError(f"profile {where}{_line_of(text, full)}: key {full!r} must be a finite number, got "
                              f"{value!r}")


def _line_of(text: str, key: str) -> str:
    """', line N' for the first line assigning the key's last component (best effort: TOML keeps no positions)."""
    leaf = re.sub(r"\[\d+\]", "", key).rsplit(".", 1)[-1]
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(leaf)}\s*=", line) or re.match(rf"\s*\[+\s*[\w.]*{re.escape(leaf)}\s*\]+", line):
            return f", line {n}"
    return ""
