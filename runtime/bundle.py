"""The model bundle: a directory with target/, draft/, tokenizer/ and a bundle.json manifest.

This module owns the manifest schema and its validation; it needs no torch and no onnx package.
Layout::

    BUNDLE/bundle.json
    BUNDLE/target/model.onnx (+ model.onnx.data when weights are external)
    BUNDLE/target/chain.onnx (fused models: the chain graph, on model.onnx.data; ModelSpec.chain_path)
    BUNDLE/draft/model.onnx (+ the same)
    BUNDLE/draft/beam.onnx (fused drafts: the chain graph with a beam head, on model.onnx.data; ModelSpec.beam_path)
    BUNDLE/tokenizer/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import BundleError

FORMAT = "mjsd-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
ROLES = ("target", "draft")

# Fields every model entry must carry, with their types.
_MODEL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "path": str,  # the .onnx file, relative to the bundle
    "files": dict,  # relative path -> sha256 for every file of the model (graph + external data)
    "model_type": str,  # HF config.model_type: llama, gpt2, ...
    "num_layers": int,
    "num_kv_heads": int,
    "head_dim": int,
    "vocab_size": int,  # logit width (may exceed the shared vocabulary when padded)
    "max_context": int,
    "dtype": str,  # float32 | float16: dtype of the KV cache inputs
    "inputs": list,
    "outputs": list,
}
# Inputs a fused model's chain graph drops (ModelSpec.chain_path)
CHAIN_DROPS = ("position_ids", "attention_bias")
# What a draft's beam graph adds to its chain graph (ModelSpec.beam_path)
BEAM_INPUTS, BEAM_OUTPUTS = ("beam_k", "beam_bias"), ("beam_logprobs", "beam_ids")
# KV cache dtypes a bundle may declare, and the ONNX Runtime type of their past/present tensors.
KV_DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """One model of a bundle, as the manifest describes it."""

    role: str
    root: Path
    entry: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.root / self.entry["path"]

    @property
    def num_layers(self) -> int:
        return self.entry["num_layers"]

    @property
    def num_kv_heads(self) -> int:
        return self.entry["num_kv_heads"]

    @property
    def head_dim(self) -> int:
        return self.entry["head_dim"]

    @property
    def vocab_size(self) -> int:
        return self.entry["vocab_size"]

    @property
    def max_context(self) -> int:
        return self.entry["max_context"]

    @property
    def dtype(self) -> str:
        return self.entry["dtype"]

    @property
    def inputs(self) -> list[str]:
        return self.entry["inputs"]

    @property
    def outputs(self) -> list[str]:
        return self.entry["outputs"]

    @property
    def tree_attention(self) -> bool:
        """True when the graph takes a 4-D additive attention bias (tree verification)."""
        return bool(self.entry.get("tree_attention", False))

    @property
    def chain_path(self) -> Path | None:
        """A fused model's chain graph (manifest `chain_path`): the same decoder and weights without position_ids
        and attention_bias, which chains do not need (GroupQueryAttention takes the positions from the mask and is
        causal by itself) and which cost ~10% of a 1-token call on CPU. None: the graph at `path` runs everything."""
        rel = self.entry.get("chain_path")
        return self.root / rel if rel else None

    @property
    def chain_inputs(self) -> list[str]:
        """The chain graph's inputs."""
        return [n for n in self.inputs if n not in CHAIN_DROPS]

    @property
    def beam_path(self) -> Path | None:
        """A fused draft's beam graph (manifest `beam_path`): the chain graph with a beam head (inputs beam_k and
        beam_bias, outputs beam_logprobs and beam_ids; export/fused_graph.py). None: beam steps score the logits."""
        rel = self.entry.get("beam_path")
        return self.root / rel if rel else None

    def graph_io(self, graph: str) -> tuple[Path, list[str], list[str]]:
        """(path, inputs, outputs) of the model's "model", "chain" or "beam" graph."""
        if graph == "chain":
            return self.chain_path, self.chain_inputs, self.outputs
        if graph == "beam":
            return self.beam_path, self.chain_inputs + list(BEAM_INPUTS), self.outputs + list(BEAM_OUTPUTS)
        return self.path, self.inputs, self.outputs

    @property
    def graph_kind(self) -> str:
        """"fused" (GroupQueryAttention, shared in-place KV buffer) or "standard" (bundles before graph kinds)."""
        return self.entry.get("graph_kind", "standard")

    def past_names(self) -> list[tuple[str, str]]:
        return [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(self.num_layers)]

    def present_names(self) -> list[tuple[str, str]]:
        return [(f"present.{i}.key", f"present.{i}.value") for i in range(self.num_layers)]


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    target: ModelSpec = field(repr=False)
    draft: ModelSpec = field(repr=False)

    @property
    def vocab_size(self) -> int:
        """The shared vocabulary: slice both models' logits to this width before comparing them."""
        return self.manifest["vocab_size"]

    @property
    def bos_token_id(self) -> int | None:
        return self.manifest.get("bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        return self.manifest.get("eos_token_id")

    @property
    def max_context(self) -> int:
        return min(self.target.max_context, self.draft.max_context)

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["path"]

    def model(self, role: str) -> ModelSpec:
        return {"target": self.target, "draft": self.draft}[role]

    @cached_property
    def tokenizer(self):
        """The parsed tokenizer (load_bundle parses it, so a broken tokenizer.json is refused at load)."""
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as e:  # tokenizers raises a plain Exception with serde's message
            raise BundleError(f"tokenizer {self.manifest['tokenizer']['path']}: the tokenizers library cannot parse "
                              f"it ({_first_line(e)}); the file is corrupt or from an unsupported version, "
                              "re-export the bundle with `mjsd export`") from None

    def load_tokenizer(self):
        return self.tokenizer


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise BundleError(msg)


def validate_manifest(m: Any, where: str = MANIFEST) -> None:
    """Check the manifest's schema; raise BundleError naming the field at fault."""
    _require(isinstance(m, dict), f"{where}: the manifest must be a JSON object")
    _require(m.get("format") == FORMAT, f"{where}: 'format' is {m.get('format')!r}, expected {FORMAT!r}; "
             "is this an mjsd bundle? Create one with `mjsd export`.")
    v = m.get("format_version")
    _require(v == FORMAT_VERSION, f"{where}: format_version {v!r} is not supported (this mjsd reads "
             f"{FORMAT_VERSION}); re-export the bundle with this version of `mjsd export`.")
    for key, typ in (("vocab_size", int), ("models", dict), ("tokenizer", dict), ("provenance", dict)):
        _require(isinstance(m.get(key), typ), f"{where}: field '{key}' is missing or not a {typ.__name__}")
    _require(isinstance(m["tokenizer"].get("path"), str), f"{where}: tokenizer.path is missing")
    _require(isinstance(m["tokenizer"].get("files"), dict), f"{where}: tokenizer.files is missing")
    for role in ROLES:
        e = m["models"].get(role)
        _require(isinstance(e, dict), f"{where}: models.{role} is missing")
        for key, typ in _MODEL_FIELDS.items():
            _require(isinstance(e.get(key), typ) and not isinstance(e.get(key), bool),
                     f"{where}: models.{role}.{key} is missing or not a {getattr(typ, '__name__', typ)}")
        _require(e["vocab_size"] >= m["vocab_size"], f"{where}: models.{role}.vocab_size {e['vocab_size']} "
                 f"is smaller than the shared vocabulary {m['vocab_size']}")
        _require(e["path"] in e["files"], f"{where}: models.{role}.files does not list its graph {e['path']}")
        _require(e["dtype"] in KV_DTYPES, f"{where}: models.{role}.dtype {e['dtype']!r} is not a KV cache dtype this "
                 f"mjsd knows ({', '.join(KV_DTYPES)}); re-export the bundle with this version of `mjsd export`")
        _require(not e.get("tree_attention") or "attention_bias" in e["inputs"], f"{where}: models.{role} claims "
                 "tree_attention but its graph has no attention_bias input; re-export the bundle")
        for key in ("chain_path", "beam_path"):
            if key in e:
                _require(isinstance(e[key], str) and e[key] in e["files"] and e.get("graph_kind") == "fused",
                         f"{where}: models.{role}.{key} must name a listed graph file of a fused model")
        _require("beam_path" not in e or "chain_path" in e, f"{where}: models.{role}.beam_path needs a chain_path")
    _require(m["tokenizer"]["path"] in m["tokenizer"]["files"], f"{where}: tokenizer.files does not list "
             f"tokenizer.path {m['tokenizer']['path']}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unreadable(what: str, rel: str, root: Path, e: OSError) -> BundleError:
    return BundleError(f"{what}: cannot read {rel} in the bundle at {root} ({e.strerror or e}); make the bundle "
                       f"readable (e.g. chmod -R a+rX {root}) or run as a user that may read it")


def resolve_inside(root: Path, rel: Any, what: str) -> Path:
    """The bundle file `rel` names, refused when the name could reach outside the bundle: an absolute path, a '..'
    component, or a path that resolves (through symlinks) outside `root`. Nothing is read; symlinks are only
    followed by resolve(). Every path a bundle names goes through here before any other use."""
    def crafted(why: str) -> str:
        return (f"{what}: {rel!r} {why}; a bundle only names files inside its own directory, so this one is crafted "
                "or corrupt: do not use it, re-export it with `mjsd export`")

    _require(isinstance(rel, str) and rel.strip() != "" and "\0" not in rel, crafted("is not a file name"))
    win = PureWindowsPath(rel)
    _require(not (rel.startswith(("/", "\\")) or win.is_absolute() or win.drive), crafted("is an absolute path"))
    _require(".." not in PurePosixPath(rel.replace("\\", "/")).parts, crafted("contains '..'"))
    path = root / rel
    try:
        real, real_root = path.resolve(), root.resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        raise BundleError(crafted("is a symlink loop")) from None
    _require(real == real_root or real.is_relative_to(real_root),
             crafted(f"resolves through a symlink to {real}, outside the bundle"))
    return path


def _check_symlinks(root: Path) -> None:
    """No symlink anywhere in the bundle leads outside it, listed or not: code that reads a fixed name inside a
    bundle (a chat template beside the tokenizer) cannot be steered outside either."""
    for folder, dirs, files in os.walk(root):  # a symlinked folder is listed in dirs, not entered
        for name in [*dirs, *files]:
            p = Path(folder) / name
            if p.is_symlink():
                resolve_inside(root, p.relative_to(root).as_posix(), "bundle")


def _check_files(root: Path, files: dict[str, str], what: str, verify: bool) -> None:
    for rel, digest in files.items():
        p = resolve_inside(root, rel, what)
        _require(p.is_file(), f"{what}: file {rel} is missing from the bundle at {root}; the bundle is incomplete, "
                 "re-export it with `mjsd export`")
        if verify:
            try:
                ok = sha256_file(p) == digest
            except OSError as e:
                raise _unreadable(what, rel, root, e) from None
            _require(ok, f"{what}: {rel} does not match its sha256 in {MANIFEST} (corrupt or modified file); "
                     "re-export the bundle or restore the file")


# --- external data locations, read from the ONNX protobuf without the onnx package -----------------------------------
# Field numbers of onnx.proto3 on the paths that can hold a TensorProto: tensors may keep their bytes in a file
# named by external_data["location"], relative to the graph's directory.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE, _FUNCTION_NODE = 5, 7
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, (start, end)) of every length-delimited field of one message; other fields are skipped."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise ValueError("a field runs past the end of its message")
            yield key >> 3, (i, i + n)
            i += n
        else:  # groups (3, 4) are not in onnx.proto; anything else is not protobuf
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("the last field runs past the end of its message")


# message kind -> {field number: message kind of that field}
_WALK = {
    "model": {_MODEL_GRAPH: "graph", _MODEL_FUNCTIONS: "function"},
    "function": {_FUNCTION_NODE: "node"},
    "graph": {_GRAPH_NODE: "node", _GRAPH_INITIALIZER: "tensor", _GRAPH_SPARSE_INITIALIZER: "sparse"},
    "node": {_NODE_ATTRIBUTE: "attribute"},
    "attribute": {_ATTR_TENSOR: "tensor", _ATTR_GRAPH: "graph", _ATTR_TENSORS: "tensor", _ATTR_GRAPHS: "graph",
                  _ATTR_SPARSE: "sparse", _ATTR_SPARSES: "sparse"},
    "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
}


def external_data_locations(path: Path) -> list[str]:
    """Every external_data location named by a tensor of the ONNX graph at `path` (initializers, Constant nodes,
    subgraphs, functions). Raises ValueError when the file is not a well-formed protobuf."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            found: list[str] = []
            todo = [("model", 0, len(buf))]
            while todo:
                kind, start, end = todo.pop()
                for num, (a, b) in _fields(buf, start, end):
                    if kind == "tensor":
                        if num == _TENSOR_EXTERNAL_DATA:
                            entry = dict(_fields(buf, a, b))
                            if bytes(buf[slice(*entry.get(_ENTRY_KEY, (0, 0)))]) == b"location":
                                found.append(bytes(buf[slice(*entry.get(_ENTRY_VALUE, (0, 0)))]).decode("utf-8"))
                    elif num in _WALK[kind]:
                        todo.append((_WALK[kind][num], a, b))
            return found


def _check_external_data(root: Path, spec: dict[str, Any], what: str, rel: str) -> None:
    """Each external data file of the graph `rel` must be inside the bundle and listed (hashed) in the manifest."""
    _require((root / rel).is_file(), f"{what}: file {rel} is missing from the bundle at {root}; the bundle is "
             "incomplete, re-export it with `mjsd export`")
    try:
        locations = external_data_locations(root / rel)
    except OSError as e:
        raise _unreadable(what, rel, root, e) from None
    except (ValueError, IndexError, UnicodeDecodeError) as e:  # IndexError: a varint cut by the end of the file
        raise BundleError(f"{what}: {rel} is not a valid ONNX file ({e or 'truncated'}); the file is corrupt, "
                          "re-export the bundle with `mjsd export`") from None
    for loc in locations:
        resolve_inside(root / PurePosixPath(rel).parent, loc, f"{what}: external data of {rel}")
        full = (PurePosixPath(rel).parent / loc).as_posix()
        _require(full in spec["files"], f"{what}: {rel} keeps weights in {loc}, which {MANIFEST} does not list (so "
                 "its sha256 is unchecked); the bundle is crafted or corrupt, re-export it with `mjsd export`")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load and validate a bundle: every path it names stays inside it (checked before anything is read), every
    file is present (and matches its sha256 with `verify`), graphs keep their weights only in listed bundle files,
    and the tokenizer parses. The graphs' I/O is checked against the manifest when a session opens them."""
    root = Path(path).expanduser()
    _require(root.exists(), f"no model bundle at {root}: the path does not exist")
    _require(root.is_dir(), f"{root} is a file; a model bundle is a directory holding {MANIFEST}")
    _require((root / MANIFEST).is_file(), f"{root} is not an mjsd bundle: it has no {MANIFEST}. Create one with "
             "`mjsd export`.")
    mpath = resolve_inside(root, MANIFEST, "manifest")
    _check_symlinks(root)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except OSError as e:
        raise _unreadable("manifest", MANIFEST, root, e) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); the manifest is corrupt, re-export the bundle with "
                          "`mjsd export`") from None
    try:
        validate_manifest(manifest, str(mpath))
    except BundleError as e:  # every refusal names the fix
        msg = str(e)
        raise BundleError(msg if "mjsd export" in msg else f"{msg}; the manifest is corrupt or not mjsd's, re-export "
                          "the bundle with `mjsd export`") from None
    tok = manifest["tokenizer"]
    for what, names in (("tokenizer", [tok["path"], *tok["files"]]),
                        *((f"{r} model", [manifest["models"][r]["path"], *manifest["models"][r]["files"]])
                          for r in ROLES)):
        for rel in names:
            resolve_inside(root, rel, what)
    for role in ROLES:  # the graphs are inside; what they point to is checked before ORT or a hash reads it
        entry = manifest["models"][role]
        for rel in (entry["path"], *(entry[k] for k in ("chain_path", "beam_path") if k in entry)):
            _check_external_data(root, entry, f"{role} model", rel)
    _check_files(root, tok["files"], "tokenizer", verify)
    specs = {}
    for role in ROLES:
        _check_files(root, manifest["models"][role]["files"], f"{role} model", verify)
        specs[role] = ModelSpec(role, root, manifest["models"][role])
    bundle = Bundle(root, manifest, specs["target"], specs["draft"])
    bundle.tokenizer  # noqa: B018 - parse now: a broken tokenizer is a load error, not a first-request error
    return bundle


