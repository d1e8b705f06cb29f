"""Logit processing and sampling: pure NumPy, no ONNX Runtime.

Every decoding algorithm builds its distributions with `probs(logits, temperature, top_k, top_p)`, the filter of
algorithms.md: softmax(top_p(top_k(logits / T))); T = 0 means one-hot argmax. All functions work on the last axis,
so [V], [S, V] and [B, S, V] inputs are fine.
"""
from __future__ import annotations

import numpy as np


def shared_vocab(logits: np.ndarray, vocab_size: int) -> np.ndarray:
    """Drop padded logit columns so target and draft compare over the same vocabulary (a view, no copy)."""
    return logits[..., :vocab_size]


def greedy(logits: np.ndarray) -> np.ndarray | int:
    """Argmax over the last axis (the first index on ties, like torch/HF)."""
    out = np.argmax(logits, axis=-1)
    return int(out) if out.ndim == 0 else out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))  # -inf entries become exactly 0
    return e / np.sum(e, axis=-1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x, axis=-1, keepdims=True)  # a row's max term is exp(0) = 1: the log never sees 0
    z -= np.log(np.sum(np.exp(z), axis=-1, keepdims=True))  # in place: one temporary fewer (a draft step's)
    return z


def _top_k_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a 1-D row (exact; which of several tied boundary values is arbitrary)."""
    if len(x) >= 32 * k:
        # a full partition of a 32k+ vocabulary dominates a sampling step; guess a threshold from a strided 1/16
        # sample (its j-th largest has ~16j values above it) and keep the guess only if >= k values pass it
        sub = x[::16]
        j = min(len(sub), 2 * (k // 16) + 5)
        cand = np.nonzero(x >= np.partition(sub, -j)[-j])[0]
        if len(cand) >= k:
            return cand[np.argpartition(x[cand], -k)[-k:]]
    return np.argpartition(x, -k)[-k:]


def _nucleus(x: np.ndarray, idx: np.ndarray | None, p: float) -> np.ndarray:
    """Of the candidates idx (None: all) of row x, the smallest most likely set whose probability reaches p."""
    if idx is None:
        # sort only a head of the vocabulary that holds mass >= p (a full argsort of 32k+ entries costs milliseconds)
        probs_ = softmax(x)
        m = 64
        while m < len(x):
            head = np.argpartition(-probs_, m)[:m]
            if probs_[head].sum() >= p:
                break
            m *= 4
        else:
            head = np.arange(len(x))
    else:
        probs_ = np.zeros_like(x)
        probs_[idx] = softmax(x[idx])
        head = idx
    head = head[np.argsort(-probs_[head], kind="stable")]
    # a token is kept when the mass strictly before it is below p; the most likely token is always kept
    return head[np.cumsum(probs_[head]) - probs_[head] < p]


def _kept(x: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Indices a 1-D row keeps after top-k, then top-p over what top-k left (the order HF applies them)."""
    idx = _top_k_indices(x, top_k) if 0 < top_k < len(x) else None
    return _nucleus(x, idx, top_p) if top_p < 1.0 else idx


def _scaled(logits: np.ndarray, temperature: float) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    return x / np.float32(temperature) if temperature != 1.0 else x


def _filters(x: np.ndarray, top_k: int, top_p: float) -> bool:
    return 0 < top_k < x.shape[-1] or top_p < 1.0


def _kept_top_k(x: np.ndarray, top_k: int, top_p: float):
    """`_kept` for every row of x [R, V] at once when top-k applies (a draft's W beams in one go): the top-k indices
    [R, k], their values [R, k] (largest first when top-p applies) and a mask [R, k] of those top-p keeps (None:
    all)."""
    rows = np.arange(x.shape[0])[:, None]  # fancy indexing: take_along_axis costs ~5 us a call here
    idx = np.argpartition(x, -top_k, axis=-1)[:, -top_k:]
    vals = x[rows, idx]
    if top_p >= 1.0:
        return idx, vals, None
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx, vals = idx[rows, order], vals[rows, order]
    p = softmax(vals)
    return idx, vals, np.cumsum(p, axis=-1) - p < top_p  # kept while the mass strictly before a token is below p


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Scaled, filtered logits (removed tokens are -inf), as float32. T = 0 leaves only the argmax finite."""
    if temperature == 0.0:
        with np.errstate(divide="ignore"):
            return np.log(probs(logits, 0.0))
    x = _scaled(logits, temperature)
    if not _filters(x, top_k, top_p):
        return x
    rows = x.reshape(-1, x.shape[-1])
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    if 0 < top_k < x.shape[-1]:
        idx, vals, keep = _kept_top_k(rows, top_k, top_p)
        out[np.arange(len(rows))[:, None], idx] = vals if keep is None else np.where(keep, vals, -np.inf)
        return out.reshape(x.shape)
    for row, o in zip(rows, out):
        idx = _kept(row, top_k, top_p)
        o[idx] = row[idx]
    return out.reshape(x.shape)


def log_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """log(probs(...)) for T > 0: -inf where filtered out. With top-k the log-softmax runs over each row's k kept
    values only, not the vocabulary."""
    x = _scaled(logits, temperature)
    if not 0 < top_k < x.shape[-1]:
        return log_softmax(x if top_p >= 1.0 else filter_logits(x, 1.0, top_k, top_p))
    rows = x.reshape(-1, x.shape[-1])
    idx, vals, keep = _kept_top_k(rows, top_k, top_p)
    r = np.arange(len(rows))[:, None]
    lp = log_softmax(vals if keep is None else np.where(keep, vals, -np.inf))
    out = np.full(rows.shape, -np.inf, dtype=np.float32)
    out[r, idx] = lp
    return out.reshape(x.shape)


def probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The filtered distribution softmax(top_p(top_k(logits / T))); one-hot argmax at T = 0.

    Filtered rows are computed over their support only (exp and normalisation of k values, not of the vocabulary).
    """
    if temperature == 0.0:
        x = np.asarray(logits)
        out = np.zeros(x.shape, dtype=np.float32)
        np.put_along_axis(out, np.argmax(x, axis=-1)[..., None], 1.0, axis=-1)
        return out
    x = _scaled(logits, temperature)
    if not _filters(x, top_k, top_p):
        return softmax(x)
    out = np.zeros(x.shape, dtype=np.float32)
    for row, o in zip(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1])):
        idx = _kept(row, top_k, top_p)
        o[idx] = softmax(row[idx])
    return out


def sample(p: np.ndarray, rng: np.random.Generator) -> np.ndarray | int:
    """Draw one token per row of a (possibly unnormalised) distribution; never returns a zero-probability token
    (inverse CDF over the tokens with mass)."""
    if p.ndim == 1:
        return _draw(p, rng.random())
    flat = p.reshape(-1, p.shape[-1])
    u = rng.random(flat.shape[0])
    return np.array([_draw(row, x) for row, x in zip(flat, u)], dtype=np.int64).reshape(p.shape[:-1])


def _draw(p: np.ndarray, u: float) -> int:
    support = np.nonzero(p > 0)[0]  # filtered distributions are sparse: accumulate only their support
    cdf = np.cumsum(p[support], dtype=np.float64)
    # u * total can round up to total: clamp to the last token with mass
    return int(support[min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)])
