"""Joint-decoding math: acceptance rule, beam steps, joint argmax (pure NumPy, no ORT)."""
import itertools

import numpy as np
import pytest

from mjsd.runtime.errors import ConfigError
from mjsd.runtime.joint import (LOG_TOL, MAX_JOINT_SEQUENCES, accept_length, beam_sample_step, beam_sample_top,
                                beam_search_step, best_joint, joint_prefixes, sample_distinct, token_logprobs,
                                top_indices)



def L(p):
    with np.errstate(divide="ignore"):
        return np.log(p)


def test_accept_length_is_the_longest_passing_prefix():
    # margins logP - logQ over prefixes 1..4: -1.0 (fails), +0.2 (passes), -0.8 (fails), -0.3 (passes at tau 0.5)
    logp = np.array([-2.0, -0.8, -1.5, -0.5])
    logq = np.array([-1.0, -2.0, -0.5, -1.0])
    assert accept_length(logp, logq, 0.5) == 4  # not 0 (first failure), not 2
    assert accept_length(logp, logq, 0.9) == 2
    assert accept_length(logp, logq, 1.0) == 2
    assert accept_length(logp[:1], logq[:1], 0.5) == 0
    assert accept_length(logp, logq, 1e-30) == 4
    # a target zero (-inf) fails its prefix and every longer one, even against a -inf draft
    assert accept_length(np.array([-1.0, -np.inf, -1.0]), np.array([-1.0, -np.inf, -1.0]), 0.5) == 1


def test_accept_length_equals_the_cumsum_definition():
    """The Python running sums decide exactly as NumPy's float64 cumsums (float32 and float64 inputs, -inf, ties
    at the threshold's tolerance)."""
    rng = np.random.default_rng(0)
    for case in range(3000):
        n = int(rng.integers(1, 25))
        logq = -rng.exponential(1.0, n)
        logp = logq + rng.normal(0, 0.3 if case % 2 else 1e-3, n)
        if case % 7 == 0:
            logp[rng.integers(n)] = -np.inf
        if case % 3 == 0:
            logp, logq = logp.astype(np.float32), logq.astype(np.float32)
        tau = float(rng.choice([0.05, 0.3, 0.5, 1.0]))
        with np.errstate(invalid="ignore"):
            margin = np.cumsum(logp, dtype=np.float64) - np.cumsum(logq, dtype=np.float64)
            passing = np.flatnonzero(margin > np.log(tau) - LOG_TOL * np.arange(1, n + 1))
        assert accept_length(logp, logq, tau) == (int(passing[-1]) + 1 if passing.size else 0)


def test_equal_likelihoods_pass_at_tau_one_despite_float_noise():
    logq = np.array([-1.2, -0.7, -3.1], dtype=np.float32)
    assert accept_length(logq - np.float32(2e-4), logq, 1.0) == 3
    assert accept_length(logq - np.float32(1e-2), logq, 1.0) == 0


