"""Token trees for tree-attention verification: masks, positions and paths from a parents array. Pure NumPy.

A tree of S nodes fed after `past` cached tokens is described by `parents` [S]: node i's parent index, or -1 for a
child of the context; parents come before their children (parents[i] < i). Node i attends to the whole context,
its ancestors and itself, at position past + depth(i) - 1, so its logits and KV equal those of a plain causal
forward over its root-to-node path. A chain (parents = -1, 0, 1, ...) is plain causal attention.
"""
from __future__ import annotations

import numpy as np

BIAS = "attention_bias"  # the tree-attention graph's input that replaces the rank-2 attention_mask

def check_parents(parents) -> np.ndarray:
    p = np.asarray(parents, dtype=np.int64)
    if p.ndim != 1 or (p.size and (p.min() < -1 or np.any(p >= np.arange(p.size)))):
        raise ValueError(f"parents {p.tolist()} must be a list with -1 <= parents[i] < i (parents first)")
    return p


def chain(n: int) -> np.ndarray:
    """The parents of n tokens in a row (plain causal attention)."""
    return np.arange(n, dtype=np.int64) - 1


def ancestors(parents) -> np.ndarray:
    """[S, S] bool: entry (i, j) is True when node j is node i or one of its ancestors."""
    p = check_parents(parents)
    anc = np.eye(p.size, dtype=bool)
    for i in np.flatnonzero(p >= 0):  # parents come first, so their rows are complete
        anc[i] |= anc[p[i]]
    return anc


def depths(parents) -> np.ndarray:
    """[S] depth of each node: 1 for children of the context."""
    return ancestors(parents).sum(axis=1)


def positions(parents, past: int) -> np.ndarray:
    """[S] position ids: past + depth - 1."""
    return past + depths(parents) - 1


def attention_bias(parents, past: int, dtype=np.float32) -> np.ndarray:
    """[1, 1, S, past + S] additive bias: 0 over the context and the node's ancestors and itself, elsewhere the
    dtype's lowest finite value (as transformers masks: finite, so no row becomes NaN)."""
    anc = ancestors(parents)
    bias = np.zeros((1, 1, anc.shape[0], past + anc.shape[0]), dtype=dtype)
    bias[0, 0, :, past:][~anc] = np.finfo(dtype).min
    return bias


def path(parents, node: int) -> list[int]:
    """The nodes from the depth-1 ancestor down to `node` (empty for node -1, the context)."""
    p = check_parents(parents)
    out = []
    while node >= 0:
        out.append(int(node))
        node = p[node]
    return out[::-1]


def after_chain(parents, n: int) -> np.ndarray:
    """The parents of n tokens in a row (e.g. the pending token) followed by a tree hanging from the last of them:
    one sequence for a single call."""
    p = check_parents(parents)
    return np.concatenate([chain(n), np.where(p < 0, n - 1, p + n)])
