"""Power-profiling sweeps (`mjsd profile`): algorithms x beam width x gamma x tau x temperature x power budget over a
prompt set, into a run directory that survives interruption.

Method: every cell (one configuration) is timed in its own interleaved pair with AR at the same sampling settings
(runtime/bench.py's run_bench), so its speed-up is a same-run ratio that drift between cells cannot bias; the AR
cells themselves give AR's own quality and energy. Cells run in plan order; each is persisted as it finishes.

Run directory: while the sweep runs it lives in `<dir>.partial/` (plan.json, cells/NNNN.json, each written to a
temp file and renamed); `--resume` continues there without redoing finished cells. When the last cell is done the
results (results.csv, results.json, summary.md, plots/*.png) are written and the directory is renamed to `<dir>`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from .bench import run_bench
from .config import GenerationConfig
from .errors import ConfigError

PLAN = "plan.json"
CELLS = "cells"
PARTIAL = ".partial"
BEAMS = ("mjsd", "mtad", "mjgd")  # algorithms with draft beams
JOINT = ("mjsd", "mtad")  # algorithms with a joint acceptance threshold tau
TUNABLE = ("sps", "mjsd", "mtad")  # algorithms a power budget can steer (runtime/engine.py)
CSV_FIELDS = ("name", "algo", "temperature", "top_k", "top_p", "gamma", "beam_width", "tau", "power_budget_w",
              "tokens", "seconds", "tokens_per_s", "ar_tokens_per_s", "speedup_vs_ar", "acceptance_rate",
              "mean_accepted_length", "tokens_per_target_call", "per_position_acceptance", "perplexity",
              "parse_rate", "dup_line_fraction", "distinct_2", "next_line_match", "edit_similarity",
              "prefill_speedup_vs_ar", "decode_speedup_vs_ar", "j_per_token", "avg_w", "energy_source",
              "energy_estimated", "energy_degraded")


@dataclass(frozen=True)
class Cell:
    name: str
    config: GenerationConfig
    power_budget_w: float | None = None

    def to_dict(self) -> dict:
        cfg = {k: v for k, v in self.config.to_dict().items() if k != "stop"}
        return {"name": self.name, "config": cfg, "power_budget_w": self.power_budget_w}

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(d["name"], GenerationConfig(**d["config"]), d.get("power_budget_w"))


def plan_cells(algos, temperatures, gammas=(4,), beam_widths=(4,), taus=(0.5,), budgets=(), *, top_k=10,
               top_p=0.9, max_new_tokens=64, seed=0, no_repeat_ngram_size=GenerationConfig.no_repeat_ngram_size,
               draft_p_min=GenerationConfig.draft_p_min, tune=False) -> list[Cell]:
    """The grid: each algorithm crossed with the parameters it has; power budgets for the algorithms they steer.
    Online tuning is off by default: a sweep measures each configuration as given.

    AR has none of the draft parameters (one cell per temperature); budgets add cells next to the unbudgeted ones.
    """
    cells = []
    for t, algo in itertools.product(temperatures, algos):
        grid = itertools.product(gammas if algo != "ar" else (4,), beam_widths if algo in BEAMS else (4,),
                                 taus if algo in JOINT else (0.5,),
                                 (None, *budgets) if algo in TUNABLE else (None,))
        for gamma, width, tau, budget in grid:
            cfg = GenerationConfig(algo=algo, temperature=t, top_k=top_k if t else 0, top_p=top_p if t else 1.0,
                                   max_new_tokens=max_new_tokens, gamma=gamma, beam_width=width, tau=tau, seed=seed,
                                   no_repeat_ngram_size=no_repeat_ngram_size, draft_p_min=draft_p_min, tune=tune)
            parts = [algo] + ([f"g={gamma}"] if algo != "ar" else []) + ([f"W={width}"] if algo in BEAMS else []) \
                + ([f"tau={tau:g}"] if algo in JOINT else []) + [f"T={t:g}"] \
                + ([f"P<={budget:g}W"] if budget is not None else [])
            cells.append(Cell(" ".join(parts), cfg, budget))
    if not cells:
        raise ConfigError("the sweep is empty: give at least one algorithm and one temperature")
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError("the sweep repeats a configuration: give each parameter value once")
    return cells


# --- files ---------------------------------------------------------------------------------------------------------

def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file via a temp file in the same directory and os.replace: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def partial_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + PARTIAL)


def find_run(run_dir: str | Path) -> Path:
    """The directory holding a run's plan: `run_dir` itself, or its `.partial` twin while unfinished."""
    p = Path(run_dir).absolute()  # "." or "runs/.." have no name to derive the .partial twin from
    for cand in (p, partial_dir(p)) if not p.name.endswith(PARTIAL) else (p,):
        if (cand / PLAN).is_file():
            return cand
    raise ConfigError(f"{p} is not a profile run directory (no {PLAN} in it or in {partial_dir(p).name})")


def load_plan(run: Path) -> dict:
    try:
        return json.loads((run / PLAN).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {run / PLAN}: {e}") from None


def load_cells(run: Path) -> dict[int, dict]:
    """Finished cells by index."""
    done = {}
    for f in sorted((run / CELLS).glob("*.json")):
        try:
            done[int(f.stem)] = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, json.JSONDecodeError) as e:
            raise ConfigError(f"corrupt cell file {f}: {e}; delete it to recompute that cell") from None
    return done


