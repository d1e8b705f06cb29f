"""Load the checkpoints' tokenizers and prove the target's and the draft's are the same tokenizer.

Speculative decoding compares token ids across the two models, so the tokenizers must be identical: same vocabulary
and merges, same added/special tokens, same normalizer/pre-tokenizer/post-processor/decoder, same bos/eos. Comparing
vocabulary sizes is not enough (and a padded logit width is not a difference).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mjsd.runtime.errors import ExportError

from .sources import reason

# Runtime settings saved in tokenizer.json that do not change how text maps to ids.
_IGNORED = ("truncation", "padding", "version")


def load_tokenizer(path: Path, role: str):
    """The checkpoint's fast tokenizer (the runtime reads its tokenizer.json with the `tokenizers` library)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ExportError(f"{role} checkpoint {path}: cannot load its tokenizer ({reason(e)}); the checkpoint "
                          "needs tokenizer files") from None
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{role} checkpoint {path}: its tokenizer has no fast (tokenizer.json) version, which the "
                          "mjsd runtime needs; convert it with transformers and save it with save_pretrained")
    return tok


def normalized(tok) -> dict[str, Any]:
    """tokenizer.json content that defines the text<->id mapping, plus the bos/eos ids."""
    d = json.loads(tok.backend_tokenizer.to_str())
    for key in _IGNORED:
        d.pop(key, None)
    d["added_tokens"] = sorted(d.get("added_tokens") or [], key=lambda t: t["id"])
    d["bos_token_id"] = tok.bos_token_id
    d["eos_token_id"] = tok.eos_token_id
    return d


def _short(x: Any, n: int = 120) -> str:
    s = json.dumps(x, sort_keys=True) if not isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def _vocab_diff(t: dict[str, int], d: dict[str, int]) -> str | None:
    for tok, i in sorted(t.items(), key=lambda kv: kv[1]):
        if tok not in d:
            return f"token {tok!r} (id {i} in the target) is missing from the draft"
        if d[tok] != i:
            return f"token {tok!r} has id {i} in the target, {d[tok]} in the draft"
    for tok, i in sorted(d.items(), key=lambda kv: kv[1]):
        if tok not in t:
            return f"token {tok!r} (id {i} in the draft) is missing from the target"
    return None


def first_difference(target: dict[str, Any], draft: dict[str, Any]) -> str | None:
    """Describe the first difference between two `normalized` tokenizers, or None when they are identical."""
    tm, dm = target.get("model") or {}, draft.get("model") or {}
    if tm.get("type") != dm.get("type"):
        return f"tokenizer model type is {tm.get('type')!r} in the target, {dm.get('type')!r} in the draft"
    tv, dv = tm.get("vocab"), dm.get("vocab")
    if isinstance(tv, list) and isinstance(dv, list):  # Unigram: [[piece, score], ...]
        tv, dv = {p[0]: i for i, p in enumerate(tv)}, {p[0]: i for i, p in enumerate(dv)}
    if isinstance(tv, dict) and isinstance(dv, dict) and (diff := _vocab_diff(tv, dv)):
        return diff
    tmer, dmer = tm.get("merges") or [], dm.get("merges") or []
    for i, (a, b) in enumerate(zip(tmer, dmer)):
        if a != b:
            return f"merge #{i} is {_short(a)} in the target, {_short(b)} in the draft"
    if len(tmer) != len(dmer):
        return f"the target has {len(tmer)} merges, the draft {len(dmer)}"
    ta = {t["id"]: t for t in target.get("added_tokens", [])}
    da = {t["id"]: t for t in draft.get("added_tokens", [])}
    for i in sorted(set(ta) | set(da)):
        if ta.get(i) != da.get(i):
            return f"added token id {i} is {_short(ta.get(i))} in the target, {_short(da.get(i))} in the draft"
    for key in sorted(set(tm) | set(dm)):
        if key not in ("vocab", "merges") and tm.get(key) != dm.get(key):
            return f"tokenizer model.{key} is {_short(tm.get(key))} in the target, {_short(dm.get(key))} in the draft"
    for key in sorted(set(target) | set(draft)):
        if key not in ("model", "added_tokens") and target.get(key) != draft.get(key):
            return f"{key} is {_short(target.get(key))} in the target, {_short(draft.get(key))} in the draft"
    return None


def check_same_tokenizer(target_tok, draft_tok) -> None:
    if diff := first_difference(normalized(target_tok), normalized(draft_tok)):
        raise ExportError(f"the target and draft tokenizers differ: {diff}. Speculative decoding needs one shared "
                          "tokenizer; pick a draft from the same model family (same tokenizer.json)")


def vocab_size(tok) -> int:
    """The tokenizer's real vocabulary: every id it can produce, added tokens included."""
    return tok.backend_tokenizer.get_vocab_size(with_added_tokens=True)
