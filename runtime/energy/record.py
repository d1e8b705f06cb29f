"""Capture a device's sysfs power tree into a tar.gz that tests replay (`mjsd power --record FILE`).

What is kept: the files the meters read (INA3221 hwmon and iio attributes, RAPL powercap zones, and Jetson Thor's
INA238, not read yet) with their values at
capture time, and the symlinks that lead to them (the driver and class paths are symlinks into /sys/devices), so
the archive extracted anywhere is a tree MJSD_SYSFS_ROOT can point at. Nothing else of /sys is read. Files the
user may not read (RAPL energy_uj without root) are left out and listed in the archive's RECORD.json.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
import tarfile
import tempfile
from pathlib import Path

from .base import sysfs_root

TOPS = ("bus/i2c/drivers/ina3221", "bus/i2c/drivers/ina3221x", "bus/i2c/drivers/ina238", "class/powercap")
_FILES = re.compile(r"(in\d+_(label|input|enable)|curr\d+_(input|crit)|power\d+_input|update_interval|name|label|rail_name_\d+|"
                    r"in_(power|voltage|current)\d+_input|energy_uj|max_energy_range_uj|enabled)$")
_DIRS = re.compile(r"(hwmon\d*|iio:device\d+|intel-rapl(-mmio)?(:\d+)*)$")
MANIFEST = "RECORD.json"


def _collect(root: Path) -> tuple[dict[str, str], dict[str, bytes], list[str]]:
    """({link: target}, {file: content}, [unreadable files]), paths relative to root."""
    links, files, unreadable, seen = {}, {}, [], set()

    def walk(d: Path, depth: int) -> None:
        real = os.path.realpath(d)
        if real in seen or depth > 6 or not real.startswith(os.path.realpath(root)):
            return
        seen.add(real)
        for entry in sorted(d.iterdir()):
            rel = str(entry.relative_to(root))
            if entry.is_symlink():
                if depth == 0 or _DIRS.fullmatch(entry.name) or re.fullmatch(r"\d+-[0-9a-fA-F]{4}", entry.name):
                    links[rel] = os.readlink(entry)
                    target = Path(os.path.realpath(entry))
                    if target.is_dir():
                        walk(root / os.path.relpath(target, os.path.realpath(root)), depth + 1)
            elif entry.is_dir() and _DIRS.fullmatch(entry.name):
                walk(entry, depth + 1)
            elif entry.is_file() and _FILES.fullmatch(entry.name):
                try:
                    files[rel] = entry.read_bytes()
                except OSError:
                    unreadable.append(rel)

    for top in TOPS:
        if (root / top).is_dir():
            walk(root / top, 0)
    return links, files, unreadable


def record(out: Path, root: Path | None = None, nvpmodel: str | None = None) -> dict:
    """Write the archive atomically (a temporary file renamed into place); returns what was captured."""
    root = Path(root or sysfs_root())
    links, files, unreadable = _collect(root)
    summary = {"root": str(root), "files": len(files), "links": len(links), "unreadable": unreadable,
               "nvpmodel": nvpmodel, "machine": platform.machine(), "kernel": platform.release()}
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
            for rel, data in [(MANIFEST, json.dumps(summary, indent=2).encode()), *sorted(files.items())]:
                info = tarfile.TarInfo(rel)  # sysfs says 4096 bytes for every file: the size is what was read
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            for rel, target in sorted(links.items()):
                info = tarfile.TarInfo(rel)
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return summary


def replay(archive: Path, dest: Path) -> Path:
    """Extract a recorded archive into `dest` (for MJSD_SYSFS_ROOT); tarfile's data filter refuses links that leave
    `dest` and absolute paths."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return Path(dest)
