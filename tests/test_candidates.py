"""MCSD math: tree layout, proposals, and the exactness of the verification walk (pure NumPy, no ORT)."""
import numpy as np
import pytest

from mjsd.runtime import candidates
from mjsd.runtime.candidates import (CandidateTree, level_probs_from_rows, propose_children, relative_node,
                                     top_children, verify_tree)

# A toy Markov "language" over 3 tokens: next-token tables of the target P and the draft Q, given the last token.
# P has zero-probability tokens that Q proposes often; Q[1] has only 2 tokens of support (fewer than k = 3 children
# without replacement); Q[0] concentrates on one token, so with replacement duplicates are frequent.
P = np.array([[0.60, 0.40, 0.00],
              [0.20, 0.30, 0.50],
              [0.00, 0.25, 0.75]])
Q = np.array([[0.10, 0.10, 0.80],
              [0.50, 0.50, 0.00],
              [0.70, 0.20, 0.10]])
K_CONFIG = (3, 2)
N_TOKENS = 3  # compare the distribution of the first 3 generated tokens: 27 outcomes
N_SAMPLES = 6000
CHI2_BOUND = 60.0  # chi-square with <= 26 degrees of freedom: P(> 60) < 2e-4; a wrong walk scores in the hundreds


def _round(rng, last, replacement):
    """One MCSD round of the toy model from context ending in `last`: build the tree, verify it."""
    tree, nodes = CandidateTree(K_CONFIG), np.array([last])
    target = [P[nodes]]
    for k in K_CONFIG:
        children = propose_children(rng, Q[nodes], k, replacement)
        tree.add_level(Q[nodes], children)
        nodes = tree.tokens[-1]
        target.append(P[nodes])
    accepted, _, nxt = verify_tree(rng, tree, target, replacement)
    return accepted + [nxt]


def _sample_texts(replacement, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.zeros((3,) * N_TOKENS)
    for _ in range(N_SAMPLES):
        text = [0]
        while len(text) <= N_TOKENS:
            text += _round(rng, text[-1], replacement)
        counts[tuple(text[1:N_TOKENS + 1])] += 1
    return counts


def _exact():
    out = np.ones((3,) * N_TOKENS)
    for idx in np.ndindex(out.shape):
        last = 0
        for t in idx:
            out[idx] *= P[last, t]
            last = t
    return out


def _chi2(counts):
    expected = _exact() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a zero-probability token was generated"
    pos = expected > 0
    return float((((counts - expected) ** 2)[pos] / expected[pos]).sum())


@pytest.mark.parametrize("replacement", [True, False])
def test_walk_reproduces_target_distribution(replacement):
    assert _chi2(_sample_texts(replacement)) < CHI2_BOUND


@pytest.mark.parametrize("replacement,patch", [
    (True, ("residual", lambda p, q: p)),  # fall back to the plain target instead of the residual
    (False, ("residual", lambda p, q: p)),
    (False, ("remove_token", lambda q, x: q)),  # draw without replacement but verify as if with
])
def test_bound_bites_on_a_wrong_walk(monkeypatch, replacement, patch):
    monkeypatch.setattr(candidates, *patch)
    assert _chi2(_sample_texts(replacement)) > CHI2_BOUND


def test_tree_layout_and_paths():
    k = (2, 3)
    tree = CandidateTree(k)
    tree.add_level(np.zeros((1, 5)), np.array([[1, 2]]))
    tree.add_level(np.zeros((2, 5)), np.array([[3, 4, 0], [0, 1, 2]]))
    assert tree.paths().tolist() == [[1, 3], [1, 4], [1, 0], [2, 0], [2, 1], [2, 2]]
    assert relative_node(k, 1, 1, 2) == 3 and relative_node(k, 2, 5, 1) == 1 and relative_node(k, 2, 4, 0) == 0
    rows = np.arange(6 * 3)[:, None].repeat(4, 1).reshape(6, 3, 4)  # row_probs[r, s] = 3 r + s
    levels = level_probs_from_rows(rows, k)
    assert [lv[:, 0].tolist() for lv in levels] == [[0], [1, 10], [2, 5, 8, 11, 14, 17]]


def test_proposals():
    rng = np.random.default_rng(0)
    q = np.array([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    without = propose_children(rng, q, 3, replacement=False)
    assert sorted(without[0][:2]) == [1, 2] and without[0][2] == without[0][1]  # support 2 < k: repeat the last
    assert len(set(without[1])) == 3
    with_ = propose_children(rng, np.eye(4)[[2]], 3, replacement=True)
    assert with_.tolist() == [[2, 2, 2]]
    assert top_children(np.array([[0.1, 3.0, 2.0, -1.0]]), 2).tolist() == [[1, 2]]


def test_one_hot_walk_is_greedy_verification():
    rng = np.random.default_rng(0)
    tree = CandidateTree((2, 1))
    tree.add_level(np.eye(4)[[1]], np.array([[1, 3]]))  # top-2 children at T=0, one-hot proposal on the first
    tree.add_level(np.eye(4)[[0, 2]], np.array([[0], [2]]))
    target = [np.eye(4)[[3]], np.eye(4)[[0, 1]], np.eye(4)[[0, 0]]]
    assert verify_tree(rng, tree, target, replacement=False) == ([3], 1, 1)  # second child matches, then mismatch
    target[1] = np.eye(4)[[0, 2]]
    assert verify_tree(rng, tree, target, replacement=False) == ([3, 2], 1, 0)  # leaf reached: bonus token
