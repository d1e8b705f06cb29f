"""Logit filters and sampling (pure NumPy)."""
import numpy as np
import pytest

from mjsd.runtime.sampling import filter_logits, greedy, log_probs, log_softmax, probs, sample, shared_vocab, softmax


def test_softmax_and_log_softmax_agree():
    x = np.array([[1.0, 2.0, -np.inf, 0.5], [1000.0, 1000.0, 0.0, -1000.0]], dtype=np.float32)
    p = softmax(x)
    assert np.allclose(p.sum(-1), 1) and p[0, 2] == 0
    assert np.allclose(np.exp(log_softmax(x)), p, atol=1e-7)
    assert np.isneginf(log_softmax(x)[0, 2])


def test_temperature_zero_is_one_hot_argmax():
    x = np.array([[0.1, 3.0, 3.0, -1.0], [5.0, 1.0, 2.0, 0.0]])
    p = probs(x, temperature=0)
    assert (p == np.array([[0, 1, 0, 0], [1, 0, 0, 0]])).all()  # first index on ties, like greedy()
    assert greedy(x).tolist() == [1, 0] and greedy(x[1]) == 0


def test_temperature_scales():
    x = np.array([1.0, 2.0, 3.0])
    assert np.allclose(probs(x, temperature=0.5), softmax(x / 0.5))
    assert np.allclose(probs(x, temperature=2.0), softmax(x / 2.0))


def test_top_k_keeps_k_largest():
    x = np.array([[0.0, 5.0, 1.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    f = filter_logits(x, top_k=2)
    assert np.isfinite(f).tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert np.allclose(probs(x, top_k=2)[0], softmax(np.array([-np.inf, 5, -np.inf, 3, -np.inf])))
    assert np.isfinite(filter_logits(x, top_k=0)).all() and np.isfinite(filter_logits(x, top_k=9)).all()


def test_top_k_on_a_large_vocabulary_is_exact():
    rng = np.random.default_rng(2)
    few = np.zeros(40000)
    few[0:320:16] = 1.0  # 20 large values all on the strided sample: the threshold guess passes < k, full fallback
    for x in (rng.normal(size=40000), np.sort(rng.normal(size=40000)), np.r_[np.zeros(39000), np.ones(1000)], few):
        x = x.astype(np.float32)
        for k in (1, 50, 700):
            kept = np.isfinite(filter_logits(x, top_k=k))
            assert kept.sum() == k and x[kept].min() >= np.sort(x)[-k]


def test_top_p_keeps_smallest_nucleus():
    p = np.array([0.5, 0.05, 0.3, 0.15])
    x = np.log(p)
    # sorted: 0.5, 0.3, 0.15, 0.05 -> cumulative before each: 0, 0.5, 0.8, 0.95
    assert np.isfinite(filter_logits(x, top_p=0.45)).tolist() == [True, False, False, False]
    assert np.isfinite(filter_logits(x, top_p=0.6)).tolist() == [True, False, True, False]
    assert np.isfinite(filter_logits(x, top_p=0.81)).tolist() == [True, False, True, True]
    assert np.isfinite(filter_logits(x, top_p=0.01)).tolist() == [True, False, False, False]  # never empty
    assert np.allclose(probs(x, top_p=0.6), [0.5 / 0.8, 0, 0.3 / 0.8, 0])


def test_top_k_then_top_p_batched():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 50)).astype(np.float32)
    p = probs(x, temperature=0.7, top_k=10, top_p=0.9)
    assert p.shape == x.shape and np.allclose(p.sum(-1), 1)
    assert ((p > 0).sum(-1) <= 10).all()
    for row_x, row_p in zip(x.reshape(-1, 50), p.reshape(-1, 50)):  # same as filtering each row alone
        assert np.allclose(probs(row_x, temperature=0.7, top_k=10, top_p=0.9), row_p)


def test_shared_vocab_slices_padding():
    x = np.zeros((1, 2, 10))
    assert shared_vocab(x, 7).shape == (1, 2, 7)


def test_sample_matches_distribution_and_never_picks_zero_mass():
    rng = np.random.default_rng(1)
    p = np.array([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    draws = np.array([sample(p, rng) for _ in range(20000)])
    freq = np.bincount(draws, minlength=6) / len(draws)
    assert freq[[0, 2, 5]].sum() == 0
    assert np.abs(freq - p).max() < 0.015
    assert sample(np.array([0.0, 0.0, 2.0]), rng) == 2  # unnormalised is fine


def test_sample_batched_and_seeded():
    p = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert sample(p, np.random.default_rng(0)).tolist() == [0, 2]
    q = np.full((4, 5), 0.2)
    assert (sample(q, np.random.default_rng(7)) == sample(q, np.random.default_rng(7))).all()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_float16_logits_are_accepted(temperature):
    p = probs(np.array([1.0, 2.0, 0.5], dtype=np.float16), temperature=temperature)
    assert p.dtype == np.float32 and np.isclose(p.sum(), 1)


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    rng = np.random.default_rng(3)
    for scale in (0.5, 3.0, 8.0):  # flat to peaked: the partial sort widens its head as needed
        x = rng.normal(scale=scale, size=(2, 5000)).astype(np.float32)
        for top_p in (0.3, 0.9, 0.99):
            pr = softmax(x)
            order = np.argsort(-pr, axis=-1)
            sp = np.take_along_axis(pr, order, axis=-1)
            ref = np.zeros_like(x, dtype=bool)
            np.put_along_axis(ref, order, np.cumsum(sp, axis=-1) - sp < top_p, axis=-1)
            assert (np.isfinite(filter_logits(x, top_p=top_p)) == ref).all(), (scale, top_p)


def test_probs_is_softmax_of_filter_logits():
    x = np.random.default_rng(4).normal(scale=3, size=(3, 2000)).astype(np.float32)
    for t, k, p in ((1.0, 0, 1.0), (0.7, 40, 1.0), (1.3, 0, 0.8), (0.9, 100, 0.5), (0.0, 5, 0.5)):
        assert np.allclose(probs(x, t, k, p), softmax(filter_logits(x, t, k, p)), atol=1e-7)
