"""mjsd against its peers on the same weights, same machine, same prompts, interleaved: ratios, not absolutes.

    flock /tmp/mjsd-bench.lock .venv/bin/python tools/bench_peers.py --checkpoints /tmp/mjsd-peers/ckpt \
        --bundle old=runtime/builtin_bundle --bundle new=/path/to/new/bundle --limit 16 -n 64 --out runs/peers.json

Peers (greedy, batch 1, exactly --max-new-tokens new tokens each, EOS ignored; token ids given, so tokenization
is outside every timing):
- Hugging Face transformers (PyTorch eager, this venv): plain `generate` and `generate(assistant_model=draft,
  num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0)`: fixed
  gamma draft-model speculative decoding like mjsd's sps; served by tools/peer_hf_worker.py in a process of its own,
  like every peer (in mjsd's process, torch slowed mjsd's AR by ~2-3%).
- onnxruntime-genai 0.18 (its own venv, --ortgenai-venv, created on first use: its model builder needs
  transformers 5): greedy AR, and draft-model speculative decoding (genai_config model.type "speculative",
  `set_speculative_options(max_draft_tokens=gamma)`, min_adaptive_k 0 = fixed K), models built from the same HF
  checkpoints by its model builder (fp32, CPU); served by tools/peer_ortgenai_worker.py.
- llama.cpp (llama-cpp-python built here from its sdist, its own venv --llamacpp-venv; setup in BENCHMARKS.md), on
  GGUF f32 files converted from the same checkpoints by the converter in that sdist: AR through llama-cpp-python's
  `Llama.generate` (token ids in and out), draft-model speculative decoding through llama.cpp's own
  `llama-speculative-simple` binary (fixed K = gamma; text in and out, so its row is checked by text; its last
  round may overshoot -n by up to K tokens, so every tokens/s is tokens generated / seconds); served by
  tools/peer_llamacpp_worker.py. llama.cpp and HF run with 1 or --threads threads, whichever is faster at start-up.
- mjsd: `Engine.generate` (the product API, text streaming included) with ar, sps and mtad as the peers run theirs
  (fixed gamma: online tuning off, no n-gram ban, no early draft stop), and `mtad-defaults` (no parameters: what a
  user gets, n-gram ban and online tuning on, so its tokens differ from AR's), for every --bundle
  (several bundles run interleaved in the same process: old vs new graphs as same-run ratios; rows and ratios are
  named `mjsd[LABEL] ...` then, the first bundle is the reference for "same tokens").
Every prompt runs every system in turn, `--repeats` passes; wall time of one generation = prefill + decode.
The order is a fresh seeded shuffle for every prompt: the first generation after another process ran pays for the
switch (measured with a fixed order: mjsd AR's prompt pass 16.3-18.4 ms right after onnxruntime-genai's process,
13.3 ms for the same AR after mjsd's SpS and MTAD), so a fixed order, or a rotation that keeps each system's
neighbours, charges that to the same systems every time.
`--settle` seconds of idle precede every generation: a peer's spinning thread pool goes on burning a core for
tens of ms after its call returns (measured: mjsd AR 1.72 ms/call alone, 2.33 right after an onnxruntime-genai
generation, 1.76 after a 50 ms pause), which would charge one system for the one before it.
tokens/s is reported over all generations and as the median generation's: thread pools that busy-wait (OpenMP in
llama.cpp and torch, ORT's spinning) stall for seconds when another process takes a core, which the median ignores.
Each all-generations ratio comes with a 95% bootstrap interval (the run's generations resampled in pairs): the run's
own noise, not the machine's drift between runs minutes apart, which on the project's VM can be wider.
A weights check compares the mjsd target's logits with the HF checkpoint's, and greedy tokens across systems.

Then the papers' claims (MTAD vs SpS): `mjsd bench`'s run_bench over ar/sps/mtad at T=0 and T=1 with the energy
estimate (this VM has no power sensor), reported as ratios next to the published ones.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mjsd.runtime import Engine, GenerationConfig
from mjsd.runtime.bench import format_table, load_prompts, run_bench

ROOT = Path(__file__).resolve().parent.parent
ORTGENAI = "onnxruntime-genai==0.18.0"
# the algorithms as the peers and the papers run them: fixed gamma (no online tuning), no n-gram ban (it changes
# greedy tokens), no early draft stop
PLAIN = dict(tune=False, no_repeat_ngram_size=0, draft_p_min=0.0)
CLAIMS = {"speed-up MTAD vs SpS": 1.42, "energy SpS / MTAD": 1.54, "perplexity MTAD vs SpS": -0.212}


def ensure_venv(venv: Path) -> Path:
    """The onnxruntime-genai venv (created with its builder's needs: transformers 5, torch CPU, onnx_ir)."""
    py = venv / "bin" / "python"
    if py.exists():
        return py
    print(f"creating {venv} ({ORTGENAI}, transformers 5, torch CPU)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheels = sorted(glob.glob("/opt/wheels/torch-*+cpu-*.whl"))  # a local CPU wheel when there is one
    torch = [wheels[-1]] if wheels else ["torch", "--index-url", "https://download.pytorch.org/whl/cpu"]
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + torch, check=True)
    subprocess.run(pip + [ORTGENAI, "transformers>=5,<6", "onnx", "onnx_ir", "onnxscript", "numpy"], check=True)
    return py


class Worker:
    """A peer in its own venv: a worker script speaking JSON lines on stdin/stdout."""

    def __init__(self, name: str, py: Path, script: str, checkpoints: Path, cache: Path, threads: int,
                 extra: tuple[str, ...] = ()):
        self.name = name
        self.proc = subprocess.Popen([str(py), str(ROOT / "tools" / script), "--checkpoints", str(checkpoints),
                                      "--cache", str(cache), "--threads", str(threads), *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self.proc.stdout.readline()
        if not hello:
            raise SystemExit(f"the {name} worker failed to start (see its error above)")
        self.hello = json.loads(hello)
        self.version = self.hello["version"]

    def generate(self, mode: str, ids: list[int], n: int, k: int, ref: list[int] | None = None) -> dict:
        return self.request({"mode": mode, "ids": ids, "n": n, "k": k, "ref": ref})

    def request(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {self.name} worker died (see its error above)")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def llamacpp_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():  # not created on first use: building llama.cpp takes 10+ minutes
        raise SystemExit(f"no llama.cpp venv at {venv}: set it up as BENCHMARKS.md says ('llama.cpp peer'), "
                         "or give --skip-llamacpp")
    return py


def weights_check(engine: Engine, hf: Worker, ids: list[int]) -> dict:
    """max |logit diff| between each mjsd graph and its HF checkpoint over one prompt: the same weights?"""
    out = {}
    for role in ("target", "draft"):
        sess = getattr(engine, role)
        mine = sess.forward(np.asarray([ids], np.int64), sess.new_cache())[0]
        ref = np.array(hf.request({"mode": "logits", "role": role, "ids": ids})["logits"], np.float32)
        out[role] = float(np.abs(mine[:, :ref.shape[1]] - ref).max())
    return out


def graph_session(path: Path, threads: int, past: int = 128) -> tuple:
    """A plain onnxruntime session over one graph, the feeds of a 1-token call after `past`, and its node summary."""
    import onnx
    import onnxruntime as ort

    from mjsd.runtime.session import session_options

    so = session_options(threads)  # the run's thread pool (shared: ORT refuses a pool of the session's own)
    if so.use_per_session_threads:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([[7]], np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, past + 1), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.array([[past]], np.int64)
        elif i.name == "attention_bias":  # mjsd's tree graph: additive [B, 1, new, total] bias, 0 = attend
            feeds[i.name] = np.zeros((1, 1, 1, past + 1), np.float32)
        elif i.name == "logits_to_keep":  # mjsd's fused graphs: 0 = every position's logits
            feeds[i.name] = np.zeros(1, np.int64)
        elif i.name == "beam_k":  # mjsd's fused drafts: the beam head (a beam search step's 2 best children)
            feeds[i.name] = np.array([2], np.int64)
        elif i.name == "beam_bias":
            feeds[i.name] = np.zeros((1, i.shape[1]), np.float32)
        else:  # past_key_values.{i}.key/value [1, kv_heads, past, head_dim]; genai's head_dim is symbolic
            head = i.shape[3] if isinstance(i.shape[3], int) else json.loads(
                (path.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
            feeds[i.name] = np.zeros((1, i.shape[1], past, head), np.float32)
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    fused = sorted({o for o in ops if o in ("GroupQueryAttention", "SkipSimplifiedLayerNormalization",
                                            "SimplifiedLayerNormalization", "RotaryEmbedding", "MultiHeadAttention")})
    return sess, feeds, {"nodes": len(ops), "fused_ops": fused}


def graph_costs_of(paths: dict[str, Path], threads: int, reps: int = 200) -> dict:
    """Nodes and median ms per 1-token call (past 128) of each graph in plain onnxruntime, same session options,
    the graphs' calls interleaved so machine drift hits them alike; a graph it cannot feed gets its error instead."""
    out, runs = {}, {}
    for name, path in paths.items():
        try:
            sess, feeds, out[name] = graph_session(path, threads)
            for _ in range(20):
                sess.run(None, feeds)
            runs[name] = (sess, feeds, [])
        except Exception as e:  # noqa: BLE001 - a side table; the run's results must still be written
            out[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    for _ in range(reps):
        for sess, feeds, times in runs.values():
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
    for name, (_, _, times) in runs.items():
        out[name]["ms_per_call"] = 1e3 * statistics.median(times)
    return out


def default_cache(checkpoints: Path) -> Path:
    """A build folder per version of the checkpoints (path, size and mtime of every weight file)."""
    key = hashlib.sha1()
    for f in sorted(checkpoints.glob("*/*.safetensors")) + sorted(checkpoints.glob("*/*.bin")):
        st = f.stat()
        key.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(tempfile.gettempdir()) / "mjsd-peers" / key.hexdigest()[:12]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("mjsd", "onnxruntime", "numpy", "torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def parse_bundles(specs: list[str] | None) -> dict[str, Path | None]:
    """--bundle [LABEL=]PATH, repeatable -> {label: path}; none: the built-in bundle."""
    if not specs:
        return {"builtin": None}
    out = {}
    for spec in specs:
        label, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        label = label or Path(path).resolve().name
        if label in out:
            raise SystemExit(f"two bundles are labelled {label!r}: give LABEL=PATH")
        out[label] = Path(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=Path, default=Path("/tmp/mjsd-peers/ckpt"),
                    help="folder with the HF target/ and draft/ of the bundles' weights (tools/bundle_to_hf.py "
                    "writes them from a bundle)")
    ap.add_argument("--bundle", action="append", metavar="[LABEL=]PATH",
                    help="mjsd bundle, repeatable: several run interleaved in one process (default: the built-in "
                    "one); the claims run on the last")
    ap.add_argument("--prompts", type=Path, help="JSONL or text prompt file (default: the built-in set)")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("-n", "--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--thread-pool", choices=("shared", "session"), default="shared",
                    help="mjsd's intra-op threads: one process-wide pool as the CLI uses (default), or per session")
    ap.add_argument("--settle", type=float, default=0.1, help="idle seconds before each generation (another "
                    "process's spinning threads must not be charged to the next system)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-threads", type=int, help="threads for HF and llama.cpp (default: 1 or --threads, "
                    "whichever is faster at start-up: their OpenMP pools busy-wait, see the module doc)")
    ap.add_argument("--ortgenai-venv", type=Path, default=ROOT / ".venv-ortgenai")
    ap.add_argument("--llamacpp-venv", type=Path, default=ROOT / ".venv-llamacpp")
    ap.add_argument("--peer-cache", "--ortgenai-cache", type=Path, help="peers' converted models (default: under "
                    "/tmp, keyed by the checkpoints' files, so retrained weights are rebuilt)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-ortgenai", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-claims", action="store_true")
    ap.add_argument("--claims-limit", type=int, default=32, help="prompts for the claims comparison")
    ap.add_argument("--out", type=Path, help="write all results as JSON here")
    args = ap.parse_args()
    for role in ("target", "draft"):
        if not (args.checkpoints / role / "config.json").is_file():
            raise SystemExit(f"{args.checkpoints / role} is not a Hugging Face checkpoint (no config.json); make "
                             "one with tools/bundle_to_hf.py BUNDLE OUT and give --checkpoints OUT")

    n, gamma = args.max_new_tokens, args.gamma
    if args.thread_pool == "shared":
        from mjsd.runtime.session import share_thread_pool

        share_thread_pool()
    bundles = parse_bundles(args.bundle)
    engines = {label: Engine.from_bundle(path, threads=args.threads, meter=None) for label, path in bundles.items()}
    prefix = {label: "mjsd" if len(engines) == 1 else f"mjsd[{label}]" for label in engines}
    engine = next(iter(engines.values()))  # the reference: its tokenizer, its AR tokens
    prompts = load_prompts(args.prompts, args.limit)
    ids_list = [engine.encode(p) for p in prompts]
    base = dict(max_new_tokens=n, ignore_eos=True, gamma=gamma, beam_width=args.beam_width, tau=args.tau, **PLAIN)
    systems = {f"{prefix[label]} {a}": (lambda ids, ref, e=e, a=a: mjsd_run(e, ids, GenerationConfig(algo=a, **base)))
               for label, e in engines.items() for a in ("ar", "sps", "mtad")}
    for label, e in engines.items():  # what a user gets with no parameters (n-gram ban and online tuning on)
        systems[f"{prefix[label]} mtad-defaults"] = (lambda ids, ref, e=e: mjsd_run(
            e, ids, GenerationConfig(algo="mtad", max_new_tokens=n, ignore_eos=True)))
    ref_name = f"{prefix[next(iter(engines))]} ar"
    report = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": platform.platform(),
              "cpu_count": os.cpu_count(), "versions": versions(), "threads": args.threads, "prompts": len(prompts),
              "max_new_tokens": n, "gamma": gamma, "beam_width": args.beam_width, "tau": args.tau,
              "repeats": args.repeats, "settle_s": args.settle, "thread_pool": args.thread_pool,
              "bundles": {lb: str(e.bundle.root) for lb, e in engines.items()},
              "reference": ref_name, "checkpoints": str(args.checkpoints),
              "peer_threads": "--peer-threads" if args.peer_threads else "the faster of 1 and --threads at start-up"}
    cache = args.peer_cache or default_cache(args.checkpoints)
    workers = {}
    try:
        if not args.skip_hf:
            hf = workers["hf"] = Worker("transformers", Path(sys.executable), "peer_hf_worker.py", args.checkpoints,
                                        cache, args.peer_threads or args.threads,
                                        ("--fixed-threads",) if args.peer_threads else ())
            report["versions"]["transformers (worker)"] = hf.version
            report["weights_max_abs_logit_diff"] = {lb: weights_check(e, hf, ids_list[0]) for lb, e in engines.items()}
            report["hf_torch_threads"] = hf.hello["threads"]
            systems["hf ar"] = lambda ids, ref, w=hf: w.generate("ar", ids, n, gamma)
            systems["hf assisted"] = lambda ids, ref, w=hf: w.generate("spec", ids, n, gamma)
        if not args.skip_ortgenai:
            w = workers["ortgenai"] = Worker("onnxruntime-genai", ensure_venv(args.ortgenai_venv),
                                             "peer_ortgenai_worker.py", args.checkpoints, cache, args.threads)
            report["versions"]["onnxruntime-genai"] = w.version
            systems["ortgenai ar"] = lambda ids, ref, w=w: w.generate("ar", ids, n, gamma)
            systems["ortgenai spec"] = lambda ids, ref, w=w: w.generate("spec", ids, n, gamma)
        if not args.skip_llamacpp:
            w = workers["llamacpp"] = Worker("llama.cpp", llamacpp_python(args.llamacpp_venv),
                                             "peer_llamacpp_worker.py", args.checkpoints, cache / "llamacpp",
                                             args.peer_threads or args.threads,
                                             ("--fixed-threads",) if args.peer_threads else ())
            report["versions"]["llama-cpp-python"] = w.version
            report["llamacpp_threads"] = w.hello["threads"]
            systems["llamacpp ar"] = lambda ids, ref, w=w: w.generate("ar", ids, n, gamma)
            systems["llamacpp spec"] = lambda ids, ref, w=w: w.generate(
                "spec", ids, n, gamma, ref=ref)
        for run in systems.values():  # warm-up: first-call allocations, not measured
            run(ids_list[0][:8], None)
        refs = [systems[ref_name](ids, None)["tokens"] for ids in ids_list]  # untimed: "same tokens" for all
        seconds = {name: [] for name in systems}
        count = {name: [] for name in systems}
        same = {name: [] for name in systems}
        extra = {name: [] for name in systems}
        prefill = {name: [] for name in systems}
        with tqdm(total=len(ids_list) * args.repeats * len(systems), desc="peers", unit="gen") as bar:
            order = random.Random(0)
            for _ in range(args.repeats):
                for ids, ref in zip(ids_list, refs):
                    for name in order.sample(list(systems), len(systems)):
                        time.sleep(args.settle)
                        r = systems[name](ids, ref)
                        got = len(r["tokens"]) if "tokens" in r else r["n_tokens"]
                        if got != n and not (got > n and "tokens" not in r):  # llama.cpp spec may overshoot
                            raise SystemExit(f"{name} generated {got} tokens, not {n}")
                        seconds[name].append(r["seconds"])
                        count[name].append(got)
                        same[name].append(r["tokens"] == ref if "tokens" in r
                                          else r.get("text_same_as_ref"))
                        extra[name].append(r.get("stats"))
                        prefill[name].append(r.get("prefill_seconds"))
                        bar.update()
    finally:
        for w in workers.values():
            w.close()
    report["systems"] = summarise(seconds, count, same, extra, prefill)
    if "ortgenai" in workers:
        report["graph_costs"] = {role: graph_costs(engines, prefix, role, cache, args.threads)
                                 for role in ("target", "draft")}
    report["ratios"] = ratios(report["systems"], list(prefix.values()))
    report["ratios_ci95"] = ratio_intervals(seconds, count, report["ratios"])
    report["ratios_median"] = ratios(report["systems"], list(prefix.values()), "median_tokens_per_s")
    report["ratios_decode"] = ratios(report["systems"], list(prefix.values()), "decode_tokens_per_s")
    if not args.skip_claims:
        report["claims"] = claims(list(bundles.values())[-1], args)
        report["claims"]["bundle"] = list(bundles)[-1]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print(markdown(report))


def graph_costs(engines: dict, prefix: dict, role: str, cache: Path, threads: int) -> dict:
    paths = {}
    for lb, e in engines.items():
        spec = e.bundle.model(role)
        if spec.chain_path is not None:  # what every chain runs on; the tree graph serves tree verification
            paths[f"{prefix[lb]} (fused, chain graph)"] = spec.chain_path
            paths[f"{prefix[lb]} (fused, tree graph)"] = spec.path
        else:
            paths[f"{prefix[lb]} ({spec.graph_kind})"] = spec.path
    paths["onnxruntime-genai builder"] = cache / role / "model.onnx"
    return graph_costs_of(paths, threads)


def mjsd_run(engine: Engine, ids: list[int], cfg: GenerationConfig) -> dict:
    t0 = time.perf_counter()
    r = engine.generate(ids, cfg)
    seconds = time.perf_counter() - t0
    s = r.stats
    return {"tokens": r.tokens, "seconds": seconds, "prefill_seconds": s.prefill_time_s,
            "stats": {"rounds": s.rounds, "accepted": s.accepted_tokens, "drafted": s.draft_tokens,
                      "target_s": s.target_time_s, "draft_s": s.draft_time_s, "target_calls": s.target_calls,
                      "draft_calls": s.draft_calls, "wall_s": s.wall_time_s}}


def summarise(seconds: dict, count: dict, same: dict, extra: dict, prefill: dict | None = None) -> dict:
    """Per system: tokens/s = tokens generated / seconds, over all generations; where a system times its prompt
    pass (mjsd, onnxruntime-genai), decode tokens/s = tokens / (seconds - prefill seconds) too."""
    out = {}
    for name, secs in seconds.items():
        total, tokens = sum(secs), sum(count[name])
        pre = (prefill or {}).get(name) or [None]
        s = {"tokens_per_s": tokens / total, "ms_per_token": 1e3 * total / tokens,
             "decode_tokens_per_s": tokens / (total - sum(pre)) if None not in pre else None,
             "median_prefill_ms": 1e3 * statistics.median(pre) if None not in pre else None,
             "median_s": statistics.median(secs), "tokens": tokens,
             # robust to the seconds-long stalls that busy-waiting thread pools (OpenMP, ORT spinning) suffer when
             # another process takes a core on this shared VM
             "median_tokens_per_s": statistics.median(c / t for c, t in zip(count[name], secs))}
        checked = [x for x in same[name] if x is not None]
        if checked:
            s["same_tokens_as_reference"] = sum(checked) / len(checked)
        stats = [e for e in extra[name] if e]
        if stats and "rounds" in stats[0] and "accepted" in stats[0]:  # mjsd
            rounds = sum(e["rounds"] for e in stats)
            s["mean_accepted_length"] = 1 + sum(e["accepted"] for e in stats) / rounds if rounds else None
            wall = sum(e["wall_s"] for e in stats)
            s["share_in_ort"] = (sum(e["target_s"] + e["draft_s"] for e in stats)) / wall
            calls = sum(e["target_calls"] for e in stats)
            s["ms_per_target_call"] = 1e3 * sum(e["target_s"] for e in stats) / calls
            dcalls = sum(e["draft_calls"] for e in stats)
            s["ms_per_draft_call"] = 1e3 * sum(e["draft_s"] for e in stats) / dcalls if dcalls else None
        elif stats and "n_accept" in stats[0]:  # llama-speculative-simple: a round gives accepted + 1 tokens
            s["mean_accepted_length"] = sum(e["n_predict"] for e in stats) / sum(
                e["n_predict"] - e["n_accept"] for e in stats)
            s["reruns_for_lost_logs"] = sum(e.get("retries", 0) for e in stats)
        elif stats:  # onnxruntime-genai get_speculative_stats()
            rounds = sum(e["rounds"] for e in stats)
            s["mean_accepted_length"] = 1 + sum(e["draft_tokens_accepted"] for e in stats) / rounds
            s["ms_per_target_call"] = sum(e["total_target_ms"] for e in stats) / sum(
                e["target_forward_passes"] for e in stats)
            s["ms_per_draft_call"] = sum(e["total_draft_ms"] for e in stats) / sum(
                e["draft_forward_passes"] for e in stats)
        out[name] = s
    return out


def ratios(systems: dict, mjsd: list[str], key: str = "tokens_per_s") -> dict:
    """tokens/s ratios: each mjsd bundle against the peers and its own AR, later bundles against the first."""
    pairs = []
    for p in mjsd:
        pairs += [(f"{p} sps", "hf assisted"), (f"{p} mtad", "hf assisted"), (f"{p} ar", "hf ar"),
                  (f"{p} ar", "ortgenai ar"), (f"{p} mtad", "ortgenai ar"), (f"{p} sps", "ortgenai spec"),
                  (f"{p} mtad", "ortgenai spec"), (f"{p} ar", "llamacpp ar"), (f"{p} mtad", "llamacpp ar"),
                  (f"{p} sps", "llamacpp spec"), (f"{p} mtad", "llamacpp spec"), (f"{p} sps", f"{p} ar"),
                  (f"{p} mtad", f"{p} ar"), (f"{p} mtad-defaults", "ortgenai ar"),
                  (f"{p} mtad-defaults", f"{p} sps")]
    for p in mjsd[1:]:
        pairs += [(f"{p} {a}", f"{mjsd[0]} {a}") for a in ("ar", "sps", "mtad")]
    pairs += [("hf assisted", "hf ar"), ("ortgenai spec", "ortgenai ar"), ("llamacpp spec", "llamacpp ar")]
    return {f"{a} / {b}": systems[a][key] / systems[b][key]
            for a, b in pairs if a in systems and b in systems and systems[a].get(key) and systems[b].get(key)}


def ratio_intervals(seconds: dict, count: dict, keys, draws: int = 2000, seed: int = 0) -> dict:
    """95% bootstrap intervals of the all-generations tokens/s ratios ("A / B" keys): the run's generations resampled
    with replacement in pairs (both systems ran every prompt of every pass). They show how much of a ratio is this
    run's noise; the drift of the machine between runs minutes apart can be wider (BENCHMARKS.md)."""
    rng, out = np.random.default_rng(seed), {}
    for key in keys:
        a, b = key.split(" / ")
        n = len(seconds[a])
        if n != len(seconds[b]) or n < 2:
            continue
        idx = rng.integers(0, n, (draws, n))
        rate = {x: np.asarray(count[x], float)[idx].sum(1) / np.asarray(seconds[x], float)[idx].sum(1) for x in (a, b)}
        out[key] = np.percentile(rate[a] / rate[b], [2.5, 97.5]).tolist()
    return out


def claims(bundle: Path | None, args) -> dict:
    """MTAD vs SpS at T=0 and T=1 (top-k 10, top-p 0.9) with the CPU-time energy estimate."""
    prompts = load_prompts(args.prompts, args.claims_limit)
    est = Engine.from_bundle(bundle, threads=args.threads, meter="estimate")
    configs = []
    for t in (0.0, 1.0):
        samp = dict(temperature=t, top_k=10 if t else 0, top_p=0.9 if t else 1.0, seed=0)
        for a in ("ar", "sps", "mtad"):
            configs.append((f"{a} T={t:g}", GenerationConfig(algo=a, max_new_tokens=args.max_new_tokens,
                                                             gamma=args.gamma, beam_width=args.beam_width,
                                                             tau=args.tau, **PLAIN, **samp)))
    with tqdm(total=len(prompts) * len(configs), desc="claims", unit="gen") as bar:
        summaries = run_bench(est, prompts, configs, on_step=bar.update)
    by = {s["name"]: s for s in summaries}
    out = {"summaries": summaries, "table": format_table(summaries), "prompts": len(prompts)}
    for t in ("0", "1"):
        sps, mtad = by[f"sps T={t}"], by[f"mtad T={t}"]
        out[f"T={t}"] = {"speed-up MTAD vs SpS": mtad["tokens_per_s"] / sps["tokens_per_s"],
                         "energy SpS / MTAD": sps["j_per_token"] / mtad["j_per_token"],
                         "perplexity MTAD vs SpS": mtad["perplexity"] / sps["perplexity"] - 1,
                         "parse rate SpS, MTAD": (sps["parse_rate"], mtad["parse_rate"])}
    return out


def markdown(r: dict) -> str:
    lines = [f"{r['date_utc']} UTC, {r['machine']}, {r['cpu_count']} cores, {r['threads']} threads; "
             f"{json.dumps(r['versions'])}",
             f"{r['prompts']} prompts x {r['max_new_tokens']} new tokens x {r['repeats']} pass(es), greedy, "
             f"gamma {r['gamma']}, mtad W={r['beam_width']} tau={r['tau']}"]
    lines += [f"bundle {label}: {path}" for label, path in r["bundles"].items()]
    for label, w in r.get("weights_max_abs_logit_diff", {}).items():
        lines.append(f"weights check: max |logit diff| mjsd ({label}) vs HF checkpoint: target {w['target']:.2g}, "
                     f"draft {w['draft']:.2g}")
    if "hf_torch_threads" in r:
        lines.append(f"HF runs with {r['hf_torch_threads']} torch thread(s) ({r['peer_threads']})")
    if "llamacpp_threads" in r:
        lines.append(f"llama.cpp runs with {r['llamacpp_threads']} thread(s) ({r['peer_threads']})")
    lines += ["", "| system | tokens/s (all) | tokens/s (median generation) | decode tokens/s | ms/token (all) "
              f"| mean accepted length | ms/target call | ms/draft call | same tokens as {r['reference']} |",
              "|---" * 9 + "|"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for name, s in r["systems"].items():
        lines.append(f"| {name} | {s['tokens_per_s']:.1f} | {s['median_tokens_per_s']:.1f} | "
                     f"{f(s.get('decode_tokens_per_s'), '.1f')} | {s['ms_per_token']:.2f} | "
                     f"{f(s.get('mean_accepted_length'), '.2f')} | {f(s.get('ms_per_target_call'), '.2f')} | "
                     f"{f(s.get('ms_per_draft_call'), '.3f')} | {f(s.get('same_tokens_as_reference'), '.0%')} |")
    if "graph_costs" in r:
        lines += ["", "| graph (1 token, past 128, plain onnxruntime, interleaved) | nodes | fused ops | median ms/call |",
                  "|---|---|---|---|"]
        for role, g in r["graph_costs"].items():
            for name, c in g.items():
                if "error" in c:
                    lines.append(f"| {role}: {name} | - | - | not measured: {c['error']} |")
                    continue
                lines.append(f"| {role}: {name} | {c['nodes']} | {', '.join(c['fused_ops']) or '-'} | "
                             f"{c['ms_per_call']:.3f} |")
    if "llamacpp spec" in r["systems"]:
        lines.append("(llamacpp spec runs as text in and out: its 'same tokens' is same text)")
    lines += ["", "| ratio (tokens/s) | all generations | its 95% interval (resampled generations) | median generation "
              "| decode only (prompt pass excluded) |", "|---|---|---|---|---|"]
    decode, ci = r.get("ratios_decode", {}), r.get("ratios_ci95", {})
    lines += [f"| {k} | {v:.2f}x | {'%.2f-%.2fx' % tuple(ci[k]) if k in ci else '-'} | {r['ratios_median'][k]:.2f}x | "
              f"{f(decode.get(k), '.2f')}{'x' if k in decode else ''} |" for k, v in r["ratios"].items()]
    if "claims" in r:
        c = r["claims"]
        lines += ["", f"Claims (MTAD vs SpS, bundle {c['bundle']}; {c['prompts']} prompts, energy ESTIMATED from "
                  "CPU time):", "",
                  c["table"], "", "| claim | published | T=0 here | T=1 here |", "|---|---|---|---|"]
        for k, pub in CLAIMS.items():
            fmt = "+.1%" if "perplexity" in k else ".2f"
            lines.append(f"| {k} | {format(pub, fmt)} | {format(c['T=0'][k], fmt)} | {format(c['T=1'][k], fmt)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
