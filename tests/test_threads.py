"""The process-wide intra-op pool the CLI's model commands use (session.share_thread_pool): exact algorithms stay
exact on it, every session of the process lands on it, and a bad MJSD_THREAD_POOL is one clear line. Subprocesses:
once ORT's global pool exists it refuses sessions with pools of their own, which the rest of the suite creates."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from mjsd.runtime.cli import main

SHARED = """
import json, logging
from mjsd.runtime.session import share_thread_pool, session_options
share_thread_pool()
from mjsd.runtime import Engine
e = Engine.from_bundle(None, threads=2, meter=None)
p = dict(max_new_tokens=24, temperature=0, ignore_eos=True, no_repeat_ngram_size=0, tune=False)
ar = e.generate("def fibonacci(n):", algo="ar", **p).tokens
sps = e.generate("def fibonacci(n):", algo="sps", gamma=4, **p).tokens
mtad = e.generate("def fibonacci(n):", algo="mtad", **p).tokens
other = session_options(1)  # a later session asking for another count still joins the one pool
print(json.dumps({"ar": ar, "sps": sps, "mtad": len(mtad), "policy": [e.target.spinning, e.draft.spinning],
                  "other_joins": not other.use_per_session_threads}))
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_shared_pool_keeps_sps_equal_to_ar():
    r = _run(SHARED)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["sps"] == out["ar"] and len(out["ar"]) == 24 and out["mtad"] == 24
    assert out["policy"] == ["shared", "shared"] and out["other_joins"]
    assert "shares one pool of 2; 1 asked for" in r.stderr


def test_cli_generate_on_the_shared_pool():
    cli = [sys.executable, "-c", "from mjsd.runtime.cli import main; main()"]
    r = subprocess.run(cli + ["generate", "def add(a, b):", "-n", "8", "--algo", "sps", "--temperature", "0",
                              "--threads", "2"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MJSD_THREAD_POOL": "shared"})
    assert r.returncode == 0 and r.stdout, r.stderr


def test_bad_thread_pool_setting_is_one_line(monkeypatch):
    monkeypatch.setenv("MJSD_THREAD_POOL", "global")
    r = CliRunner().invoke(main, ["generate", "x", "-n", "1"])
    assert r.exit_code == 2 and "MJSD_THREAD_POOL='global'" in r.output and "Traceback" not in r.output