def _greedy_trap():
    """Two steps over 3 tokens where greedy is not the joint argmax: token 0 (0.4) then a flat 0.34 gives 0.136;
    token 1 (0.35) then 0.5 gives 0.175."""
    q1 = np.array([0.40, 0.35, 0.25])
    q2 = np.array([[0.34, 0.33, 0.33], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    return q1, q2


def test_beam_search_finds_the_joint_argmax_greedy_misses_and_keeps_the_greedy_chain():
    q1, q2 = _greedy_trap()
    parents, tokens, cum, greedy = beam_search_step(np.zeros(1), L(q1)[None], 2, 0)
    assert tokens.tolist() == [0, 1] and parents.tolist() == [0, 0] and greedy == 0
    parents, tokens, cum2, greedy = beam_search_step(cum, L(q2[tokens]), 2, greedy)
    assert (parents[0], tokens[0]) == (1, 0) and np.isclose(np.exp(cum2[0]), 0.175)  # best joint first
    # plain top-2 would be (1,0), (1,1); the greedy chain 0 -> 0 replaces the last pick
    assert (parents[1], tokens[1]) == (0, 0) and greedy == 1 and np.isclose(np.exp(cum2[1]), 0.136)
    # width 1 is greedy
    _, t, c, _ = beam_search_step(np.zeros(1), L(q1)[None], 1, 0)
    assert t.tolist() == [0]


def test_beam_search_skips_filtered_tokens():
    logq = L(np.array([[0.7, 0.3, 0.0, 0.0]]))
    _, tokens, cum, _ = beam_search_step(np.zeros(1), logq, 4, 0)
    assert tokens.tolist() == [0, 1] and np.isfinite(cum).all()


def test_top_indices_match_a_stable_sort():
    x = np.random.default_rng(0).integers(0, 5, size=(3, 40)).astype(np.float32)  # many ties
    x[0, :3] = -np.inf
    for n in (1, 4, 32, 33, 37):  # up to the 37 finite entries of row 0
        want = np.argsort(-x, axis=-1, kind="stable")[:, :n]
        assert (top_indices(x, n) == want).all() and (top_indices(x[1], n) == want[1]).all()


def test_sample_distinct_is_sequential_sampling_without_replacement():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.2, 0.0])
    n = 20000
    counts = {}
    for _ in range(n):
        pair = tuple(sample_distinct(rng, p, 2))
        counts[pair] = counts.get(pair, 0) + 1
    for (i, j), c in counts.items():
        assert p[i] > 0 and p[j] > 0 and i != j
        exact = p[i] * p[j] / (1 - p[i])
        assert abs(c / n - exact) < 4 * np.sqrt(exact / n) + 1e-3


def _whole_table_step(cum, logq, width, greedy):
    """beam_search_step by ranking every (beam, token) pair: the reference for its per-beam candidate shortcut."""
    flat = (cum[:, None] + logq).ravel()
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))  # best first, the lower index on ties
    picked = np.array([i for i in order if np.isfinite(flat[i])][:width], dtype=np.int64)
    if greedy >= 0:
        pair = greedy * logq.shape[1] + int(np.argmax(logq[greedy]))
        if pair in picked:
            greedy = int(np.flatnonzero(picked == pair)[0])
        elif len(picked) >= 2:
            picked[-1], greedy = pair, len(picked) - 1
        else:
            greedy = -1
    parents, tokens = np.divmod(picked, logq.shape[1])
    return parents, tokens, flat[picked], greedy


def test_beam_search_step_equals_ranking_the_whole_table():
    """Random tables with ties, filtered (-inf) tokens, rows with fewer finite tokens than the width, every greedy
    beam: the same pairs, order, scores and greedy index as ranking all B x V pairs."""
    rng = np.random.default_rng(0)
    for _ in range(3000):
        b, v, width = int(rng.integers(1, 5)), int(rng.integers(1, 12)), int(rng.integers(1, 11))
        logq = np.round(rng.normal(size=(b, v)), 1).astype(np.float32)
        logq[rng.random((b, v)) < 0.3] = -np.inf
        logq[np.arange(b), rng.integers(0, v, b)] = 0.0  # every beam keeps one token
        cum, greedy = np.round(rng.normal(size=b), 1), int(rng.integers(-1, b))
        got, want = beam_search_step(cum, logq, width, greedy), _whole_table_step(cum, logq, width, greedy)
        for g, w in zip(got[:3], want[:3]):
            np.testing.assert_array_equal(g, w)
        assert got[3] == want[3]


