"""Plots and the Markdown summary of a profile run (`mjsd profile`, `mjsd report`); matplotlib (the `plot` extra)."""
from __future__ import annotations

import io
from pathlib import Path

from .errors import MjsdError

ALGO_COLORS = {"ar": "#444444", "sps": "#1f77b4", "mtad": "#d62728", "mjsd": "#ff7f0e", "mcsd": "#2ca02c",
               "mjgd": "#9467bd"}
TEMP_MARKERS = ["o", "^", "s", "D", "v", "P"]
MAX_ACCEPTANCE_LINES = 10  # the acceptance plot shows the fastest configurations only, to stay readable


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MjsdError("plots need matplotlib: pip install 'mjsd[plot]'") from None
    return plt


def _save(fig, path: Path) -> None:
    from .sweep import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_atomic(path, buf.getvalue())


def _scatter(ax, results, x, y):
    temps = sorted({r["temperature"] for r in results})
    for r in results:
        ax.scatter(r[x], r[y], color=ALGO_COLORS.get(r["algo"], "#17becf"), s=40, zorder=3,
                   marker=TEMP_MARKERS[temps.index(r["temperature"]) % len(TEMP_MARKERS)],
                   edgecolors="black" if r.get("power_budget_w") is not None else "none")
    handles = [ax.scatter([], [], color=ALGO_COLORS.get(a, "#17becf"), label=a)
               for a in dict.fromkeys(r["algo"] for r in results)]
    handles += [ax.scatter([], [], color="white", edgecolors="black", marker=TEMP_MARKERS[i % len(TEMP_MARKERS)],
                           label=f"T={t:g}") for i, t in enumerate(temps)]
    if any(r.get("power_budget_w") is not None for r in results):
        handles.append(ax.scatter([], [], color="#cccccc", edgecolors="black", label="power budget"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.grid(True, alpha=0.3)


def render_plots(results: list[dict], out: Path) -> list[str]:
    """Write the PNGs a run can support into `out`; return their file names."""
    from .sweep import pareto_front

    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    energy = [r for r in results if r.get("j_per_token") and r.get("speedup_vs_ar") is not None]
    if energy:
        est = " (ESTIMATED: no power sensor)" if any(r.get("energy_estimated") for r in energy) else ""
        fig, ax = plt.subplots(figsize=(8, 5.5))
        _scatter(ax, energy, "j_per_token", "speedup_vs_ar")
        front = [energy[i] for i in pareto_front([(r["j_per_token"], r["speedup_vs_ar"]) for r in energy])]
        ax.plot([r["j_per_token"] for r in front], [r["speedup_vs_ar"] for r in front], "--", color="black",
                lw=1, zorder=2, label="Pareto frontier")
        for r in front:
            ax.annotate(r["name"], (r["j_per_token"], r["speedup_vs_ar"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel(f"J/token{est}")
        ax.set_ylabel("speed-up vs AR (same run, same sampling)")
        ax.set_title("Speed vs energy: dashed = Pareto frontier (faster and cheaper is up-left)")
        _save(fig, out / "speedup_vs_energy.png")
        plt.close(fig)
        written.append("speedup_vs_energy.png")
    quality = [r for r in results if r.get("perplexity") and r.get("speedup_vs_ar") is not None]
    if quality:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        _scatter(ax, quality, "speedup_vs_ar", "perplexity")
        ax.set_xlabel("speed-up vs AR")
        ax.set_ylabel("output perplexity under the target (lower is better)")
        ax.set_title("Quality vs speed")
        _save(fig, out / "perplexity_vs_speedup.png")
        plt.close(fig)
        written.append("perplexity_vs_speedup.png")
    drafted = sorted((r for r in results if r.get("per_position_acceptance")),
                     key=lambda r: -(r.get("speedup_vs_ar") or 0))[:MAX_ACCEPTANCE_LINES]
    if drafted:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        styles, markers, seen = ["-", "--", ":", "-."], "osD^v", {}
        for r in drafted:  # one colour per algorithm; line style and marker tell its configurations apart
            n = seen[r["algo"]] = seen.get(r["algo"], -1) + 1
            acc = r["per_position_acceptance"]
            ax.plot(range(1, len(acc) + 1), acc, styles[n % len(styles)], marker=markers[n % len(markers)],
                    color=ALGO_COLORS.get(r["algo"], "#17becf"), label=r["name"], alpha=0.85)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance (rounds that accepted the token / rounds that drafted it)")
        ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title(f"Acceptance by draft position ({len(drafted)} fastest configurations)")
        _save(fig, out / "acceptance_by_position.png")
        plt.close(fig)
        written.append("acceptance_by_position.png")
    return written


def summary_markdown(doc: dict, plots: list[str]) -> str:
    """The run's Markdown summary: setup, method, one row per configuration, the plots."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    m = doc.get("machine") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    est = doc.get("energy_estimated")
    lines = [f"# Profile run {doc['created_utc']}", "",
             f"- bundle: {doc['bundle'] or 'built-in'}; {doc['prompts']} prompts x {doc['repeats']} repeat(s), "
             f"{doc['warmup']} warm-up generation(s) per configuration; cells {doc['cells_done']}/"
             f"{doc['cells_planned']}{'' if doc['cells_done'] == doc['cells_planned'] else ' (UNFINISHED)'}",
             f"- machine: {m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores), {m.get('system', '?')}; "
             f"providers {', '.join(m.get('providers', []))}; threads {doc['threads'] or 'ORT default'}",
             f"- versions: python {m.get('python', '?')}, {versions}",
             f"- profile: {doc['profile'] or 'none'}; energy source: {', '.join(doc['energy_source']) or 'none'}"
             + (" (ESTIMATED from CPU time: this machine has no power sensor)" if est else "")
             + "".join(f"; DEGRADED: {why}" for why in doc.get("energy_degraded") or []),
             "- method: each configuration is timed interleaved with AR at the same sampling settings over the same "
             "prompts (EOS ignored, same token count); speed-up = its tokens/s / that AR's. Perplexity under the "
             "target at T=1 over the generated tokens; parses = share of completions whose function parses; dup lines = "
             "duplicated-line fraction, distinct-2, next line = next-line exact match and edit sim = edit "
             "similarity of 3 lines against the real held-out code (runtime/bench.py).", "",
             "| configuration | tokens/s | AR tokens/s | speed-up | decode speed-up | accept rate | "
             "mean accepted length | per-position acceptance | output ppl | dup lines | distinct-2 | next line | "
             "edit sim | parses | J/token | avg W |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        pos = " ".join(f"{a:.2f}" for a in r["per_position_acceptance"]) or "-"
        jpt = r.get("j_per_token")
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {f(r.get('ar_tokens_per_s'), '.1f')} | "
                     f"{f(r.get('speedup_vs_ar'), '.2f')}x | {f(r.get('decode_speedup_vs_ar'), '.2f')}x | "
                     f"{f(r.get('acceptance_rate'), '.2f')} | "
                     f"{f(r.get('mean_accepted_length'), '.2f')} | {pos} | {f(r.get('perplexity'), '.2f')} | "
                     f"{f(r.get('dup_line_fraction'), '.2f')} | {f(r.get('distinct_2'), '.2f')} | "
                     f"{f(r.get('next_line_match'), '.0%')} | {f(r.get('edit_similarity'), '.2f')} | "
                     f"{f(r.get('parse_rate'), '.0%')} | {f(jpt, '.4f')}{' (est.)' if jpt and est else ''} | "
                     f"{f(r.get('avg_w'), '.2f')} |")
    if plots:
        lines += [""] + [f"![{p[:-4]}](plots/{p})" for p in plots]
    return "\n".join(lines) + "\n"
