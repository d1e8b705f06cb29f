"""tools/gpu_check.py's dry run on the CPU: the script a GPU owner runs must not rot where no GPU is."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--providers", "cpu", "--prompts", "1",
                          "-n", "8", "--repeats", "3", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())["providers"]["cpu"]
    assert res["gpu_ar_equals_cpu_ar"] == 1 and res["sps_equals_ar"] == "1/1" and res["mcsd_equals_ar"] == "1/1"
    assert {"B1T1", "B1T5", "B4T1", "tree5"} <= set(res["target_ms"]) and "B2T1 beam" in res["draft_ms"]
    assert "GOAL B1T1 <= 1.0 ms" in run.stdout
