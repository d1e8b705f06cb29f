"""tools/bench_peers.py and its llama.cpp worker: the parts that need no peer installed (bundle labels, tokens/s
over what each system generated, ratios across bundles, the llama-speculative-simple log it reads)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"

# stderr of llama-speculative-simple (llama-cpp-python 0.3.36's llama.cpp), built-in bundle, K=4, -n 63
SPEC_LOG = """\
0.00.030.753 I cmn          init: llama threadpool init, n_threads = 1
0.00.265.944 I encoded   93 tokens in    0.032 seconds, speed: 2901.083 t/s
0.00.265.969 I decoded   68 tokens in    0.182 seconds, speed:  374.233 t/s
0.00.265.986 I 
0.00.266.003 I n_draft   = 4
0.00.266.018 I n_predict = 68
0.00.266.034 I n_drafted = 68
0.00.266.048 I n_accept  = 50
0.00.266.062 I accept    = 73.529%
"""


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spec_log_parsed_and_summarised():
    worker = _load("peer_llamacpp_worker")
    stats = worker.parse_spec_log(SPEC_LOG)
    assert stats == {"encode_s": 0.032, "decode_s": 0.182, "n_predict": 68, "n_drafted": 68, "n_accept": 50}
    # a run whose last lines the logger thread did not write before exit (seen on this VM): retried, not misread
    assert worker.parse_spec_log(SPEC_LOG[:SPEC_LOG.index("0.00.266.048")]) is None
    bench = _load("bench_peers")
    s = bench.summarise({"llamacpp spec": [0.214]}, {"llamacpp spec": [68]}, {"llamacpp spec": [True]},
                        {"llamacpp spec": [stats]})["llamacpp spec"]
    assert s["tokens_per_s"] == pytest.approx(68 / 0.214)  # the overshoot counts: tokens generated / seconds
    assert s["mean_accepted_length"] == pytest.approx(68 / 18)  # 18 rounds gave 50 accepted + 18 target tokens
    assert s["same_tokens_as_reference"] == 1.0


def test_bundles_labelled_and_compared():
    bench = _load("bench_peers")
    assert bench.parse_bundles(None) == {"builtin": None}
    assert bench.parse_bundles(["old=/a/b", "/x/new"]) == {"old": Path("/a/b"), "new": Path("/x/new")}
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        bench.parse_bundles(["/a/b", "/c/b"])
    systems = {f"mjsd[{b}] {a}": {"tokens_per_s": t} for b, ts in (("old", (100, 200, 300)), ("new", (150, 260, 450)))
               for a, t in zip(("ar", "sps", "mtad"), ts)}
    systems["llamacpp ar"] = {"tokens_per_s": 300}
    r = bench.ratios(systems, ["mjsd[old]", "mjsd[new]"])
    assert r["mjsd[new] ar / mjsd[old] ar"] == pytest.approx(1.5)
    assert r["mjsd[new] mtad / llamacpp ar"] == pytest.approx(1.5)
    assert "mjsd[old] ar / mjsd[new] ar" not in r and "mjsd[old] ar / ortgenai ar" not in r


def test_decode_speed_where_the_prompt_pass_is_timed():
    """mjsd and onnxruntime-genai time their prompt pass: decode tokens/s leaves it out; peers that do not have none."""
    bench = _load("bench_peers")
    s = bench.summarise({"a": [1.0, 1.0], "b": [2.0]}, {"a": [64, 64], "b": [64]}, {"a": [True, True], "b": [None]},
                        {"a": [None, None], "b": [None]}, {"a": [0.2, 0.2], "b": [None]})
    assert s["a"]["decode_tokens_per_s"] == pytest.approx(128 / 1.6) and s["b"]["decode_tokens_per_s"] is None
    systems = {"mjsd ar": {"decode_tokens_per_s": 80.0}, "ortgenai ar": {"decode_tokens_per_s": 100.0},
               "llamacpp ar": {"decode_tokens_per_s": None}}
    assert bench.ratios(systems, ["mjsd"], "decode_tokens_per_s") == {"mjsd ar / ortgenai ar": pytest.approx(0.8)}


def test_ratio_intervals_resample_paired_generations():
    bench = _load("bench_peers")
    rng = np.random.default_rng(1)
    a = list(1.0 + 0.05 * rng.standard_normal(48))  # seconds of 64 tokens, a ~2x as fast as b, with noise
    b = list(2.0 * np.array(a) * (1 + 0.02 * rng.standard_normal(48)))
    seconds, count = {"x": a, "y": b, "z": [1.0] * 48, "w": [2.0] * 48}, {k: [64] * 48 for k in "xyzw"}
    ci = bench.ratio_intervals(seconds, count, ["x / y", "z / w"])
    point = (64 * 48 / sum(a)) / (64 * 48 / sum(b))
    assert ci["x / y"][0] < point < ci["x / y"][1] and ci["x / y"][1] - ci["x / y"][0] < 0.05
    assert ci["z / w"] == pytest.approx([2.0, 2.0])  # no noise, no width
