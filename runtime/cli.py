"""The `mjsd` command line. Each subcommand is a thin layer over the Python API."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from .config import DEFAULT_GAMMA, GREEDY_JOINT_GAMMA, GenerationConfig
from .errors import MjsdError

# Exit codes (README "Exit codes"): 0 success, 1 error, 2 usage (a bad flag or value), 130 interrupted (Ctrl-C).
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


THREADS_HELP = ("Intra-op threads of the pool the target and the draft share (default: ONNX Runtime's, the physical "
                "cores); MJSD_THREAD_POOL=session gives each model a pool of its own.")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Group(click.Group):
    """The one error path of the CLI: every failure becomes one line on stderr, "error: <cause>; <fix>", and an
    exit code; no traceback unless MJSD_DEBUG=1 (then unexpected errors are re-raised)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_HELP as e:  # plain `mjsd` (click >= 8.2): the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:  # bad flag, value or argument
            hint = f" (see: {e.ctx.command_path} --help)" if e.ctx is not None else ""
            code, line = EXIT_USAGE, f"{_one_line(e.format_message())}{hint}"
        except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            code, line = EXIT_INTERRUPTED, "interrupted"
        except click.ClickException as e:
            code, line = e.exit_code, _one_line(e.format_message())
        except MjsdError as e:
            code, line = EXIT_ERROR, _one_line(e)
        except BrokenPipeError:  # the reader went away (mjsd generate ... | head): not an error worth a line
            sys.stderr.close()
            sys.exit(EXIT_ERROR)
        except OSError as e:  # disk full, permission denied on an output...
            code, line = EXIT_ERROR, _one_line(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}; "
                                               "check the path and its permissions or free space")
        except Exception as e:
            if os.environ.get("MJSD_DEBUG"):
                raise
            code, line = EXIT_ERROR, _one_line(f"internal error ({type(e).__name__}: {e}); this is a bug in mjsd, "
                                               "please report it with the output of MJSD_DEBUG=1 mjsd ...")
        else:
            sys.exit(rv if isinstance(rv, int) else 0)  # --help / --version return their exit code
        click.echo(f"error: {line}", err=True)
        sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mjsd")
def main() -> None:
    """mjsd: energy-aware multi-token joint speculative decoding on ONNX Runtime.

    Exit codes: 0 success, 1 error, 2 usage error, 130 interrupted."""


class _Finite(click.types.FloatParamType):
    """A float option that refuses inf and NaN (click's float accepts both)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        x = super().convert(value, param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return x


FINITE = _Finite()


# --- export / inspect: build and describe bundles -------------------------------------------------------------------

def _bundle_summary(root, manifest: dict) -> dict:
    """The one-object summary `export --json` prints: where the bundle is and what each model is."""
    keys = ("model_type", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "max_context", "dtype",
            "quantization", "num_parameters", "size_bytes", "graph_kind", "tree_attention", "exact_verification")
    models = {}
    for role, e in manifest["models"].items():
        models[role] = {k: e.get(k) for k in keys}
        for k in ("max_abs_diff", "top1_agreement", "skipped"):
            if k in (e.get("validation") or {}):
                models[role][k] = e["validation"][k]
    return {"bundle": str(root), "vocab_size": manifest["vocab_size"], "models": models}


def _guarantee(e: dict) -> str:
    """What a model's logits promise speculative decoding (manifest exact_verification)."""
    exact = e.get("exact_verification")
    if exact:
        return "exact (logits do not depend on how many tokens a call carries: SpS at T=0 == AR)"
    if exact is False:
        return (f"NOT exact ({e.get('quantization') or 'measured'}: logits depend on the call size, so speculative "
                "decoding at T=0 may differ from AR)")
    if "exact_verification" not in e and e.get("quantization") == "int8":  # older bundles: int8 was dynamic
        return "NOT exact (int8 from an mjsd before weight-only int8: dynamic, activations quantized per call)"
    return "not measured (exported without validation, or by an mjsd before the check)"


