"""Load test of `mjsd serve` with the official `openai` client: N concurrent clients, a bounded number of requests
and a bounded duration, loopback only.

    flock /tmp/mjsd-bench.lock .venv/bin/python tools/loadtest.py --requests 1000 --concurrency 16 --max-tokens 24

By default it starts `mjsd serve` itself (--bundle, default the built-in one) on a free loopback port and stops it
with SIGTERM at the end; --url (and --server-pid for the memory figures) test a server that is already running.
Every request streams (stream_options.include_usage) a completion of one of --prompts built-in prompts with a seed
fixed per prompt, so all answers to one prompt must be the same text: a response that went to the wrong request,
was cut short, or came twice shows up as `mismatched`, `lost` or `duplicated` (this needs reproducible
generations: pass --extra '{"tune": false}' where the engine tunes gamma online across generations).

Reported: throughput (requests/s, generated tokens/s), TTFT and latency p50/p95/p99 (client side, queueing
included), errors by kind, lost / duplicated / mismatched responses, the server's own request count (/metrics), and
the server's RSS before the load, after it, and its growth over the last 500 requests (sampled every 50).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
from openai import AsyncOpenAI

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RSS_EVERY = 50  # requests between RSS samples


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="Requests in all (default 1000).")
    ap.add_argument("--concurrency", type=int, default=16, help="Concurrent clients (default 16).")
    ap.add_argument("--duration", type=float, default=900.0, help="Stop issuing requests after this many seconds.")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--algo", default="mtad")
    ap.add_argument("--prompts", type=int, default=32, help="Distinct prompts (the built-in held-out set).")
    ap.add_argument("--extra", type=json.loads, default={},
                    help='More request fields as JSON, e.g. \'{"gamma": 6}\' (mjsd extensions).')
    ap.add_argument("--bundle", help="Bundle for the server this tool starts (default: the built-in one).")
    ap.add_argument("--url", help="Test this running server instead (loopback only), e.g. http://127.0.0.1:8080")
    ap.add_argument("--server-pid", type=int, help="With --url: the server's pid, for its memory figures.")
    ap.add_argument("--model", help="Model id (default: the server's first).")
    ap.add_argument("--timeout", type=float, default=120.0, help="Client timeout per request, seconds.")
    ap.add_argument("--json", dest="json_out", help="Also write the results as JSON to this file.")
    return ap.parse_args(argv)


def start_server(bundle: str | None, concurrency: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", "from mjsd.runtime.cli import main; main()", "serve", "--port", str(port),
           "--max-queue", str(max(64, concurrency))] + (["--bundle", bundle] if bundle else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"error: mjsd serve did not start; its log:\n{log.read_text()}")


def server_count(url: str) -> float:
    """Requests the server answered with 200 on /v1/completions, from its /metrics."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('mjsd_requests_total{endpoint="/v1/completions",status="200"}'))


def prompt_set(n: int) -> list[str]:
    from mjsd.runtime.bench import load_prompts

    return load_prompts(limit=n)


async def run(args, url: str, rss) -> dict:
    client = AsyncOpenAI(base_url=url + "/v1", api_key=os.environ.get("MJSD_API_KEY", "none"), max_retries=0,
                         timeout=args.timeout)
    model = args.model or (await client.models.list()).data[0].id
    prompts = prompt_set(args.prompts)
    ids = itertools.count()
    results: list[dict] = []
    rss_samples: list[tuple[int, int]] = [(0, rss())]
    t_end = time.monotonic() + args.duration

    async def one(i: int) -> dict:
        k = i % len(prompts)
        r = {"i": i, "prompt": k, "ids": set(), "text": "", "finishes": 0, "usage": None, "error": None}
        t0 = time.perf_counter()
        try:
            stream = await client.completions.create(
                model=model, prompt=prompts[k], max_tokens=args.max_tokens, temperature=args.temperature, seed=k,
                stream=True, stream_options={"include_usage": True}, extra_body={"algo": args.algo, **args.extra})
            async for c in stream:
                r["ids"].add(c.id)
                for choice in c.choices:
                    if choice.text and "ttft" not in r:
                        r["ttft"] = time.perf_counter() - t0
                    r["text"] += choice.text or ""
                    r["finishes"] += choice.finish_reason is not None
                if c.usage is not None:
                    r["usage"] = c.usage.completion_tokens
        except Exception as e:  # counted by kind
            r["error"] = type(e).__name__ + (f" {e.status_code}" if hasattr(e, "status_code") else "")
        r["latency"] = time.perf_counter() - t0
        return r

    async def worker():
        while time.monotonic() < t_end:
            i = next(ids)
            if i >= args.requests:
                return
            results.append(await one(i))
            if len(results) % RSS_EVERY == 0:
                rss_samples.append((len(results), rss()))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    rss_samples.append((len(results), rss()))
    return {"model": model, "wall_s": wall, "results": results, "rss": rss_samples}


