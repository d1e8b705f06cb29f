"""`export_bundle`: two Hugging Face checkpoints -> one validated mjsd bundle (see mjsd.runtime.bundle for the layout).

Steps: resolve and check both sources, prove the tokenizers identical, export each model's graph, quantize or convert
it, validate it against PyTorch, hash every file, write bundle.json. Everything is built in a temp dir beside `out`
and renamed into place at the end, so a failure at any step leaves nothing at `out`.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mjsd.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST, ROLES, sha256_file, validate_manifest
from mjsd.runtime.errors import ConfigError, ExportError

# int8 / int4: weight-only (MatMulNBits), exact verification; int8-dynamic: activations quantized per call, not exact.
QUANTIZATIONS = (None, "int8", "int4", "int8-dynamic")
_VERSIONED = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers", "numpy")


def require_export_deps() -> None:
    try:
        import onnx  # noqa: F401
        import optimum.exporters.onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ExportError(f"the export stage needs torch, transformers, optimum-onnx and onnx ({e}); "
                          "install them with: pip install 'mjsd[export]'") from None


def per_model_quantization(quantize: str | dict[str, str | None] | None) -> dict[str, str | None]:
    """`quantize` for both models (one of QUANTIZATIONS) or per role ({"target": "int8", "draft": None})."""
    q = dict(quantize) if isinstance(quantize, dict) else {role: quantize for role in ROLES}
    if unknown := set(q) - set(ROLES):
        raise ConfigError(f"quantize: unknown model role(s) {sorted(unknown)}; use 'target' and/or 'draft'")
    for role in ROLES:
        q.setdefault(role, None)
        if q[role] not in QUANTIZATIONS:
            raise ConfigError(f"quantize for the {role}: {q[role]!r} is not supported; use int8, int4 (weight-only, "
                              "exact verification), int8-dynamic (not exact) or none")
    return q


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _check_out(out: Path, force: bool) -> None:
    """Refuse to clobber anything but an existing bundle (and that only with force)."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if out.is_dir() and (out / MANIFEST).is_file():
        if not force:
            raise ExportError(f"{out} already holds a bundle; pass --force (force=True) to replace it")
        return
    raise ExportError(f"{out} exists and is not an mjsd bundle; refusing to overwrite it (choose another --out)")


def _make_readable(root: Path) -> None:
    """mkdtemp and some writers create owner-only files; give the bundle the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


# Work directories beside --out: .<out>.tmp-<pid>-* (the bundle being built) and .<out>.old-<pid>-* (the previous
# bundle, for the instant of the swap). One is stale when the process named by <pid> is gone, or when it is older than
# STALE_S (a reused pid, or a name without a pid from an older mjsd); an export takes minutes, not a day.
STALE_S = 24 * 3600


def _work_dir(out: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))


def _stale(path: Path, now: float) -> bool:
    try:
        if now - path.lstat().st_mtime > STALE_S:
            return True
    except FileNotFoundError:
        return False
    pid = path.name.rsplit(".", 1)[-1].split("-")[1]  # ".<out>.tmp-<pid>-<random>"
    if not pid.isdigit() or os.name != "posix":  # no pid (older mjsd), or no kill(pid, 0) to ask: age only
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clean_stale(out: Path) -> list[str]:
    """Remove what killed exports left beside `out` (see STALE_S); when `out` is missing but a stale .old-* holds
    its previous bundle (an export killed between the two renames of _install), put that bundle back. Returns one
    line per action, for the user."""
    import time

    done, now = [], time.time()
    for kind in ("old", "tmp"):  # old first: a restored bundle is then not mistaken for an empty --out
        for d in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            if not d.is_dir() or d.is_symlink() or not _stale(d, now):
                continue
            if kind == "old" and (d / "bundle" / MANIFEST).is_file() and not out.exists() and not out.is_symlink():
                os.replace(d / "bundle", out)
                done.append(f"restored the bundle at {out} from {d.name} (left by an interrupted export)")
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed {d.name}, left by an interrupted export")
    return done


def _install(tmp: Path, out: Path) -> None:
    """Move the finished bundle into place; `out` never ends up without a bundle when it held one.

    The old bundle is renamed aside, the new one renamed in, and the old one deleted only then; a failure or an
    interrupt between the two renames puts the old one back (SIGINT/SIGTERM are held during the swap anyway). A
    process killed outright between them leaves the old bundle in .<out>.old-<pid>-*/bundle, which the next export
    restores (clean_stale)."""
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    aside = _work_dir(out, "old")
    with _signals_held():
        os.replace(out, aside / "bundle")
        try:
            os.replace(tmp, out)
        except BaseException:
            try:
                os.replace(aside / "bundle", out)
            except OSError as e:
                raise ExportError(f"installing {out} failed and the previous bundle could not be put back ({e}); "
                                  f"it is in {aside / 'bundle'}: move it to {out}") from None
            shutil.rmtree(aside, ignore_errors=True)
            raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def _signals_held():
    """Defer SIGINT/SIGTERM for the few microseconds of a swap (main thread only; elsewhere signals reach the main
    thread anyway)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@dataclass
