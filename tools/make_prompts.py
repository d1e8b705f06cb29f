"""Write the built-in prompt set: function headers (with their docstrings) from held-out stdlib files.

The files are the validation split of tools/train_builtin.py (never trained on), so the prompts measure the bundle on
code it has not seen. Each prompt is a few lines of the module before a `def` plus the header and its docstring,
like HumanEval; the completion is the body, and "reference" holds the real one (the task metric of runtime/bench.py
compares completions with it). Deterministic: same Python version -> same prompts.

    python tools/make_prompts.py --out runtime/data/prompts.jsonl [--count 32]
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
from pathlib import Path

from train_builtin import corpus_files, is_validation

CONTEXT_LINES = 6  # module lines before the header: imports/class line give the model its bearings


def header_prompts(source: str, rel: str) -> list[dict]:
    """One prompt per function with a docstring: the lines up to the end of its docstring; the rest of the
    function is its reference completion."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc = node.body[0]
        if len(node.body) < 2 or doc.end_lineno - node.lineno > 12:
            continue  # no body to complete, or a docstring too long for a prompt
        start = max(0, node.lineno - 1 - CONTEXT_LINES)
        if node.decorator_list:
            start = max(0, min(start, node.decorator_list[0].lineno - 1))
        out.append({"source": f"{rel}:{node.lineno}", "function": node.name,
                    "prompt": "".join(lines[start:doc.end_lineno]),
                    "reference": "".join(lines[doc.end_lineno:node.end_lineno])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=32)
    args = ap.parse_args()
    root = Path(sysconfig.get_paths()["stdlib"])
    per_file = []
    for rel in corpus_files(root):
        if is_validation(rel):
            prompts = header_prompts((root / rel).read_text(encoding="utf-8", errors="replace"), rel)
            if prompts:
                per_file.append(prompts)
    chosen = []  # round robin over files, so no single module dominates the set
    while len(chosen) < args.count and any(per_file):
        for prompts in per_file:
            if prompts and len(chosen) < args.count:
                chosen.append(prompts.pop(len(prompts) // 2))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in chosen), encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {len(chosen)} prompts from {len(per_file)} held-out files to {args.out}")


if __name__ == "__main__":
    main()
