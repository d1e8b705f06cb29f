"""MCSD (batch strategy) on real exported graphs: greedy identity with AR, KV state, statistics, refusals."""
import numpy as np
import pytest

from mjsd.runtime import candidates
from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import ALGORITHMS, generate_ids, prefill
from mjsd.runtime.errors import ConfigError
from mjsd.runtime.sampling import probs
from mjsd.runtime.session import ModelSession
from mjsd.runtime.stats import GenerationStats
from tests.test_ar_sps import NoisyDraft

# exactness tests compare with the raw model: no repetition control (mcsd, mmtad and PyTorch do not apply it)
RAW = dict(no_repeat_ngram_size=0)

PROMPTS = [[1, 17, 42, 99], [1], [5, 250, 3, 8, 60, 61, 62, 63, 64]]


@pytest.fixture(scope="module")
def llama(llama_bundle):
    b = load_bundle(llama_bundle)
    return b, ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)


def assert_caches_hold_the_text(ctx):
    """Both caches are one row equal to a fresh forward over the accepted text minus the pending token (the draft
    may lag one more token it never saw)."""
    assert ctx.target_cache.length == len(ctx.ids) - 1
    assert len(ctx.ids) - 2 <= ctx.draft_cache.length <= len(ctx.ids) - 1
    for model, cache in ((ctx.target, ctx.target_cache), (ctx.draft, ctx.draft_cache)):
        fresh = model.new_cache()
        model.forward(ctx.ids[:cache.length], fresh)
        assert cache.batch == 1
        for got, want in zip(cache.arrays(), fresh.arrays()):
            np.testing.assert_allclose(got, want, atol=2e-5)


def run_rounds(target, draft, prompt, rounds, **cfg):
    """Drive an algorithm round by round (as the driver does), checking the caches after each; returns the
    accepted counts per round."""
    cfg = GenerationConfig(**cfg)
    ctx = prefill(target, prompt, cfg, GenerationStats(), draft=draft)
    gen = ALGORITHMS[cfg.algo](ctx)
    accepted = []
    for _ in range(rounds):
        before = ctx.stats.accepted_tokens
        new = next(gen)
        accepted.append(ctx.stats.accepted_tokens - before)
        assert len(new) == accepted[-1] + 1
        assert_caches_hold_the_text(ctx)
    return accepted


@pytest.mark.parametrize("k_config", [(1,), (2, 2, 1), (3, 1, 2, 2)])
@pytest.mark.parametrize("replacement", [False, True])
def test_greedy_mcsd_equals_ar_greedy(llama, k_config, replacement):
    b, target, draft = llama
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=1.5)
    for prompt in PROMPTS:
        ref, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="ar", max_new_tokens=30))
        for d in (draft, target, noisy):  # never / always / sometimes accepted
            out, stats = generate_ids(target, prompt, GenerationConfig(
                algo="mcsd", max_new_tokens=30, k_config=k_config, mcsd_replacement=replacement), draft=d)
            assert out == ref, (prompt, type(d).__name__)
            assert stats.draft_tokens == len(k_config) * stats.rounds
            if d is draft:  # one target call per round, one draft call per tree level (+ the prefills)
                prefills = len(prompt) > 1
                # with no context a fused graph feeds a tree's root first (session._run_fused): one more call
                assert stats.target_calls == stats.rounds + prefills + (target.fused and not prefills and max(k_config) > 1)
                assert stats.draft_calls == len(k_config) * stats.rounds + prefills


def test_gpt2_graphs(gpt2_bundle):
    """GPT-2 orders its inputs differently and has no position_ids input: greedy identity and KV state hold too."""
    b = load_bundle(gpt2_bundle)
    target, draft = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=0.3, seed=1)
    for prompt in PROMPTS:
        ref, _ = generate_ids(target, prompt, GenerationConfig(**RAW, algo="ar", max_new_tokens=20))
        for d in (draft, noisy):
            assert generate_ids(target, prompt, GenerationConfig(algo="mcsd", max_new_tokens=20), draft=d)[0] == ref
    run_rounds(target, noisy, [1, 17, 42, 99], 6, algo="mcsd", k_config=(2, 2), temperature=1.0, seed=0)


@pytest.mark.parametrize("cfg", [dict(temperature=0.0, mcsd_replacement=False),
                                 dict(temperature=1.0, mcsd_replacement=True, seed=3),
                                 dict(temperature=0.8, top_k=20, mcsd_replacement=False, seed=4)])