class _Checkpoint:
    role: str
    given: str  # as the user passed it
    path: Path  # local folder (a hub id resolves to its snapshot)
    config: Any
    dims: dict[str, Any]
    max_context: int


def _adjust(adjustments: list[str], what: str) -> None:
    """Record a change the export makes to what was asked or given (manifest provenance.adjustments), and say it."""
    adjustments.append(what)
    print(f"export: note: {what}", file=sys.stderr)


def _read_sources(given: dict[str, str], max_context: int | None, adjustments: list[str]):
    """Check both checkpoints and their shared tokenizer before any expensive step."""
    from . import sources, tokenizer_check

    paths = {r: sources.resolve_source(given[r], r) for r in ROLES}
    configs = {r: sources.load_config(paths[r], r) for r in ROLES}
    for r in ROLES:
        sources.check_causal_lm(configs[r], r)
    toks = {r: tokenizer_check.load_tokenizer(paths[r], r) for r in ROLES}
    tokenizer_check.check_same_tokenizer(toks["target"], toks["draft"])
    vocab = tokenizer_check.vocab_size(toks["target"])
    ckpts = {}
    for r in ROLES:
        dims = sources.config_dims(configs[r])
        if dims["vocab_size"] < vocab:
            raise ExportError(f"{r} model has {dims['vocab_size']} logits but the tokenizer has {vocab} ids; "
                              "the checkpoint and its tokenizer do not belong together")
        if dims["vocab_size"] > vocab:
            _adjust(adjustments, f"{r} has {dims['vocab_size']} logits for {vocab} token ids: the padded columns "
                                 "are dropped at run time")
        pos = sources.max_positions(configs[r])
        if pos is None and max_context is None:
            raise ExportError(f"{r} config declares no maximum position count; pass --max-context")
        ctx = min(x for x in (pos, max_context) if x is not None)
        if max_context is not None and ctx < max_context:
            _adjust(adjustments, f"{r} max_context capped from {max_context} to {ctx}: the config's "
                                 "max_position_embeddings")
        ctx = sources.cap_context(configs[r], ctx, r, lambda what: _adjust(adjustments, what))
        ckpts[r] = _Checkpoint(r, given[r], paths[r], configs[r], dims, ctx)
    return ckpts, toks["target"], vocab