def _describe_bundle(root, manifest: dict, verified: bool) -> str:
    def mib(n):
        return f"{n / 2**20:.1f} MiB" if n is not None else "?"

    lines = [f"bundle      {root}  (format {manifest['format']} v{manifest['format_version']}, "
             f"sha256 {'verified' if verified else 'not verified'})",
             f"vocabulary  {manifest['vocab_size']} tokens, bos {manifest.get('bos_token_id')}, "
             f"eos {manifest.get('eos_token_id')}, pad {manifest.get('pad_token_id')}  "
             f"({manifest['tokenizer']['path']})"]
    for role, e in manifest["models"].items():
        params = e.get("num_parameters")
        q = e.get("quantization") or "none"
        lines.append(f"{role:<11} {e['model_type']}, {e['num_layers']} layer{'s' * (e['num_layers'] != 1)}, {e.get('num_attention_heads', '?')} "
                     f"heads / {e['num_kv_heads']} KV heads x head_dim {e['head_dim']}, hidden "
                     f"{e.get('hidden_size', '?')}, logits {e['vocab_size']}, max context {e['max_context']}")
        lines.append(f"{'':<11} {params / 1e6 if params else 0:.2f}M params, KV {e['dtype']}, quantization {q}, "
                     f"{mib(e.get('size_bytes'))} ({e['path']}), source {e.get('source', '?')}")
        v = e.get("validation")
        if v and "skipped" in v:
            lines.append(f"{'':<11} not validated: {v['skipped']}")
        elif v:
            lines.append(f"{'':<11} validated vs PyTorch ({v['precision']}): max |logit diff| "
                         f"{v['max_abs_diff']:.2g}, top-1 agreement {v['top1_agreement']:.2f}"
                         + (f"; tree of {len(v['tree']['parents'])} nodes {v['tree']['max_abs_diff']:.2g}"
                            if "tree" in v else "")
                         + (f"; chain graph {v['chain']['max_abs_diff']:.2g}" if "chain" in v else "")
                         + (f"; beam graph {v['beam']['max_abs_diff']:.2g}, its head "
                            f"{v['beam']['beam_head']['max_abs_diff']:.2g}" if "beam" in v else ""))
        if e.get("graph_kind") == "fused":
            lines.append(f"{'':<11} graph kind fused: GroupQueryAttention, KV in a shared in-place buffer, tree "
                         "attention (CPU; CUDA with --fp16 bundles)")
            if e.get("chain_path"):
                lines.append(f"{'':<11} chain graph: {e['chain_path']} (no tree inputs, same weights): what chains run "
                             "on; the tree graph opens on the first token tree")
            if e.get("beam_path"):
                lines.append(f"{'':<11} beam graph: {e['beam_path']} (the chain graph with a beam head, same weights): "
                             "beam search steps of mjsd/mtad get each beam's best children from the draft call")
        else:
            lines.append(f"{'':<11} graph kind standard: standard ONNX ops (every execution provider, TensorRT)")
        if e.get("tree_attention"):
            lines.append(f"{'':<11} tree attention: input attention_bias [B,1,S,past+S] (mmtad, mcsd tree strategy)")
        lines.append(f"{'':<11} verification: {_guarantee(e)}")
    prov = manifest["provenance"]
    for note in prov.get("adjustments") or []:
        lines.append(f"adjusted    {note}")
    versions = ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items() if v)
    lines.append(f"created     {prov.get('created_utc', '?')} by mjsd {prov.get('mjsd_version', '?')}; "
                 f"options {json.dumps(prov.get('options', {}), sort_keys=True)}")
    lines.append(f"versions    {versions}")
    return "\n".join(lines)


@main.command("export")
@click.option("--target", required=True, help="Target checkpoint: a local Hugging Face folder or a hub id.")
@click.option("--draft", required=True, help="Draft checkpoint (must share the target's tokenizer).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to create.")
@click.option("--quantize", type=click.Choice(["int8", "int4", "int8-dynamic"]),
              help="Weights of both models (CPU): int8/int4 weight-only (exact verification), int8-dynamic "
                   "(activations quantized per call: SpS at T=0 no longer token-identical to AR).")
@click.option("--quantize-target", type=click.Choice(["int8", "int4", "int8-dynamic", "none"]),
              help="Override --quantize for the target.")
@click.option("--quantize-draft", type=click.Choice(["int8", "int4", "int8-dynamic", "none"]),
              help="Override --quantize for the draft.")
@click.option("--fp16", is_flag=True, help="fp16 weights and KV cache (GPU).")
@click.option("--max-context", type=click.IntRange(min=1), help="Cap the context length (default: the config's).")
@click.option("--no-validate", is_flag=True, help="Skip the comparison of each graph with PyTorch.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--graph-kind", type=click.Choice(["auto", "fused", "standard"]), default="auto", show_default=True,
              help="fused: ONNX Runtime's fused ops (GroupQueryAttention with rotary inside, fused norms and QKV, a "
                   "shared in-place KV buffer, tree attention built in, plus a chain graph without the tree inputs "
                   "that chains run on; Llama, Mistral, Qwen2: fastest on CPU, and on CUDA with --fp16). standard: "
                   "standard ONNX ops from optimum (every architecture; TensorRT, which fuses them itself). auto: "
                   "fused where the model is supported, else standard (said and recorded).")
@click.option("--tree-attention", is_flag=True, help="Standard kind: export the target with a 4-D attention bias "
              "input, for tree verification (mmtad, mcsd --mcsd-strategy tree); fused graphs always have it.")
@click.option("--json", "as_json", is_flag=True, help="Print a one-object JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def export_cmd(target, draft, out, quantize, quantize_target, quantize_draft, fp16, max_context, no_validate, force,
               graph_kind, tree_attention, as_json, quiet):
    """Export a target and a draft checkpoint into a validated ONNX bundle."""
    import time

    try:
        from mjsd.export import export_bundle
    except ImportError as e:
        raise MjsdError(f"the export stage is not installed ({e}); install it with: pip install 'mjsd[export]'")
    per_model = {"target": quantize, "draft": quantize}
    for role, choice in (("target", quantize_target), ("draft", quantize_draft)):
        if choice is not None:
            per_model[role] = None if choice == "none" else choice
    t0 = time.perf_counter()
    manifest = export_bundle(target, draft, out, quantize=per_model, fp16=fp16, max_context=max_context,
                             validate=not no_validate, force=force, progress=not quiet,
                             tree_attention=tree_attention, graph_kind=graph_kind)
    summary = _bundle_summary(out, manifest)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(_describe_bundle(out, manifest, verified=True))
        click.echo(f"wrote {out} in {summary['seconds']} s", err=True)


