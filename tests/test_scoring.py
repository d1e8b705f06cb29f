"""The draft step's scoring graphs (runtime/scoring.py): the shipped files are what build_graphs makes, and their
results equal the NumPy scoring (sampling.log_probs) on every row's best children or top-k support."""
import numpy as np
import pytest

from mjsd.runtime.sampling import log_probs
from mjsd.runtime.scoring import GRAPHS, build_graphs, scorer


def test_shipped_graphs_are_the_built_ones():
    pytest.importorskip("onnx")
    for name, data in build_graphs().items():
        assert GRAPHS[name].read_bytes() == data, f"re-run build_graphs for {GRAPHS[name]}"


def _rows(rng, t):
    rows, vocab = int(rng.integers(1, 5)), int(rng.integers(12, 300))
    x = (rng.normal(size=(rows, vocab)) * rng.uniform(0.1, 5)).astype(np.float32)
    if t % 5 == 0:
        x[:, :6] = x[:, :1]  # ties
    if t % 7 == 0:
        x[:, 3:9] = -np.inf  # banned tokens
    return x


def test_beam_scores_are_each_rows_best_log_softmax_children():
    rng = np.random.default_rng(0)
    for t in range(300):
        x = _rows(rng, t)
        width, pad = int(rng.integers(1, 6)), int(rng.integers(0, 3))
        padded = np.concatenate([x, np.full((len(x), pad), 50.0, np.float32)], axis=1)  # padding is never scored
        values, tokens = scorer().beam(padded, x.shape[1], width)
        dense = log_probs(x, 1.0)
        for row, v, ids in zip(dense, values, tokens):
            want = sorted(range(len(row)), key=lambda i: (-row[i], i))[:width]  # best first, lower id on ties
            assert ids == want
            np.testing.assert_allclose(v, row[want], atol=2e-6)


def test_top_k_scores_are_the_filtered_log_probabilities_on_the_support():
    """Temperatures, top-p (1 filters nothing, a tiny one keeps the top token), ties, banned tokens."""
    rng = np.random.default_rng(1)
    for t in range(300):
        x = _rows(rng, t)
        k, p, temp = int(rng.integers(1, x.shape[1] - 9)), float(rng.choice([1.0, 0.9, 0.5, 1e-6])), \
            float(rng.choice([1.0, 0.7, 1.6]))
        values, tokens = scorer().top_k(x, x.shape[1], temp, k, p)
        dense = log_probs(x, temp, k, p)
        for xs, row, v, ids in zip(x, dense, values, tokens):
            assert len(ids) == len(set(ids)) == k and v == sorted(v, reverse=True)
            assert min(xs[ids]) >= np.sort(xs)[-k]  # the k largest (which of tied boundary values is arbitrary)
            kept = np.sort(row[np.isfinite(row)])[::-1]
            np.testing.assert_array_equal(np.isfinite(v), np.arange(k) < kept.size)
            np.testing.assert_allclose(np.array(v[:kept.size]), kept, atol=2e-6)