def _export_model(ck: _Checkpoint, bundle: Path, quantization: str | None, fp16: bool, validate: bool, vocab: int,
                  steps, tree_attention: bool = False, kind: str = "standard") -> dict[str, Any]:
    """Build, transform and validate one model's graph into bundle/<role>/; return its manifest entry.
    kind "fused" (fused_graph.py: GroupQueryAttention, tree-capable) or "standard" (optimum's graph, or with
    tree_attention the graph that takes a 4-D attention bias, tree_graph.py); tree-capable graphs are validated on a
    token tree too."""
    from . import fused_graph, graph, sources, tree_graph
    from .validate import (exact_verification, reference_logits, sample_ids, sample_tree_ids, validate_graph,
                           validation_lengths)

    r, fused = ck.role, kind == "fused"
    tree_attention = tree_attention or fused
    lengths = validation_lengths(ck.config, ck.max_context)
    ids = sample_ids(vocab, lengths)
    tree_ids = sample_tree_ids(vocab, lengths) if tree_attention else None
    steps.set_description_str(f"{r}: exporting the {kind} graph")
    work = Path(tempfile.mkdtemp(prefix=f"{r}-raw-", dir=bundle))
    if fused:  # emitted in its final precision: fp16 for CUDA (GroupQueryAttention has no fp32 CUDA kernel)
        # gate and up in one MatMul for a draft (one token a call) and for a graph to quantize (its quantizer wants
        # every MatMul weight as an initializer); a target's two MatMuls over slices of them are faster on its calls
        raw = fused_graph.build_fused_graph(ck.path, work, ck.max_context, fp16=fp16, beam_head=r == "draft",
                                            packed_mlp=r == "draft" or quantization is not None)
    else:
        raw = (tree_graph.build_tree_graph if tree_attention else graph.build_decoder_graph)(ck.path, work)
    steps.update()
    model_dir = bundle / r
    model_dir.mkdir()
    final = model_dir / graph.GRAPH
    precision = "fp16" if fp16 else (quantization or "fp32")
    steps.set_description_str(f"{r}: {precision}")
    if quantization:
        graph.quantize(raw, final, quantization)
    elif fp16 and not fused:
        graph.convert_fp16(raw, final)
    else:
        for p in graph.graph_files(raw):
            os.replace(p, model_dir / p.name)
    # a fused graph's chain graph shares its weights file; a quantized graph has new weights, so it has none
    chain = model_dir / fused_graph.CHAIN_GRAPH if fused and not quantization else None
    beam = model_dir / fused_graph.BEAM_GRAPH if chain is not None and r == "draft" else None  # its beam head
    for extra in (chain, beam):
        if extra is not None:
            os.replace(work / extra.name, extra)
    shutil.rmtree(work)
    (model_dir / "config.json").write_text(ck.config.to_json_string(), encoding="utf-8")
    steps.update()

    io = graph.read_io(final)
    # The graph is the truth for the KV layout; a disagreeing config means the exporter read it differently.
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if io[key] != ck.dims[key]:
            raise ExportError(f"{r} graph has {key}={io[key]} but its config says {ck.dims[key]}; "
                              "the exporter does not support this architecture's attention layout")
    validation = None
    if validate:
        steps.set_description_str(f"{r}: validating against PyTorch")
        if tree_attention:
            ref, tree_ref = reference_logits(ck.path, ids, tree_ids, lengths["tree_context"])
            validation = validate_graph(final, io, ref, ids, precision, r, (tree_ids, tree_ref), lengths)
        else:
            ref = reference_logits(ck.path, ids)
            validation = validate_graph(final, io, ref, ids, precision, r, lengths=lengths)
        if chain is not None:  # the chain graph runs every chain: validated on its own
            validation["chain"] = validate_graph(chain, graph.read_io(chain), ref, ids, precision, r, lengths=lengths)
        if beam is not None:  # so does the beam graph, and its head against NumPy
            validation["beam"] = validate_graph(beam, graph.read_io(beam), ref, ids, precision, r, lengths=lengths)
    steps.update()
    extras = [p for p in (chain, beam) if p is not None]
    files = [*graph.graph_files(final), *extras, model_dir / "config.json"]
    return {"path": f"{r}/{graph.GRAPH}", "files": {f"{r}/{p.name}": sha256_file(p) for p in files},
            **({"chain_path": f"{r}/{chain.name}"} if chain is not None else {}),
            **({"beam_path": f"{r}/{beam.name}"} if beam is not None else {}),
            "model_type": ck.config.model_type, "num_layers": io["num_layers"], "num_kv_heads": io["num_kv_heads"],
            "head_dim": io["head_dim"], "num_attention_heads": ck.dims["num_attention_heads"],
            "hidden_size": ck.dims["hidden_size"], "vocab_size": ck.dims["vocab_size"],
            "max_context": ck.max_context, "dtype": io["dtype"], "inputs": io["inputs"], "outputs": io["outputs"],
            "num_parameters": sources.count_parameters(ck.config), "quantization": quantization, "fp16": fp16,
            "size_bytes": sum(p.stat().st_size for p in files), "source": ck.given, "validation": validation,
            "tree_attention": tree_attention, "graph_kind": kind,
            "exact_verification": validation.get("exact_verification") if validation else
            exact_verification(precision, None)}


GRAPH_KINDS = ("auto", "fused", "standard")


def _graph_kinds(ckpts: dict[str, _Checkpoint], graph_kind: str, adjust) -> dict[str, str]:
    """The graph kind of each model: "auto" picks fused where the fused builder supports the model."""
    from .fused_graph import unsupported_reason

    if graph_kind not in GRAPH_KINDS:
        raise ConfigError(f"graph kind {graph_kind!r} is unknown; use one of {', '.join(GRAPH_KINDS)}")
    kinds = {}
    for r, ck in ckpts.items():
        why = unsupported_reason(ck.config, ck.max_context) if graph_kind != "standard" else None
        if why and graph_kind == "fused":
            raise ExportError(f"{r}: the fused graph kind does not support {why}; export with --graph-kind standard "
                              "(or auto)")
        if why:
            adjust(f"{r}: standard graph kind, the fused builder does not support {why}")
        kinds[r] = "standard" if why or graph_kind == "standard" else "fused"
    return kinds