def machine_info(engine) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("mjsd", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return {"host": platform.node(), "system": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "providers": list(engine.target.providers)}


# --- the sweep -------------------------------------------------------------------------------------------------------

def create_run(run_dir: str | Path, cells: list[Cell], prompts: list[str], *, bundle: str | None, threads=None,
               meter: str | None = "auto", profile: str | None = None, repeats: int = 1, warmup: int = 1,
               force: bool = False, references: list[str | None] | None = None) -> Path:
    """Create `<run_dir>.partial` with the plan (built in a temp dir, then renamed); return its path.
    references: each prompt's real continuation (bench.load_references), for the task metric."""
    final = Path(run_dir)
    part = partial_dir(final)
    if final.exists() or part.exists():
        if not force:
            raise ConfigError(f"{final if final.exists() else part} exists: continue it with --resume, or pass "
                              "--force to start over")
        for p in (final, part):
            shutil.rmtree(p, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    plan = {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bundle": None if bundle is None else str(Path(bundle).resolve()), "threads": threads, "meter": meter,
            "profile": profile, "repeats": repeats, "warmup": warmup, "prompts": prompts, "references": references,
            "cells": [c.to_dict() for c in cells]}
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    (tmp / CELLS).mkdir()
    (tmp / PLAN).write_text(json.dumps(plan, indent=1), encoding="utf-8")
    os.rename(tmp, part)
    return part


def run_sweep(run_dir: str | Path, *, on_cell: Callable[[int, dict], None] | None = None,
              on_step: Callable[[], None] | None = None, on_start: Callable[[int], None] | None = None) -> Path:
    """Run (or continue) the unfinished cells of a run; finish the run directory. Returns the final directory.

    on_start(steps still to do), on_step() per generation, on_cell(index, result) after each persisted cell.
    """
    from .engine import Engine

    run = find_run(run_dir)
    plan = load_plan(run)
    cells = [Cell.from_dict(c) for c in plan["cells"]]
    done = load_cells(run)
    todo = [i for i in range(len(cells)) if i not in done]
    prompts, repeats = plan["prompts"], plan["repeats"]
    if on_start:
        steps = sum(len(prompts) * repeats * (1 if cells[i].config.algo == "ar" else 2) for i in todo)
        on_start(steps)
    engines: dict[float | None, Engine] = {}

    def engine_for(budget):
        if budget not in engines:
            engines[budget] = Engine.from_bundle(plan["bundle"], threads=plan["threads"], meter=plan["meter"],
                                                 profile=plan["profile"], power_budget=budget)
        return engines[budget]

    base = engine_for(None)
    fingerprint = hashlib.sha256(json.dumps(base.bundle.manifest, sort_keys=True).encode()).hexdigest()
    if plan.setdefault("bundle_sha256", fingerprint) != fingerprint:
        raise ConfigError(f"the bundle changed since this run started ({plan['bundle'] or 'built-in'}): its cells "
                          "would not be comparable; start a new run")
    write_atomic(run / PLAN, json.dumps(plan, indent=1))
    machine = machine_info(base)
    for i in todo:
        cell = cells[i]
        ar = replace(cell.config, algo="ar", gamma=4, beam_width=4, tau=0.5)
        pair = [(cell.name, cell.config)] if cell.config.algo == "ar" else [("ar (pair)", ar), (cell.name, cell.config)]
        engines_by_name = {cell.name: engine_for(cell.power_budget_w)}
        summaries = run_bench(base, prompts, pair, on_step=on_step, repeats=repeats, warmup=plan["warmup"],
                              engines=engines_by_name, references=plan.get("references"))
        result = {**summaries[-1], "power_budget_w": cell.power_budget_w, "index": i,
                  "ar_tokens_per_s": summaries[0]["tokens_per_s"],
                  "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine}
        result.pop("texts", None)
        write_atomic(run / CELLS / f"{i:04d}.json", json.dumps(result, indent=1))
        if on_cell:
            on_cell(i, result)
    return finish_run(run)


def collect(run: Path) -> tuple[dict, list[dict]]:
    """The plan and the finished cells' results in plan order."""
    plan = load_plan(run)
    done = load_cells(run)
    return plan, [done[i] for i in sorted(done)]


def results_csv(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow({**r, "per_position_acceptance": " ".join(f"{a:.4f}" for a in r["per_position_acceptance"]),
                    "energy_degraded": "; ".join(r.get("energy_degraded") or [])})
    return buf.getvalue()


def write_results(run: Path) -> list[dict]:
    """results.csv, results.json, summary.md and the plots from the finished cells (each file atomically)."""
    from .report import render_plots, summary_markdown

    plan, results = collect(run)
    machine = results[0]["machine"] if results else None
    sources = sorted({r["energy_source"] for r in results if r.get("energy_source")})
    meta = {k: plan[k] for k in ("created_utc", "bundle", "threads", "meter", "profile", "repeats", "warmup")}
    doc = {**meta, "prompts": len(plan["prompts"]), "cells_planned": len(plan["cells"]), "cells_done": len(results),
           "machine": machine, "energy_source": sources,
           "energy_estimated": any(r.get("energy_estimated") for r in results),
           "energy_degraded": sorted({why for r in results for why in r.get("energy_degraded") or []}),
           "results": [{k: v for k, v in r.items() if k != "machine"} for r in results]}
    write_atomic(run / "results.json", json.dumps(doc, indent=1))
    write_atomic(run / "results.csv", results_csv(results))
    plots = render_plots(results, run / "plots")
    write_atomic(run / "summary.md", summary_markdown(doc, plots))
    return results


def finish_run(run: Path) -> Path:
    """Write the results; when every cell is done, rename `<dir>.partial` to `<dir>`."""
    plan = load_plan(run)
    write_results(run)
    if run.name.endswith(PARTIAL) and len(load_cells(run)) == len(plan["cells"]):
        final = run.with_name(run.name[: -len(PARTIAL)])
        os.rename(run, final)
        return final
    return run


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower cost (x) and higher gain (y), sorted by cost.

    A point is dominated when another has cost <= and gain >= with one of them strict.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