def test_beam_sample_step():
    rng = np.random.default_rng(1)
    q1, q2 = _greedy_trap()
    parents, tokens, cum, greedy = beam_sample_step(rng, np.zeros(1), q1[None], 3, 0)
    assert sorted(tokens.tolist()) == [0, 1, 2] and np.allclose(np.exp(cum), q1[tokens])
    # all pairs with nonzero weight, each once; the zero-probability pair (1, 2) never
    parents, t2, cum2, g2 = beam_sample_step(rng, cum, q2[tokens], 9, greedy)
    pairs = set(zip(tokens[parents].tolist(), t2.tolist()))
    assert len(pairs) == 8 and (1, 2) not in pairs
    assert np.allclose(np.exp(cum2), q1[tokens[parents]] * q2[tokens[parents], t2])
    assert (tokens[parents[g2]], t2[g2]) == (0, 0)  # the greedy chain is still there
    # weights pi_b * q(v|b): first-drawn pair frequencies follow the normalised joint Q
    w = (q1[:, None] * q2).ravel()
    firsts = np.zeros(9)
    for _ in range(6000):
        p, t, _, _ = beam_sample_step(rng, L(q1), q2, 2, -1)
        firsts[p[0] * 3 + t[0]] += 1
    assert np.abs(firsts / firsts.sum() - w).max() < 0.02


def test_beam_sampling_of_width_one_is_a_sampled_chain():
    rng = np.random.default_rng(2)
    seen = {int(beam_sample_step(rng, np.zeros(1), np.array([[0.5, 0.5]]), 1, 0)[1][0]) for _ in range(50)}
    assert seen == {0, 1}


def test_best_joint_equals_brute_force():
    rng = np.random.default_rng(3)
    vocab, k = 4, 3
    table = rng.dirichlet(np.ones(vocab) * 0.5, size=(vocab, vocab))  # p(next | last two tokens)

    def logprobs_after(seq):  # log p(. | context 0, seq) for every prefix length
        ctx = [0, 0] + list(seq)
        return np.log([table[ctx[i], ctx[i + 1]] for i in range(len(seq) + 1)])

    prefixes = joint_prefixes(vocab, k)
    assert prefixes.shape == (vocab ** (k - 1), k - 1)
    logprobs = np.stack([logprobs_after(p) for p in prefixes])  # [N, k, V]
    _, tokens, score = best_joint(logprobs, prefixes)
    brute = max(itertools.product(range(vocab), repeat=k),
                key=lambda y: token_logprobs(logprobs_after(y[:-1]), np.array(y)).sum())
    assert tuple(tokens) == brute
    assert np.isclose(score, token_logprobs(logprobs_after(brute[:-1]), np.array(brute)).sum())


def test_joint_prefixes_refuse_large_vocabularies():
    assert joint_prefixes(12, 1).shape == (1, 0)
    with pytest.raises(ConfigError, match="vocab"):
        joint_prefixes(32000, 2)
    assert 16 ** 4 <= MAX_JOINT_SEQUENCES


def test_beam_sample_top_draws_what_the_numpy_step_draws():
    """A draft step's few (beam, token) pairs are drawn on Python floats (beam_sample_top, from each beam's top-k
    support); given every row's whole support in token order and the same generator state, it picks the dense NumPy
    step's pairs, joint scores and greedy beam (ties, zeros, up to 11 beams)."""
    gen = np.random.default_rng(0)
    for t in range(3000):
        b, k, width = int(gen.integers(1, 12)), int(gen.integers(1, 12)), int(gen.integers(1, 6))
        logq = (gen.normal(size=(b, k)) * 2).astype(np.float32)
        if t % 3 == 0:
            logq[:, -2:] = -np.inf
        if t % 5 == 0:
            logq[:, :3] = logq[:, :1]
        if not np.isfinite(logq).any():
            continue
        cum, greedy = gen.normal(size=b) * 3, int(gen.integers(-1, b))
        p1, t1, c1, g1 = beam_sample_step(np.random.default_rng(t), cum, np.exp(logq.astype(np.float64)), width,
                                          greedy)
        p2, t2, c2, x2, g2 = beam_sample_top(np.random.default_rng(t), cum.tolist(), logq.tolist(),
                                             [list(range(k))] * b, width, greedy)
        assert p1.tolist() == p2 and t1.tolist() == t2 and g1 == g2
        np.testing.assert_allclose(c1, c2, rtol=1e-12)
        assert x2 == logq[p1, t1].tolist()
