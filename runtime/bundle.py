"""The model bundle: a directory with target/, draft/, tokenizer/ and a bundle.json manifest.

This module owns the manifest schema and its validation; it needs no torch and no onnx package.
Layout::

    BUNDLE/bundle.json
    BUNDLE/target/model.onnx (+ model.onnx.data when weights are external)
    BUNDLE/draft/model.onnx
    BUNDLE/tokenizer/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
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

    def load_tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))


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
        _require(not e.get("tree_attention") or "attention_bias" in e["inputs"], f"{where}: models.{role} claims "
                 "tree_attention but its graph has no attention_bias input; re-export the bundle")


def _check_files(root: Path, files: dict[str, str], what: str, verify: bool) -> None:
    for rel, digest in files.items():
        p = root / rel
        _require(p.is_file(), f"{what}: file {rel} is missing from the bundle at {root}; the bundle is incomplete, "
                 "re-export it with `mjsd export`")
        if verify:
            _require(sha256_file(p) == digest, f"{what}: {rel} does not match its sha256 in {MANIFEST} (corrupt or "
                     "modified file); re-export the bundle or restore the file")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Load and validate a bundle. `verify` checks every file's sha256 (cheap next to loading the graphs)."""
    root = Path(path).expanduser()
    _require(root.exists(), f"no model bundle at {root}: the path does not exist")
    _require(root.is_dir(), f"{root} is a file; a model bundle is a directory holding {MANIFEST}")
    mpath = root / MANIFEST
    _require(mpath.is_file(), f"{root} is not an mjsd bundle: it has no {MANIFEST}. Create one with `mjsd export`.")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON ({e}); the manifest is corrupt, re-export the bundle") from None
    validate_manifest(manifest, str(mpath))
    _check_files(root, manifest["tokenizer"]["files"], "tokenizer", verify)
    specs = {}
    for role in ROLES:
        _check_files(root, manifest["models"][role]["files"], f"{role} model", verify)
        specs[role] = ModelSpec(role, root, manifest["models"][role])
    return Bundle(root, manifest, specs["target"], specs["draft"])


def check_session_io(spec: ModelSpec, input_names: list[str], output_names: list[str]) -> None:
    """Compare a loaded graph's I/O names with the manifest's; refuse a mismatched graph clearly."""
    for kind, declared, actual in (("inputs", spec.inputs, input_names), ("outputs", spec.outputs, output_names)):
        missing, extra = sorted(set(declared) - set(actual)), sorted(set(actual) - set(declared))
        _require(not missing and not extra, f"{spec.role} model {spec.path.name}: graph {kind} do not match the "
                 f"manifest (missing {missing}, unexpected {extra}); the bundle is mismatched, re-export it")