def test_kv_state_after_every_round_equals_a_fresh_forward(llama, cfg):
    b, target, _ = llama
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=0.3, seed=1)
    accepted = run_rounds(target, noisy, [1, 17, 42, 99], 12, algo="mcsd", k_config=(2, 2, 1), **cfg)
    assert min(accepted) < 3  # rounds that stop early ...
    assert 3 in accepted  # ... and rounds that reach a leaf (the draft then lags a token)


def test_other_layouts_keep_the_right_rows(llama):
    b, target, _ = llama
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=0.7, seed=2)
    for k_config in [(1,), (3,), (2, 3), (1, 1, 2)]:
        run_rounds(target, noisy, [5, 6], 6, algo="mcsd", k_config=k_config, temperature=1.0, seed=0,
                   mcsd_replacement=False)


def _first_two_tokens(target, draft, prompt, cfg, n):
    """Counts of the 1st and of the 2nd generated token over n generations (one random stream through all)."""
    rng, counts = np.random.default_rng(cfg.seed), np.zeros((2, target.spec.vocab_size))
    for _ in range(n):
        ctx = prefill(target, prompt, cfg, GenerationStats(), draft=draft)
        ctx.rng = rng
        rounds, out = ALGORITHMS["mcsd"](ctx), []
        while len(out) < 2:
            out += next(rounds)
        counts[0, out[0]] += 1
        counts[1, out[1]] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("strategy, replacement", [("batch", True), ("batch", False), ("tree", False)])
def test_sampled_mcsd_follows_the_target_distribution_on_real_graphs(tiny_vocab_bundle, tiny_vocab_tree_bundle,
                                                                     monkeypatch, strategy, replacement):
    """The real tiny-vocab target and its (very different, TV 0.48) draft: the 1st token must follow p(.|x), the
    2nd the marginal sum_a p(a|x) p(.|x,a). Chi-square with 11 degrees of freedom each: P(> 40) < 1e-4; the
    plain-target fallback instead of the residual scores in the hundreds."""
    b = load_bundle(tiny_vocab_bundle)
    if strategy == "tree" and b.target.graph_kind != "fused":  # a fused graph verifies every strategy as a tree
        b = load_bundle(tiny_vocab_tree_bundle)
    target, draft = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    vocab, prompt = b.vocab_size, [1, 5, 6]
    p1 = probs(target.forward([prompt], target.new_cache())[0, -1, :vocab])
    p2 = probs(target.forward([prompt + [a] for a in range(vocab)], target.new_cache(vocab))[:, -1, :vocab])
    expected = np.stack([p1, p1 @ p2])
    cfg = GenerationConfig(algo="mcsd", temperature=1.0, k_config=(2, 2), mcsd_replacement=replacement,
                           mcsd_strategy=strategy, seed=1)
    n = 2000

    def chi2():
        counts = _first_two_tokens(target, draft, prompt, cfg, n)[:, :vocab]
        return ((counts - n * expected) ** 2 / (n * expected)).sum(axis=1)

    assert (chi2() < 40).all()
    monkeypatch.setattr(candidates, "residual", lambda p, q: p)
    assert (chi2() > 40).all()


def test_sampling_is_reproducible_with_a_seed(llama):
    _, target, draft = llama
    cfg = GenerationConfig(algo="mcsd", max_new_tokens=20, temperature=1.0, seed=7)
    assert generate_ids(target, [1, 2], cfg, draft=draft)[0] == generate_ids(target, [1, 2], cfg, draft=draft)[0]


def test_bad_parameters_are_refused_before_any_round(llama):
    _, target, draft = llama
    calls = target.calls, draft.calls  # a one-token prompt needs no prefill: no model call may happen
    if not target.fused:  # a fused graph takes the tree, and verifies the batch strategy as one
        with pytest.raises(ConfigError, match="tree"):
            generate_ids(target, [1], GenerationConfig(algo="mcsd", mcsd_strategy="tree"), draft=draft)
        with pytest.raises(ConfigError, match="candidate paths"):
            generate_ids(target, [1], GenerationConfig(algo="mcsd", k_config=(8, 8, 8)), draft=draft)
    with pytest.raises(ConfigError, match="draft"):
        generate_ids(target, [1], GenerationConfig(algo="mcsd"))
    assert (target.calls, draft.calls) == calls
    for bad in [dict(k_config=()), dict(k_config=(2, 0)), dict(mcsd_replacement="yes"), dict(mcsd_strategy="x")]:
        with pytest.raises(ConfigError):
            GenerationConfig(algo="mcsd", **bad)