def export_bundle(target: str | Path, draft: str | Path, out: str | Path, *,
                  quantize: str | dict[str, str | None] | None = None, fp16: bool = False,
                  max_context: int | None = None, validate: bool = True, force: bool = False,
                  progress: bool = True, tree_attention: bool = False, graph_kind: str = "auto") -> dict[str, Any]:
    """Export a target and a draft checkpoint (local folders or hub ids) into a bundle at `out`; return its manifest.

    quantize: "int8" / "int4" (weight-only, MatMulNBits: exact verification), "int8-dynamic" (activations quantized
    per call: SpS at T=0 no longer token-identical to AR) for both, or {"target": "int8", "draft": None} per model.
    fp16: fp16 weights and KV cache, for GPU. max_context: cap on the context (default: the config's positions).
    validate: compare every graph with PyTorch (prefill + multi-token decode) and refuse a mismatch.
    force: replace an existing bundle at `out`. progress: a progress line on stderr.
    tree_attention: export the target as a tree-attention graph (4-D additive bias, explicit positions) for tree
    verification (mmtad, mcsd with mcsd_strategy="tree"); the draft keeps the standard graph.
    graph_kind: "fused" (ONNX Runtime's fused ops, GroupQueryAttention with an in-place KV buffer and tree input:
    fastest on CPU and CUDA, Llama-family models), "standard" (standard ONNX ops: every architecture, and TensorRT,
    which fuses them itself), or "auto" (default: fused where the model is supported, else standard, said and
    recorded).
    """
    from tqdm import tqdm

    from .graph import OPSET
    from .sources import TASK

    quant = per_model_quantization(quantize)
    if fp16 and any(quant.values()):
        raise ConfigError("--fp16 and --quantize do not combine (int8/int4 are for CPU, fp16 for GPU); pick one")
    if max_context is not None and max_context < 1:
        raise ConfigError(f"max_context must be a positive number of tokens, got {max_context}")
    out = Path(out).expanduser().absolute()
    if out.parent.is_dir():
        for line in clean_stale(out):
            print(f"export: {line}", file=sys.stderr)
    _check_out(out, force)
    if not out.parent.is_dir():
        raise ExportError(f"cannot write the bundle: the folder {out.parent} does not exist")
    require_export_deps()
    given = {"target": str(target), "draft": str(draft)}

    steps = tqdm(total=2 + 3 * len(ROLES), desc="export", file=sys.stderr, disable=not progress,
                 bar_format="export [{n_fmt}/{total_fmt} {elapsed}] {desc}")
    try:
        steps.set_description_str("checking sources")
        adjustments: list[str] = []
        ckpts, tok, vocab = _read_sources(given, max_context, adjustments)
        kinds = _graph_kinds(ckpts, graph_kind, lambda what: _adjust(adjustments, what))
        steps.update()
        tmp = _work_dir(out, "tmp")
        try:
            steps.set_description_str("saving tokenizer")
            tok.save_pretrained(tmp / "tokenizer")
            tok_files = {f"tokenizer/{p.name}": sha256_file(p) for p in sorted((tmp / "tokenizer").iterdir())}
            steps.update()
            models = {r: _export_model(ckpts[r], tmp, quant[r], fp16, validate, vocab, steps,
                                       tree_attention and r == "target", kinds[r]) for r in ROLES}
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION,
                "vocab_size": vocab,
                "vocab_padded": any(models[r]["vocab_size"] != vocab for r in ROLES),
                "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None
                else getattr(ckpts["target"].config, "bos_token_id", None),
                "eos_token_id": tok.eos_token_id if tok.eos_token_id is not None
                else getattr(ckpts["target"].config, "eos_token_id", None),
                "pad_token_id": tok.pad_token_id,
                "tokenizer": {"path": "tokenizer/tokenizer.json", "files": tok_files},
                "models": models,
                "provenance": {
                    "sources": given, "resolved": {r: str(ckpts[r].path) for r in ROLES},
                    "mjsd_version": _version("mjsd"), "versions": {d: _version(d) for d in _VERSIONED},
                    "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "options": {"quantize": quant, "fp16": fp16, "max_context": max_context, "validate": validate,
                                "opset": OPSET, "task": TASK,
                                "tree_attention": tree_attention, "graph_kind": graph_kind},
                    "adjustments": adjustments,
                },
            }
            validate_manifest(manifest)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            steps.set_description_str("done")
            _make_readable(tmp)
            _check_out(out, force)  # something may have appeared there meanwhile
            _install(tmp, out)
            return manifest
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        steps.close()