def check_session_io(spec: ModelSpec, inputs: list, outputs: list, graph: str = "model") -> None:
    """Compare a loaded graph's I/O (graph: the model's "model", "chain" or "beam" graph) with the manifest; refuse a
    mismatched graph with one clear line.

    inputs / outputs: ONNX Runtime's NodeArgs (name, shape, type), or plain names (then only names are checked).
    Checked: the names, the number of KV layers, the KV heads and head_dim of every past/present tensor, their
    dtype, and the logit width, i.e. every manifest dimension the runtime sizes its buffers with."""
    names = {kind: [getattr(a, "name", a) for a in args] for kind, args in (("inputs", inputs), ("outputs", outputs))}
    path, declared_inputs, declared_outputs = spec.graph_io(graph)
    graph = path.name
    for kind, declared in (("inputs", declared_inputs), ("outputs", declared_outputs)):
        missing, extra = sorted(set(declared) - set(names[kind])), sorted(set(names[kind]) - set(declared))
        _require(not missing and not extra, f"{spec.role} model {graph}: graph {kind} do not match the "
                 f"manifest (missing {missing}, unexpected {extra}); the bundle is mismatched, re-export it")

    def mismatch(what: str, manifest_value, graph_value) -> str:
        return (f"{spec.role} model {graph}: the manifest says {what}={manifest_value} but the graph has "
                f"{graph_value}; bundle.json was edited or belongs to another graph, re-export the bundle")

    layers = sum(n.startswith("past_key_values.") and n.endswith(".key") for n in names["inputs"])
    _require(layers == spec.num_layers, mismatch("num_layers", spec.num_layers, layers))
    kv = [a for a in [*inputs, *outputs] if isinstance(getattr(a, "name", a), str) and hasattr(a, "shape")
          and a.name.startswith(("past_key_values.", "present."))]
    for a in kv:  # [batch, kv heads, sequence, head_dim]; symbolic dims (str / None) cannot be checked
        shape = list(a.shape or [])
        _require(len(shape) == 4, mismatch(f"a 4-D {a.name}", "[batch, kv_heads, seq, head_dim]", shape))
        for axis, what, want in ((1, "num_kv_heads", spec.num_kv_heads), (3, "head_dim", spec.head_dim)):
            _require(not isinstance(shape[axis], int) or shape[axis] == want,
                     mismatch(what, want, f"{shape[axis]} ({a.name} {shape})"))
        _require(a.type == KV_DTYPES[spec.dtype], mismatch("dtype", spec.dtype, f"{a.type} ({a.name})"))
    logits = next((a for a in outputs if getattr(a, "name", a) == "logits" and hasattr(a, "shape")), None)
    if logits is not None and logits.shape and isinstance(logits.shape[-1], int):
        _require(logits.shape[-1] == spec.vocab_size, mismatch("vocab_size", spec.vocab_size, logits.shape[-1]))