@main.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of every file.")
def inspect_cmd(bundle, as_json, no_verify):
    """Describe a bundle (default: the built-in one): models, layers, KV heads, head dim, vocabulary, context, dtype,
    sizes, provenance."""
    from .bundle import load_bundle
    from .engine import builtin_bundle_path

    b = load_bundle(bundle if bundle is not None else builtin_bundle_path(), verify=not no_verify)
    if as_json:
        click.echo(json.dumps({**b.manifest, "verified": not no_verify}, indent=2))
    else:
        click.echo(_describe_bundle(b.root, b.manifest, verified=not no_verify))


# --- power / profiles: check a device's meters, list device profiles (runtime/energy, runtime/profiles) --------------

def _format_modes(profile) -> str:
    return ", ".join(f"{m.name} " + (f"{m.budget_w:g} W" if m.budget_w else "no budget")
                     + (" (default)" if m.name == profile.default_mode else "")
                     for m in profile.modes.values()) or "none"


@main.command("profiles")
@click.argument("name_or_path", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profiles_cmd(name_or_path, as_json):
    """List the bundled device profiles, or validate and show one (a name or a .toml path)."""
    from .profiles import bundled_profiles, load_profile

    if name_or_path:
        p = load_profile(name_or_path)
        if as_json:
            click.echo(json.dumps(p.to_dict(), indent=2))
            return
        c = p.controller
        click.echo(f"{p.name}: {p.description}\n  file        {p.path}\n"
                   f"  meters      {', '.join(p.meters) or 'auto'}; rails {', '.join(p.rails) or '-'}; "
                   f"sampling {p.sample_hz:g} Hz\n"
                   f"  estimate    idle {p.idle_w:g} W, all cores busy {p.active_w:g} W\n"
                   f"  modes       {_format_modes(p)}\n"
                   f"  runtime     {', '.join(p.providers)}; intra-op threads {p.intra_op_threads or 'auto'}, "
                   f"inter-op {p.inter_op_threads or 'auto'}\n"
                   f"  controller  {c.objective}; W {list(c.widths)}, gamma {list(c.gammas)}, start {list(c.start)}, "
                   f"EWMA {c.ewma:g}, dwell {c.dwell_rounds} rounds")
        return
    profiles = [load_profile(name) for name in sorted(bundled_profiles())]
    if as_json:
        click.echo(json.dumps([{"name": p.name, "description": p.description, "meters": list(p.meters),
                                "modes": {m.name: m.budget_w for m in p.modes.values()},
                                "default_mode": p.default_mode} for p in profiles], indent=2))
        return
    for p in profiles:
        click.echo(f"{p.name:<16} {p.description}\n{'':<16} meters {', '.join(p.meters) or 'auto'}; "
                   f"power modes {_format_modes(p)}")


@main.command("power")
@click.option("--profile", "profile_name", help="Device profile (name or .toml path): meter order, estimate watts.")
@click.option("--meter", type=click.Choice(["auto", "jetson", "nvml", "rapl", "estimate"]), default="auto",
              show_default=True, help="Use this meter only (the estimate stays as the fallback).")
@click.option("--duration", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Seconds of live readings (0: detection only).")
@click.option("--hz", type=click.FloatRange(10, 100), help="Sampling rate (default: the profile's, else 50).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--record", "record_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Capture this device's sysfs power tree (values and symlinks) into a .tar.gz test fixture, then exit.")
def power_cmd(profile_name, meter, duration, hz, as_json, record_file):
    """Show the detected power meters and live readings, to check a device before a run."""
    import time

    if record_file is not None:
        from .energy.jetson import nvpmodel_query
        from .energy.record import record

        summary = record(record_file, nvpmodel=nvpmodel_query())
        click.echo(json.dumps(summary, indent=2) if as_json else
                   f"recorded {summary['files']} files and {summary['links']} links under {summary['root']} into "
                   f"{record_file}; replay: extract it and set MJSD_SYSFS_ROOT to the folder")
        return

    from .energy import Sampler, detect
    from .energy.detect import usable
    from .energy.jetson import nvpmodel_query
    from .profiles import load_profile

    profile = load_profile(profile_name) if profile_name else None
    found = detect(meter, profile)
    meters = usable(found, meter)
    out = {"profile": profile.name if profile else None, "nvpmodel": nvpmodel_query(),
           "meters": [d.to_dict() for d in found], "readings": []}
    if profile and profile.rails and meters and "rails" in meters[0].describe():
        missing = sorted(set(profile.rails) - set(meters[0].describe()["rails"]))
        if missing:
            out["missing_rails"] = missing
    if not as_json:
        click.echo(f"profile   {out['profile'] or '(none: automatic detection)'}")
        if out["nvpmodel"]:
            click.echo(f"nvpmodel  {' | '.join(out['nvpmodel'].splitlines())}")
        for d in found:
            detail = json.dumps(d.meter.describe()) if d.meter else d.detail
            click.echo(f"{d.backend:<9} {'ok  ' if d.meter else 'no  '} {detail}")
        if meters and "rule" in meters[0].describe():  # which rails make up the total, and why
            click.echo(f"total     {meters[0].describe()['total']} ({meters[0].describe()['rule']})")
        if out.get("missing_rails"):
            click.echo(f"warning: rails {out['missing_rails']} named by profile {profile.name} are not on this device")
    sampler = Sampler(meters, hz or (profile.sample_hz if profile else 50.0))
    start = prev = sampler.start()
    step, peak = (min(0.5, duration) if duration > 0 else 0), 0.0
    try:
        while step and prev.t - start.t < duration - 1e-3:
            time.sleep(min(step, duration - (prev.t - start.t)))
            mark = sampler.mark()
            r = sampler.last
            reading = {"t": round(mark.t - start.t, 3), "watts": (mark.energy_j - prev.energy_j) / (mark.t - prev.t),
                       "source": sampler.meter.name, "rails": dict(r.rails) if r else {},
                       "carrier": dict(r.carrier) if r else {}, "degraded": r.degraded if r else None}
            out["readings"].append(reading)
            peak = max(peak, mark.peak_w, reading["watts"])  # instantaneous peak for power meters
            if not as_json:
                rails = "  ".join(f"{k} {v:.2f} W" for k, v in reading["rails"].items())
                if reading["carrier"]:
                    rails += "  | carrier " + "  ".join(f"{k} {v:.2f} W" for k, v in reading["carrier"].items())
                label = " (estimated)" if sampler.meter.estimated else " (DEGRADED)" if reading["degraded"] else ""
                click.echo(f"t={reading['t']:5.2f} s  {reading['watts']:7.2f} W{label}  {rails}")
            prev = mark
    finally:
        end = sampler.stop()
        for m in meters:
            m.close()
    seconds = end.t - start.t
    out.update(source=" -> ".join(sampler.sources), estimated=sampler.estimated, seconds=seconds,
               degraded=sampler.degraded,
               energy_j=end.energy_j - start.energy_j, warnings=sampler.warnings,
               avg_w=(end.energy_j - start.energy_j) / seconds if seconds > 0 else None,
               peak_w=peak if out["readings"] else None, peak_basis=sampler.peak_basis)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    elif out["readings"]:
        source = "ESTIMATED (no sensor: CPU-time model)" if out["estimated"] else f"source {out['source']}"
        click.echo(f"{source}: {out['energy_j']:.2f} J in {seconds:.2f} s, average {out['avg_w']:.2f} W, peak "
                   f"{out['peak_w']:.2f} W ({out['peak_basis']})")
    for w in sampler.warnings:
        click.echo(f"warning: {w}", err=True)


# --- generate: stream a completion (runtime/engine.py) ----------------------------------------------------------------

def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from the argument, a file, or stdin ("-" or no argument with piped input)."""
    if prompt is not None and prompt_file is not None:
        raise MjsdError("give the prompt either as an argument or with --file, not both")
    if prompt_file is not None:
        try:
            return _utf8(prompt_file.read_bytes(), f"the prompt file {prompt_file}")
        except OSError as e:
            raise MjsdError(f"cannot read the prompt file {prompt_file}: {e.strerror or e}; check the path and its "
                            "permissions") from None
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return _utf8(sys.stdin.buffer.read(), "the prompt on stdin")
    if prompt is None:
        raise MjsdError('no prompt: pass one as an argument (mjsd generate "def f(x):"), with --file, or on stdin')
    return prompt


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MjsdError(f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                        "first, e.g. iconv -f LATIN1 -t UTF-8") from None


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0", "a": "\a", "b": "\b",
            "f": "\f", "v": "\v", "?": "?"}


def unescape(text: str) -> str:
    """Process backslash escapes as llama.cpp does for --stop / prompts: \\n \\t \\r \\\\ \\' \\" \\xHH; an unknown
    escape is kept as written."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            if nxt == "x" and len(text) >= i + 4 and all(ch in "0123456789abcdefABCDEF" for ch in text[i + 2:i + 4]):
                out.append(chr(int(text[i + 2:i + 4], 16)))
                i += 4
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _stops(ctx, param, value):
    return tuple(unescape(v) for v in value)


def _k_config(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(k) for k in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers, e.g. 2,2,1") from None


def format_stats(stats: dict) -> str:
    """A llama.cpp-style block of the run's statistics."""
    s = stats
    lines = [f"algo {s['algo']}: {s['prompt_tokens']} prompt tokens, {s['generated_tokens']} generated "
             f"({s['finish_reason']})",
             f"prefill  {s['prefill_time_s'] * 1e3:8.1f} ms",
             f"decode   {s['decode_time_s'] * 1e3:8.1f} ms  {s['decode_tokens_per_s']:7.1f} tokens/s  "
             f"(overall {s['tokens_per_s']:.1f} tokens/s, first token after {s['ttft_s'] * 1e3:.1f} ms)",
             f"calls    target {s['target_calls']}, draft {s['draft_calls']}; time in target "
             f"{s['target_time_s']:.3f} s, draft {s['draft_time_s']:.3f} s, orchestration "
             f"{s['orchestration_time_s']:.3f} s"]
    if s["draft_tokens"]:
        per_pos = " ".join(f"{a:.2f}" for a in s["per_position_acceptance"])
        lines.append(f"draft    {s['draft_tokens']} draft tokens, {s['accepted_tokens']} accepted "
                     f"({100 * s['acceptance_rate']:.1f}%), mean accepted length {s['mean_accepted_length']:.2f} "
                     f"over {s['rounds']} rounds; per position {per_pos}")
    e = s.get("energy")
    if e:
        source = "ESTIMATED (no power sensor: CPU-time model)" if e.get("estimated") else f"source {e['source']}"
        jpt = e.get("j_per_token")
        lines.append(f"energy   {e['energy_j']:.3f} J, {jpt if jpt is None else round(jpt, 4)} J/token, avg "
                     f"{e['avg_w']:.2f} W, peak {e['peak_w']:.2f} W ({e.get('peak_basis') or 'samples'}), {source}")
        lines += [f"DEGRADED {why}" for why in e.get("degraded") or []]  # never silent (issue 14)
    if s.get("controller"):
        last = s["controller"][-1]
        label = "budget  " if last.get("budget_w") is not None else "tuning  "  # a power budget, or online tuning
        lines.append(f"{label} {len(s['controller'])} controller decisions; last: {json.dumps(last)}")
    return "\n".join(lines)


@main.command("generate")
@click.argument("prompt", required=False)
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=Path), help="Read the prompt from a file.")
@click.option("--bundle", type=click.Path(path_type=Path), help="Model bundle (default: the built-in one).")
@click.option("--algo", type=click.Choice(["ar", "sps", "mjsd", "mtad", "mmtad", "mcsd", "mjgd"]),
              default=GenerationConfig.algo, show_default=True, help="Decoding algorithm.")
@click.option("-n", "--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens, show_default=True)
@click.option("--temperature", "--temp", type=FINITE, default=GenerationConfig.temperature, show_default=True,
              help="0 = greedy/deterministic.")
@click.option("--top-k", type=int, default=GenerationConfig.top_k, show_default=True, help="0 = off.")
@click.option("--top-p", type=FINITE, default=GenerationConfig.top_p, show_default=True, help="1 = off.")
@click.option("--seed", type=int, help="Seed for sampling (reproducible runs).")
@click.option("--gamma", "--draft-max", "gamma", type=int,
              help="Draft tokens per round (sps, mjsd, mtad; the most, with --draft-p-min or tuning). "
                   f"[default: {GREEDY_JOINT_GAMMA} for mjsd and mtad at temperature 0, else {DEFAULT_GAMMA}]")
@click.option("--beam-width", type=int, default=GenerationConfig.beam_width, show_default=True,
              help="Draft beams (mjsd, mtad, mmtad).")
@click.option("--tau", type=FINITE, default=GenerationConfig.tau, show_default=True,
              help="Joint acceptance threshold in (0, 1].")
@click.option("--draft-p-min", type=FINITE, default=GenerationConfig.draft_p_min, show_default=True,
              help="mjsd, mtad: stop drafting once the best beam's last token has draft probability below this.")
@click.option("--no-repeat-ngram-size", type=int, default=GenerationConfig.no_repeat_ngram_size, show_default=True,
              help="Ban tokens that would repeat an n-gram of the text (ar, sps, mjsd, mtad; 0 = off).")
@click.option("--tune/--no-tune", default=None, help="Adapt gamma and beam width between rounds for tokens/s "
              "(decisions in the stats). Default: on, unless --seed is given (a fixed seed repeats its tokens).")
@click.option("--k-config", callback=_k_config, help="MCSD candidates per depth, e.g. 2,2,1.")
@click.option("--mcsd-replacement/--mcsd-no-replacement", default=False, show_default=True,
              help="MCSD: sample candidates with or without replacement.")
@click.option("--mcsd-strategy", type=click.Choice(["batch", "tree"]), default="batch", show_default=True,
              help="MCSD verification: one batch row per path, or one tree-attention sequence (needs a "
                   "tree-capable bundle: the fused kind, or --tree-attention; a fused target always uses the tree).")
@click.option("--stop", multiple=True, callback=_stops,
              help="Stop after this string (repeatable); escapes like \\n are processed, as in llama.cpp.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-text token.")
@click.option("--stream-interval", type=click.IntRange(min=1), default=8, show_default=True,
              help="AR: tokens decoded before they are streamed (1: each token; a round also ends after 10 ms).")
@click.option("--provider", help="Execution provider preference, comma-separated: tensorrt,cuda,cpu "
              "(default: the profile's, else cpu).")
@click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--fp16", is_flag=True, help="GPU: TensorRT fp16 engines; a float32 fused bundle runs as its fp16 copy "
              "(converted once, cached). The built-in bundle does this by itself.")
@click.option("--profile", help="Device profile (name or .toml path).")
@click.option("--meter", type=click.Choice(["auto", "jetson", "nvml", "rapl", "estimate", "none"]), default="auto",
              show_default=True, help="Energy meter ('none': no energy accounting).")
@click.option("--power-budget", type=FINITE, help="Watts: adapt beam width and gamma to stay under it.")
@click.option("--objective", type=click.Choice(["throughput", "energy"]), help="What the controller optimises.")
@click.option("--stats", "show_stats", is_flag=True, help="Print a statistics block (stderr) after the text.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: text, token ids, stats.")
def generate_cmd(prompt, prompt_file, bundle, algo, max_new_tokens, temperature, top_k, top_p, seed, gamma,
                 beam_width, tau, draft_p_min, no_repeat_ngram_size, tune, k_config, mcsd_replacement, mcsd_strategy,
                 stop, ignore_eos, stream_interval, provider, threads, fp16, profile, meter, power_budget, objective,
                 show_stats, as_json):
    """Complete PROMPT (an argument, --file, or stdin), streaming the text as it is produced."""
    from .engine import Engine

    text = _read_prompt(prompt, prompt_file)
    params = dict(algo=algo, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=seed, gamma=gamma, beam_width=beam_width, tau=tau, draft_p_min=draft_p_min,
                  no_repeat_ngram_size=no_repeat_ngram_size, tune=tune,
                  stop=stop, ignore_eos=ignore_eos, stream_interval=stream_interval, mcsd_replacement=mcsd_replacement,
                  mcsd_strategy=mcsd_strategy)
    if k_config is not None:
        params["k_config"] = k_config
    _share_threads()
    engine = Engine.from_bundle(bundle, provider=provider.split(",") if provider else None, threads=threads, profile=profile,
                                meter=None if meter == "none" else meter, power_budget=power_budget,
                                objective=objective, **({"fp16": True} if fp16 else {}))
    stream = engine.stream(text, **params)
    if as_json:
        for _ in stream:
            pass
        click.echo(json.dumps({"prompt": text, "text": stream.text, "tokens": stream.tokens,
                               "stats": stream.stats.to_dict()}))
        _warn_if_budget_infeasible(stream.stats)
        return
    try:
        for piece in stream:
            click.echo(piece, nl=False)
    except KeyboardInterrupt:  # the text so far and its statistics are still worth showing; exit 130 follows
        stream.stats.finish_reason = stream.stats.finish_reason or "interrupted"
        click.echo()
        if show_stats:
            click.echo(format_stats(stream.stats.to_dict()), err=True)
        raise
    click.echo()
    _warn_if_budget_infeasible(stream.stats)
    if show_stats:
        click.echo(format_stats(stream.stats.to_dict()), err=True)


def _share_threads() -> None:
    """A model command owns its process: the target and the draft share one intra-op pool that spins between calls
    (session.share_thread_pool; BENCHMARKS.md, thread policy). MJSD_THREAD_POOL=session gives each its own."""
    choice = os.environ.get("MJSD_THREAD_POOL", "shared")
    if choice not in ("shared", "session"):
        raise click.UsageError(f"MJSD_THREAD_POOL={choice!r}: use 'shared' (the default) or 'session'")
    if choice == "shared":
        from .session import share_thread_pool

        share_thread_pool()


def _warn_if_budget_infeasible(stats) -> None:
    """One line on stderr when --power-budget could not be met (the cheapest configuration is over it)."""
    from .energy.controller import budget_warning

    if line := budget_warning(stats.controller):
        click.echo(line, err=True)


# --- serve: the OpenAI-compatible HTTP service (runtime/server/) ------------------------------------------------------

@main.command("serve")
@click.option("--bundle", type=click.Path(path_type=Path), help="Model bundle (default: the built-in one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--profile", help="Device profile (name or .toml path).")
@click.option("--power-budget", type=FINITE, help="Watts: adapt beam width and gamma to stay under it.")
@click.option("--api-key", envvar="MJSD_API_KEY", help="Require 'Authorization: Bearer KEY' (env MJSD_API_KEY).")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Generations admitted at once (running or waiting for their turn); more get HTTP 429.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds a request may take, queueing included; then it is cancelled (HTTP 504).")
@click.option("--grace-period", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="On SIGTERM: seconds in-flight requests get to finish before they are cancelled.")
@click.option("--provider", help="Execution provider preference, comma-separated: tensorrt,cuda,cpu.")
@click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--meter", type=click.Choice(["auto", "jetson", "nvml", "rapl", "estimate", "none"]), default="auto",
              show_default=True, help="Energy meter ('none': no energy accounting).")