def summarize(args, out: dict, served: float | None) -> dict:
    res = out["results"]
    ok = [r for r in res if r["error"] is None]
    errors = Counter(r["error"] for r in res if r["error"])
    lost = sum(r["finishes"] == 0 or r["usage"] is None for r in ok)  # a stream that ended without its finish
    seen = Counter(i for r in res for i in r["ids"])
    duplicated = sum(r["finishes"] > 1 or len(r["ids"]) > 1 for r in ok) + sum(n > 1 for n in seen.values())
    first: dict[int, str] = {}
    mismatched = sum(first.setdefault(r["prompt"], r["text"]) != r["text"] for r in ok if r["finishes"] == 1)
    tokens = sum(r["usage"] or 0 for r in ok)

    def pct(xs):
        return {f"p{p}": float(np.percentile(xs, p)) * 1e3 for p in (50, 95, 99)} if xs else {}

    rss = out["rss"]
    n = len(res)
    base = [s for s in rss if s[0] <= n - 500]
    growth = (rss[-1][1] - base[-1][1]) / base[-1][1] if base and n >= 500 and base[-1][1] else None
    return {
        "command": " ".join(sys.argv), "model": out["model"], "requests": n, "completed": len(ok),
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "algo": args.algo, "extra": args.extra, "wall_s": out["wall_s"], "requests_per_s": n / out["wall_s"],
        "tokens_per_s": tokens / out["wall_s"], "completion_tokens": tokens,
        "ttft_ms": pct([r["ttft"] for r in ok if "ttft" in r]), "latency_ms": pct([r["latency"] for r in ok]),
        "errors": dict(errors), "lost": lost, "duplicated": duplicated, "mismatched": mismatched,
        "server_counted_200": served,
        "rss_mib": {"before": rss[0][1] / 2**20, "after": rss[-1][1] / 2**20,
                    "at_request": {str(k): round(v / 2**20, 1) for k, v in rss}},
        "rss_growth_last_500": growth,
    }


def table(s: dict) -> str:
    def ms(d):
        return " / ".join(f"{d[k]:.0f}" for k in ("p50", "p95", "p99")) if d else "-"

    g = s["rss_growth_last_500"]
    rows = [("requests (completed)", f"{s['requests']} ({s['completed']})"),
            ("concurrent clients", s["concurrency"]),
            ("max_tokens, temperature, algo", f"{s['max_tokens']}, {s['temperature']:g}, {s['algo']}"),
            ("wall time", f"{s['wall_s']:.1f} s"),
            ("throughput", f"{s['requests_per_s']:.2f} requests/s, {s['tokens_per_s']:.0f} generated tokens/s"),
            ("TTFT p50 / p95 / p99", f"{ms(s['ttft_ms'])} ms"),
            ("latency p50 / p95 / p99", f"{ms(s['latency_ms'])} ms"),
            ("errors", sum(s["errors"].values()) if not s["errors"] else json.dumps(s["errors"])),
            ("lost / duplicated / mismatched responses", f"{s['lost']} / {s['duplicated']} / {s['mismatched']}"),
            ("server's count of 200s (/metrics)", "-" if s["server_counted_200"] is None
             else f"{s['server_counted_200']:.0f}"),
            ("server RSS before -> after load", f"{s['rss_mib']['before']:.1f} -> {s['rss_mib']['after']:.1f} MiB"),
            ("RSS growth over the last 500 requests", "-" if g is None else f"{100 * g:+.2f} %")]
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.duration <= 0:
        sys.exit("error: --requests, --concurrency and --duration must be positive")
    proc = None
    log = Path(tempfile.mkstemp(prefix="mjsd-loadtest-", suffix=".log")[1])
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            sys.exit(f"error: {args.url} is not a loopback address; this tool only loads servers on this machine")
        url, pid = args.url.rstrip("/"), args.server_pid
    else:
        proc, url = start_server(args.bundle, args.concurrency, log)
        pid = proc.pid
    server = psutil.Process(pid) if pid else None

    def rss() -> int:
        return server.memory_info().rss if server else 0

    try:
        before = server_count(url)
        out = asyncio.run(run(args, url, rss))
        s = summarize(args, out, server_count(url) - before)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            print(f"server stopped with exit code {code}; its log: {log}", file=sys.stderr)
    if not pid:
        s["rss_mib"] = None
    print(table(s))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(s, indent=2) + "\n")
    failed = s["errors"] or s["lost"] or s["duplicated"] or s["mismatched"] or s["completed"] < s["requests"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
