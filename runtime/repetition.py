"""Repetition control: no-repeat-ngram (Hugging Face's `no_repeat_ngram_size`). Pure NumPy.

A token is banned (its logit set to -inf) when it would complete an n-gram that already occurs in the sequence
(prompt + generated). The algorithms apply it to every distribution they use, each row with its own history: AR's
next token, the draft's proposals (each beam's row with that beam's tokens), the target's scores of every draft
position (with the draft prefix before it) and the token a round ends with. So draft, target and AR see the same
filtered model, and speed and quality comparisons stay fair. Small models loop on `#\\n#\\n...` or a repeated line
(joint decoding more so, since it prefers high-likelihood continuations); an n-gram ban cuts a loop after n tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def banned_tokens(history: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """The tokens that would complete an n-gram already in `history` (those that followed an earlier occurrence of its
    last n - 1 tokens); empty when n < 1 or the history is shorter than n."""
    h = np.asarray(history, dtype=np.int64)
    if n < 1 or h.size < n:
        return np.zeros(0, dtype=np.int64)
    if n == 1:
        return np.unique(h)
    tail = h[h.size - n + 1:]
    starts = np.flatnonzero(h[: h.size - n + 1] == tail[0])  # candidate earlier occurrences, next token in range
    for k in range(1, n - 1):
        starts = starts[h[starts + k] == tail[k]]
    return np.unique(h[starts + n - 1])


def ban_repeats(logits: np.ndarray, histories: Sequence[Sequence[int] | np.ndarray], n: int) -> np.ndarray:
    """logits [R, V] (or [V] with one history) with each row's banned tokens at -inf; the input when n == 0 (a copy
    otherwise). Tokens beyond the logit width (padding) are ignored."""
    if not n:
        return logits
    out = np.array(logits, dtype=np.float32)
    rows = out.reshape(-1, out.shape[-1])
    for row, h in zip(rows, histories, strict=True):
        banned = banned_tokens(h, n)
        banned = banned[banned < row.size]
        if banned.size and np.isfinite(np.delete(row, banned)).any():  # never ban every token
            row[banned] = -np.inf
    return out