@click.option("--model-name", help="The model id clients ask for (default: the bundle's folder name, "
              "mjsd-builtin for the built-in bundle).")
def serve_cmd(bundle, host, port, profile, power_budget, api_key, max_queue, timeout, grace_period, provider, threads,
              meter, model_name):
    """Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) plus /health and /metrics."""
    try:
        from .server import Settings, serve
    except ImportError as e:
        raise MjsdError(f"the server is not installed ({e}); install it with: pip install 'mjsd[serve]'")
    from .engine import Engine

    _share_threads()
    engine = Engine.from_bundle(bundle, provider=provider.split(",") if provider else None, threads=threads,
                                profile=profile, meter=None if meter == "none" else meter, power_budget=power_budget)
    serve(engine, host, port, Settings(api_key=api_key, max_queue=max_queue, timeout_s=timeout,
                                       grace_s=grace_period, power_budget=power_budget, model_id=model_name))


# --- bench: algorithms side by side on a prompt set (runtime/bench.py) ------------------------------------------------

@main.command("bench")
@click.option("--bundle", type=click.Path(path_type=Path), help="Model bundle (default: the built-in one).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="JSONL ({\"prompt\": ...} per line) or text (one prompt per line); default: the built-in set of "
                   "held-out stdlib function headers.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N prompts.")
@click.option("--algos", default="ar,sps,mtad", show_default=True,
              help="Comma-separated algorithms; mcsd-tree is mcsd with the tree strategy.")
@click.option("--temperatures", default="0,1", show_default=True, help="Comma-separated temperatures.")
@click.option("--top-k", type=int, default=10, show_default=True, help="top-k at temperature > 0.")
@click.option("--top-p", type=FINITE, default=0.9, show_default=True, help="top-p at temperature > 0.")
@click.option("-n", "--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--gamma", type=int, help=f"[default: {GREEDY_JOINT_GAMMA} for mjsd and mtad at temperature 0, else "
                                        f"{DEFAULT_GAMMA}]")
@click.option("--beam-width", type=int, default=GenerationConfig.beam_width, show_default=True)
@click.option("--tau", type=FINITE, default=GenerationConfig.tau, show_default=True)
@click.option("--draft-p-min", type=FINITE, default=GenerationConfig.draft_p_min, show_default=True)
@click.option("--no-repeat-ngram-size", type=int, default=GenerationConfig.no_repeat_ngram_size, show_default=True)
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Online tuning of gamma and beam width (the Engine keeps learning across the run's generations).")
@click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--meter", type=click.Choice(["auto", "jetson", "nvml", "rapl", "estimate", "none"]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON.")
def bench_cmd(bundle, prompts_file, limit, algos, temperatures, top_k, top_p, max_new_tokens, gamma, beam_width,
              tau, draft_p_min, no_repeat_ngram_size, tune, threads, meter, as_json):
    """Compare algorithms on a prompt set in one interleaved run: tokens/s, speed-up vs AR (end to end, prefill and
    decode apart), acceptance, output perplexity under the target, repetition, the task metric, J/token.

    An entry of --algos may override parameters: "sps:gamma=5:tune=false" (GenerationConfig fields)."""
    from tqdm import tqdm

    from .bench import config_variant, format_table, load_prompts, load_references, run_bench
    from .engine import Engine

    try:
        temps = [float(t) for t in temperatures.split(",")]
        if not all(math.isfinite(t) for t in temps):
            raise ValueError
    except ValueError:
        raise MjsdError(f"--temperatures {temperatures!r} must be comma-separated finite numbers, e.g. 0,1") from None
    algo_list = [a.strip() for a in algos.split(",") if a.strip()]
    configs = [(f"{a} T={t:g}", config_variant(a, GenerationConfig(
        temperature=t, top_k=top_k if t else 0, top_p=top_p if t else 1.0, max_new_tokens=max_new_tokens, gamma=gamma,
        beam_width=beam_width, tau=tau, draft_p_min=draft_p_min, no_repeat_ngram_size=no_repeat_ngram_size,
        tune=tune, seed=0))) for t in temps for a in algo_list]
    prompts = load_prompts(prompts_file, limit)
    _share_threads()
    engine = Engine.from_bundle(bundle, threads=threads, meter=None if meter == "none" else meter)
    with tqdm(total=len(prompts) * len(configs), desc="bench", unit="gen", file=sys.stderr,
              disable=as_json) as bar:
        summaries = run_bench(engine, prompts, configs, on_step=bar.update,
                              references=load_references(prompts_file, limit))
    if as_json:
        click.echo(json.dumps({"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                               "bundle": str(engine.bundle.root), "results": summaries}, indent=2))
        return
    click.echo(f"{len(prompts)} prompts x {max_new_tokens} new tokens (EOS ignored), interleaved, "
               f"bundle {engine.bundle.root}")
    click.echo(format_table(summaries))


# --- profile / report: parameter sweeps into a run directory (runtime/sweep.py, runtime/report.py) --------------------

def _list(kind):
    def parse(ctx, param, value):
        try:
            values = tuple(kind(v) for v in value.split(",") if v.strip()) if value else ()
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__} values") from None
        if kind is float and not all(math.isfinite(v) for v in values):
            raise click.BadParameter(f"{value!r} holds a value that is not a finite number")
        return values
    return parse


@main.command("profile")
@click.option("--out", type=click.Path(path_type=Path), help="Run directory to create (default: runs/profile-<UTC>).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue an interrupted run in this directory; the sweep options are taken from its plan.")
@click.option("--force", is_flag=True, help="Replace an existing run directory at --out.")
@click.option("--bundle", type=click.Path(path_type=Path), help="Model bundle (default: the built-in one).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
              help="JSONL ({\"prompt\": ...} per line) or text (one prompt per line); default: the built-in set.")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N prompts.")
@click.option("--algos", default="ar,sps,mtad", show_default=True, callback=_list(str))
@click.option("--beam-widths", default=str(GenerationConfig.beam_width), show_default=True, callback=_list(int),
              help="For mjsd, mtad, mjgd.")
@click.option("--gammas", default=str(DEFAULT_GAMMA), show_default=True, callback=_list(int))
@click.option("--taus", default=str(GenerationConfig.tau), show_default=True, callback=_list(float),
              help="For mjsd, mtad.")
@click.option("--no-repeat-ngram-size", type=click.IntRange(min=0), default=GenerationConfig.no_repeat_ngram_size,
              show_default=True, help="Repetition control for every cell (AR included).")
@click.option("--draft-p-min", type=FINITE, default=GenerationConfig.draft_p_min, show_default=True,
              help="Adaptive draft length for the mjsd/mtad cells.")
@click.option("--temperatures", default="0,1", show_default=True, callback=_list(float))
@click.option("--budgets", default="", callback=_list(float),
              help="Power budgets in watts for sps/mjsd/mtad (extra cells steered by the controller).")
@click.option("--top-k", type=int, default=10, show_default=True, help="top-k at temperature > 0.")
@click.option("--top-p", type=FINITE, default=0.9, show_default=True, help="top-p at temperature > 0.")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True,
              help="Passes over the prompt set per configuration.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Unmeasured generations per configuration before timing.")
@click.option("--threads", type=click.IntRange(min=1), help=THREADS_HELP)
@click.option("--profile", "device_profile", help="Device profile (name or .toml path): meters, budgets.")
@click.option("--meter", type=click.Choice(["auto", "jetson", "nvml", "rapl", "estimate", "none"]), default="auto",
              show_default=True)
def profile_cmd(out, resume_dir, force, bundle, prompts_file, limit, algos, beam_widths, gammas, taus,
                no_repeat_ngram_size, draft_p_min, temperatures, budgets, top_k, top_p, max_new_tokens, repeats, warmup,
                threads, device_profile, meter):
    """Sweep algorithms x beam width x gamma x tau x temperature (x power budget) over a prompt set; write a run
    directory with results.csv, results.json, summary.md and plots. Interrupted runs continue with --resume."""
    import time

    from tqdm import tqdm

    from .bench import load_prompts, load_references
    from .sweep import create_run, find_run, plan_cells, run_sweep

    if resume_dir is not None:
        if out is not None:
            raise MjsdError("give either --out (a new run) or --resume (an existing one), not both")
        run = find_run(resume_dir)  # refuse a wrong folder before the progress bar starts
    else:
        if budgets and meter == "none":
            raise MjsdError("power budgets need energy readings: do not pass --meter none")
        cells = plan_cells(algos, temperatures, gammas, beam_widths, taus, budgets, top_k=top_k, top_p=top_p,
                           max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size,
                           draft_p_min=draft_p_min)
        prompts = load_prompts(prompts_file, limit)
        out = out or Path("runs") / time.strftime("profile-%Y%m%d-%H%M%S", time.gmtime())
        run = create_run(out, cells, prompts, bundle=bundle, threads=threads,
                         meter=None if meter == "none" else meter, profile=device_profile, repeats=repeats,
                         warmup=warmup, force=force, references=load_references(prompts_file, limit))
        click.echo(f"{len(cells)} configurations x {len(prompts)} prompts x {repeats} repeat(s) -> {run}", err=True)
    bar = tqdm(desc="profile", unit="gen", file=sys.stderr)
    _share_threads()
    try:
        final = run_sweep(run, on_start=lambda n: bar.reset(total=n), on_step=bar.update)
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"interrupted: finished cells are kept; continue with: mjsd profile --resume {run}", err=True)
        sys.exit(130)
    bar.close()
    click.echo((final / "summary.md").read_text(encoding="utf-8"))
    click.echo(f"wrote {final}", err=True)


@main.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
def report_cmd(run_dir):
    """Re-render a profile run's plots, results.csv/json and Markdown summary (also for an unfinished run)."""
    from .sweep import find_run, write_results

    run = find_run(run_dir)
    write_results(run)
    click.echo((run / "summary.md").read_text(encoding="utf-8"))
    click.echo(f"rendered {run}", err=True)
