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
    z = x - np.max(x, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _top_k(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= x.shape[-1]:
        return x
    kth = np.partition(x, -k, axis=-1)[..., -k, None]
    return np.where(x >= kth, x, -np.inf)  # ties with the k-th value are kept, as in HF's TopKLogitsWarper


def _top_p(x: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (nucleus sampling)."""
    if p >= 1.0:
        return x
    flat = x.reshape(-1, x.shape[-1])
    return np.stack([_top_p_row(row, p) for row in flat]).reshape(x.shape)


def _top_p_row(x: np.ndarray, p: float) -> np.ndarray:
    probs_ = softmax(x)
    # sort only a head of the vocabulary that holds mass >= p (a full argsort of 32k+ entries costs milliseconds)
    m = 64
    while m < len(x):
        head = np.argpartition(-probs_, m)[:m]
        if probs_[head].sum() >= p:
            break
        m *= 4
    else:
        head = np.arange(len(x))
    head = head[np.argsort(-probs_[head], kind="stable")]
    # a token is kept when the mass strictly before it is below p; the most likely token is always kept
    keep = head[np.cumsum(probs_[head]) - probs_[head] < p]
    out = np.full_like(x, -np.inf)
    out[keep] = x[keep]
    return out


def filter_logits(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Scaled, filtered logits (removed tokens are -inf), as float32. T = 0 leaves only the argmax finite."""
    x = np.asarray(logits, dtype=np.float32)
    if temperature == 0.0:
        out = np.full(x.shape, -np.inf, dtype=np.float32)
        np.put_along_axis(out, np.argmax(x, axis=-1)[..., None], 0.0, axis=-1)
        return out
    if temperature != 1.0:
        x = x / np.float32(temperature)
    return _top_p(_top_k(x, top_k), top_p)


def probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The filtered distribution softmax(top_p(top_k(logits / T))); one-hot argmax at T = 0."""
    return softmax(filter_logits(logits, temperature, top_k, top_p))


def sample(p: np.ndarray, rng: np.random.Generator) -> np.ndarray | int:
    """Draw one token per row of a (possibly unnormalised) distribution; never returns a zero-probability token
    (inverse CDF over the tokens with mass)."""
    if p.ndim == 1:
        return _draw(p, rng.random())
    flat = p.reshape(-1, p.shape[-1])
    u = rng.random(flat.shape[0])
    return np.array([_draw(row, x) for row, x in zip(flat, u)], dtype=np.int64).reshape(p.shape[:-1])


def _draw(p: np.ndarray, u: float) -> int:
    support = np.flatnonzero(p)  # filtered distributions are sparse: accumulate only their support
    cdf = np.cumsum(p[support], dtype=np.float64)
    # u * total can round up to total: clamp to the last token with mass
    return int(support[min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)])
