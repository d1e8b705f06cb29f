"""Multi-candidate speculative decoding (MCSD) math: the candidate tree and its exact verification. Pure NumPy.

Tree layout: k_config = (k_1..k_d); level s (0 = root .. d) holds N_s = k_1 * ... * k_s nodes in row-major order,
so node n of level s >= 1 is child n % k_s of node n // k_s of level s-1, and its first leaf is n * k_{s+1}*...*k_d.
The verification walk needs only each node's target distribution, however it was computed: the batch strategy
(one root-to-leaf path per batch row, `level_probs_from_rows`) and a tree-attention strategy give the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np

from .joint import sample_distinct, top_indices
from .sampling import sample


@dataclass
class CandidateTree:
    """tokens[s]: [N_{s+1}] tokens of level s+1; proposals[s]: [N_s, V] the exact distributions Q_u the children of
    each level-s node were drawn from."""

    k_config: tuple[int, ...]
    tokens: list[np.ndarray] = field(default_factory=list)
    proposals: list[np.ndarray] = field(default_factory=list)

    def add_level(self, q: np.ndarray, children: np.ndarray) -> None:
        """Record the children [N_s, k_{s+1}] drawn from the proposals q [N_s, V] of level s's nodes."""
        self.proposals.append(q)
        self.tokens.append(children.reshape(-1))

    def paths(self) -> np.ndarray:
        """Every root-to-leaf path as a row of tokens, [N_d, d] (the batch strategy's rows)."""
        d = len(self.k_config)
        return np.stack([self.tokens[s][relative_node(self.k_config, d, np.arange(prod(self.k_config)), s + 1)]
                         for s in range(d)], axis=1)


def relative_node(k_config, level: int, node, to_level: int):
    """The index at `to_level` of node's ancestor (to_level < level) or first descendant (to_level >= level)."""
    if to_level >= level:
        return node * prod(k_config[level:to_level])
    return node // prod(k_config[to_level:level])


def propose_children(rng: np.random.Generator, q: np.ndarray, k: int, replacement: bool) -> np.ndarray:
    """k children for each row of q [N, V]: i.i.d. draws (with replacement) or successive draws without
    replacement. When q has fewer than k nonzero tokens the missing children repeat the last drawn token: the walk
    always rejects such a repeat (a rejected token has no residual mass left), so exactness is kept."""
    if replacement:
        return np.asarray(sample(np.repeat(q, k, axis=0), rng)).reshape(len(q), k)
    out = np.empty((len(q), k), dtype=np.int64)
    for i, row in enumerate(q):
        drawn = sample_distinct(rng, row, min(k, int(np.count_nonzero(row))))
        out[i] = np.concatenate([drawn, np.repeat(drawn[-1:], k - drawn.size)])
    return out


def top_children(logits: np.ndarray, k: int) -> np.ndarray:
    """The k most likely tokens of each row (sampling without replacement at temperature 0), best first."""
    return top_indices(logits, k)


def normalise(p: np.ndarray) -> np.ndarray:
    total = p.sum()
    return p / total if total > 0 else p


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): what the target still needs after a rejected proposal from q. When p == q up to
    rounding there is no mass left, and p itself is as good as any choice."""
    rest = np.maximum(p - q, 0.0)
    return normalise(rest) if rest.sum() > 0 else p


def remove_token(q: np.ndarray, x: int) -> np.ndarray:
    """The proposal of the next sibling drawn without replacement: q with x zeroed, renormalised."""
    q = q.copy()
    q[x] = 0.0
    return normalise(q)


def verify_tree(rng: np.random.Generator, tree: CandidateTree, target: list[np.ndarray], replacement: bool):
    """Exact MCSD verification walk from the root.

    target[s]: [N_s, V] the target's filtered distribution at every level-s node, s = 0..d. At node u, try the
    children in drawn order, accepting x with probability min(1, P_u(x) / Q_u(x)); on rejection P_u <- residual,
    and without replacement Q_u[x] <- 0 renormalised. Descend on acceptance. If every child is rejected the next
    token is drawn from the residual; at a leaf, a bonus token from the target.
    Returns (accepted tokens, index of the last accepted node in its level, next token). At temperature 0 (one-hot
    P) this accepts exactly the children equal to the target's argmax: greedy verification.
    """
    accepted, node = [], 0
    for s, k in enumerate(tree.k_config):
        p, q = target[s][node].astype(np.float64), tree.proposals[s][node].astype(np.float64)
        for child in range(node * k, node * k + k):
            x = int(tree.tokens[s][child])
            if rng.random() * q[x] < p[x]:  # u < P/Q without dividing; Q(x) = 0 accepts iff P(x) > 0
                break
            p = residual(p, q)
            if not replacement:
                q = remove_token(q, x)
        else:
            return accepted, node, int(sample(p, rng))
        accepted.append(x)
        node = child
    return accepted, node, int(sample(target[-1][node], rng))


def level_probs_from_rows(row_probs: np.ndarray, k_config) -> list[np.ndarray]:
    """Batch strategy: the target's distributions per tree level from its [N_d, d+1, V] output over the paths
    (row r, position s is the node of level s on leaf r's path; every node's first leaf row holds it)."""
    d = len(k_config)
    return [row_probs[relative_node(k_config, s, np.arange(prod(k_config[:s])), d), s] for s in range(d + 1)]
