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


class NGramIndex:
    """The n-grams of a sequence that only grows (a generation's accepted text), so that the banned tokens of the text
    plus a few more tokens (a draft beam, a draft prefix) cost O(those tokens) instead of a scan of the whole text:
    a draft round asks for ~50 rows over a text of hundreds of tokens. `banned(seq, extra)` equals
    `banned_tokens(seq + extra, n)` once `extend(seq)` has seen seq."""

    def __init__(self, n: int):
        if n < 2:
            raise ValueError(f"NGramIndex needs n >= 2, got {n}")
        self.n, self.upto = n, 0
        self.next: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram -> the tokens that followed it

    def extend(self, seq: Sequence[int]) -> None:
        """Index the n-grams of seq that end at or after position `upto` (seq extends what was indexed before)."""
        n = self.n
        for end in range(max(self.upto, n - 1), len(seq)):
            self.next.setdefault(tuple(seq[end - n + 1:end]), set()).add(int(seq[end]))
        self.upto = len(seq)

    def banned(self, seq: Sequence[int], extra: Sequence[int] = ()) -> list[int]:
        n = self.n
        if isinstance(extra, np.ndarray):
            extra = extra.tolist()
        if len(seq) + len(extra) < n:
            return []
        tail = list(seq[max(0, len(seq) - n + 1):]) + list(extra)  # ints (NumPy ints hash and compare alike)
        key = tuple(tail[len(tail) - n + 1:])
        out = set(self.next.get(key, ()))  # n-grams that end inside seq
        last = key[-1]
        for end in range(max(len(tail) - len(extra), n - 1), len(tail)):  # n-grams that end inside extra
            if tail[end - 1] == last and tuple(tail[end - n + 1:end]) == key:  # an int test first: most fail it
                out.add(tail[end])
        return sorted(out)

    def banned_prefixes(self, seq: Sequence[int], extra: Sequence[int]) -> list[list[int]]:
        """[banned(seq, extra[:j]) for j in 0..len(extra)] in one pass: the rows a round's verification bans (each
        position with the draft prefix before it). The n-grams ending inside extra are indexed as they come, instead
        of rescanning every prefix (25 rows of a greedy MTAD round: ~130 us -> ~40)."""
        n = self.n
        extra = extra.tolist() if isinstance(extra, np.ndarray) else list(extra)
        tail = list(seq[max(0, len(seq) - n + 1):]) + extra
        start = len(tail) - len(extra)  # where extra begins in tail
        inside: dict[tuple[int, ...], set[int]] = {}  # n-grams that end inside extra[:j]
        rows = []
        for j in range(len(extra) + 1):
            end = start + j
            key = tuple(tail[end - n + 1:end]) if end >= n - 1 else None
            if len(seq) + j < n or key is None:
                rows.append([])
            else:
                rows.append(sorted(self.next.get(key, set()) | inside.get(key, set())))
            if j < len(extra) and key is not None:
                inside.setdefault(key, set()).add(extra[j])
        return rows


def ban_tokens(logits: np.ndarray, banned_rows: Sequence[Sequence[int] | np.ndarray],
               in_place: bool = False) -> np.ndarray:
    """logits [R, V] (or [V] with one row) with each row's banned tokens at -inf (a copy, or float32 logits
    themselves with in_place). Tokens beyond the logit width (padding) are ignored; a row is left alone if the ban
    would remove every token."""
    out = logits if in_place and logits.dtype == np.float32 else np.array(logits, dtype=np.float32)
    rows = out.reshape(-1, out.shape[-1])
    if len(banned_rows) != len(rows):
        raise ValueError(f"{len(banned_rows)} lists of banned tokens for {len(rows)} rows of logits")
    width = rows.shape[1]
    pairs = [(i, int(t)) for i, banned in enumerate(banned_rows) for t in banned if int(t) < width]
    if not pairs:
        return out
    # A row can lose every token only if its argmax is banned: only those rows are kept aside and checked (one argmax
    # over all rows instead of a max per banned row: right after a model call every NumPy call costs ~5 us)
    top = rows.argmax(axis=1).tolist()
    risky = {i for i, t in pairs if t == top[i]}
    kept = [(i, t, rows[i, t]) for i, t in pairs if i in risky]
    if len(pairs) <= 32:  # a draft beam's few banned tokens: scalar writes
        for i, t in pairs:
            rows[i, t] = -np.inf
    else:  # one scatter (a verification bans over gamma + 1 rows)
        r, t = np.array(pairs, dtype=np.int64).T
        rows[r, t] = -np.inf
    dead = {i for i in risky if rows[i].max() == -np.inf}
    for i, t, x in kept:  # never ban every token: such a row is left alone
        if i in dead:
            rows[i, t] = x
    return out


def ban_repeats(logits: np.ndarray, histories: Sequence[Sequence[int] | np.ndarray], n: int) -> np.ndarray:
    """logits [R, V] (or [V] with one history) with each row's banned tokens (banned_tokens) at -inf; the input
    itself when n == 0, else a copy."""
    if not n:
        return logits
    return ban_tokens(logits, [banned_tokens(h, n) for h in histories])
