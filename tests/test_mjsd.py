"""MJGD, MJSD and MTAD on real exported graphs: the oracle by brute force, acceptance, KV state, repeatability."""
import dataclasses
import itertools

import numpy as np
import pytest

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import generate_ids, mtad, prefill
from mjsd.runtime.errors import ConfigError
from mjsd.runtime.repetition import ban_tokens
from mjsd.runtime.sampling import log_softmax
from mjsd.runtime.scoring import scorer
from mjsd.runtime.session import ModelSession
from mjsd.runtime.stats import GenerationStats
from tests.test_ar_sps import NoisyDraft
from tests.test_mcsd import PROMPTS, assert_caches_hold_the_text, run_rounds

TINY_PROMPTS = [[1], [1, 5], [1, 6, 7, 8], [2, 4], [1, 10], [1, 8], [1, 4, 9, 8, 9], [3, 10, 11, 4, 5]]


@pytest.fixture(scope="module")
def llama(llama_bundle):
    b = load_bundle(llama_bundle)
    return b, ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)


@pytest.fixture(scope="module")
def tiny(tiny_vocab_bundle):
    b = load_bundle(tiny_vocab_bundle)
    # a second session over the target graph: a draft equal to the target, with its own cache and counters
    return b, ModelSession(b.target, threads=1), ModelSession(b.target, threads=1)


def gen(target, prompt, draft=None, **cfg):
    return generate_ids(target, prompt, GenerationConfig(**cfg), draft=draft)


def joint_logp(model, context, continuations, vocab):
    """log p(y | context) of each continuation [N, k], by one fresh forward without any cache reuse."""
    seqs = np.array([list(context) + list(y) for y in continuations])
    fresh = model.new_cache(batch=len(seqs))
    logprobs = log_softmax(model.forward(seqs, fresh)[:, len(context) - 1:-1, :vocab])
    return np.take_along_axis(logprobs, np.asarray(continuations)[..., None], -1)[..., 0].sum(-1)


# ---- MJGD: the oracle ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,prompts", [(2, TINY_PROMPTS[:3]), (3, TINY_PROMPTS[5:6])])
def test_mjgd_equals_brute_force(tiny, k, prompts):
    b, target, _ = tiny
    vocab = b.vocab_size
    every = np.array(list(itertools.product(range(vocab), repeat=k)))
    for prompt in prompts:
        out, _ = gen(target, prompt, algo="mjgd", gamma=k, max_new_tokens=2 * k)
        text = list(prompt)
        for _ in range(2):  # exhaustive argmax over V^k continuations, block by block
            text += every[int(np.argmax(joint_logp(target, text, every, vocab)))].tolist()
        assert out == text[len(prompt):], prompt


def test_mjgd_refuses_large_vocabularies_and_sampling(llama, tiny):
    _, target, _ = llama
    with pytest.raises(ConfigError, match="vocab"):  # 300^2 sequences
        gen(target, [1], algo="mjgd", gamma=2)
    assert (gen(target, [1, 2], algo="mjgd", gamma=1, max_new_tokens=5)[0]
            == gen(target, [1, 2], algo="ar", max_new_tokens=5)[0])
    with pytest.raises(ConfigError, match="temperature"):
        gen(tiny[1], [1], algo="mjgd", gamma=2, temperature=1.0)


# ---- MJSD / MTAD acceptance ----------------------------------------------------------------------------------

@pytest.mark.parametrize("algo,extra", [("mjsd", {}), ("mtad", dict(temperature=1.0, seed=0)),
                                        ("mtad", dict(temperature=0.7, top_k=5, seed=1))])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_draft_equal_to_target_accepts_full_drafts(tiny, algo, extra, tau):
    _, target, same = tiny
    for width in (1, 4):
        _, stats = gen(target, [1, 5], same, algo=algo, gamma=3, beam_width=width, tau=tau, max_new_tokens=24, **extra)
        assert stats.acceptance_rate == 1.0 and stats.per_position_acceptance == [1.0] * 3
        assert stats.mean_accepted_length == 4.0


def test_mtad_with_tau_near_zero_accepts_everything(llama):
    _, target, draft = llama
    for prompt in PROMPTS:
        _, stats = gen(target, prompt, draft, algo="mtad", temperature=1.0, seed=3, tau=1e-30, max_new_tokens=20)
        assert stats.acceptance_rate == 1.0


def test_statistics(llama):
    _, target, draft = llama
    _, stats = gen(target, [1, 17, 42], draft, algo="mjsd", gamma=3, beam_width=2, max_new_tokens=20)
    # a round drafts gamma = 3 tokens, or fewer near the end (it never drafts past max_new_tokens)
    assert stats.rounds <= stats.draft_tokens <= 3 * stats.rounds and len(stats.per_position_acceptance) == 3
    assert stats.target_calls == stats.rounds + 1 and stats.draft_calls == stats.draft_tokens + 1  # + prefill
    assert stats.generated_tokens == 20 and stats.rounds + stats.accepted_tokens >= 20


# ---- deterministic mode --------------------------------------------------------------------------------------

def test_deterministic_mjsd_is_repeatable(llama):
    _, target, draft = llama
    for prompt in PROMPTS:  # any seed, and mtad at T = 0 is the same beam search
        for make_draft in (lambda: draft, lambda: NoisyDraft(target, scale=0.3, seed=0)):  # rarely / often accepted
            runs = [gen(target, prompt, make_draft(), algo=algo, seed=seed, gamma=3, max_new_tokens=30)
                    for algo, seed in (("mjsd", None), ("mjsd", 5), ("mjsd", None), ("mtad", 9))]
            assert runs[0][0] == runs[1][0] == runs[2][0] == runs[3][0]
    assert runs[0][1].accepted_tokens > 10


def test_beam_head_gives_the_scoring_graphs_children(llama_bundle, tiny_vocab_bundle):
    """A fused draft's beam head (forward_top) returns, from the draft call itself, exactly what the scoring graph
    gives over the n-gram-banned logits of the same call: one row of several tokens, two beam rows, bans that hit
    the best token, a row whose whole vocabulary is banned (left alone), and k changing between calls."""
    for root in (llama_bundle, tiny_vocab_bundle):
        spec = load_bundle(root).draft
        plain, headed = ModelSession(spec, threads=1), ModelSession(spec, threads=1)
        assert headed.beam_head == (spec.graph_kind == "fused")
        if not headed.beam_head:
            continue
        headed.forward([1, 2], headed.new_cache())
        assert headed._beam_sess is None  # opened on the first beam step: other draft calls run the chain graph
        vocab = spec.vocab_size
        a, c = plain.new_cache(), headed.new_cache()
        steps = [([[1, 5, 7, 9]], [[]], 2), ([[3]], [[0, 2]], 2), ([[4], [6]], [[], [1, 3, 5]], 2),
                 ([[8], [2]], [list(range(vocab)), [7]], 3), ([[5], [5]], [[], []], 1)]
        for feed, banned, k in steps:
            if len(feed) != a.batch:
                a.repeat(len(feed)), c.repeat(len(feed))
            logits = plain.forward(feed, a, last=1)[:, -1]
            # a row's ban includes its best token
            banned = [sorted({*row, int(x.argmax())}) if 0 < len(row) < vocab else row for x, row in zip(logits, banned)]
            want = scorer().beam(ban_tokens(logits, banned), vocab, k)
            assert headed.forward_top(feed, c, k, banned) == tuple(want)  # bit-identical floats, same ids
        assert headed._beam_sess is not None
        assert headed.forward_top([[5], [5]], c, 2) == tuple(scorer().beam(plain.forward([[5], [5]], a, last=1)[:, -1],
                                                                            vocab, 2))


def test_mtad_on_the_beam_head_equals_mtad_on_the_scoring_graph(llama, monkeypatch):
    b, target, draft = llama
    if not draft.beam_head:
        pytest.skip("a standard draft graph has no beam head")
    cfg = dict(gamma=6, max_new_tokens=40, no_repeat_ngram_size=2)
    headed = [gen(target, p, draft, algo=a, **cfg)[0] for p in PROMPTS for a in ("mtad", "mjsd")]
    monkeypatch.setattr(draft, "beam_head", False)
    assert headed == [gen(target, p, draft, algo=a, **cfg)[0] for p in PROMPTS for a in ("mtad", "mjsd")]


def test_mjsd_finds_the_joint_argmax_greedy_misses(tiny):
    """Draft = target and a beam as wide as the vocabulary: two beam-search steps are exhaustive, so the first block
    is MJGD's; on some prompts that is not the greedy path and has a higher joint likelihood."""
    b, target, same = tiny
    beaten = 0
    for prompt in TINY_PROMPTS:
        # 3 new tokens: a round drafts no more than the generation can still emit, and this one must draft 2
        joint, _ = gen(target, prompt, same, algo="mjsd", gamma=2, beam_width=b.vocab_size, max_new_tokens=3)
        joint = joint[:2]
        assert joint == gen(target, prompt, algo="mjgd", gamma=2, max_new_tokens=2)[0]
        greedy, _ = gen(target, prompt, algo="ar", max_new_tokens=2)
        scores = joint_logp(target, prompt, [joint, greedy], b.vocab_size)
        assert scores[0] >= scores[1] - 1e-5
        beaten += scores[0] > scores[1] + 1e-3
    assert beaten >= 1  # the tiny random model does trap greedy


def test_deterministic_mjsd_scores_real_likelihoods(tiny):
    """At T = 0 one-hot scores would make MJSD plain greedy verification (= AR greedy); real likelihoods do not."""
    _, target, same = tiny
    differs = [gen(target, p, same, algo="mjsd", gamma=3, beam_width=4, max_new_tokens=12)[0] !=
               gen(target, p, algo="ar", max_new_tokens=12)[0] for p in TINY_PROMPTS]
    assert any(differs)


# ---- KV state and refusals -----------------------------------------------------------------------------------

@pytest.mark.parametrize("algo,cfg", [("mjsd", dict(beam_width=3, tau=0.5)),
                                      ("mtad", dict(beam_width=3, temperature=1.0, seed=2, tau=0.5)),
                                      ("mtad", dict(beam_width=1, temperature=0.9, top_p=0.9, seed=3, tau=0.5)),
                                      ("mjsd", dict(beam_width=2, tau=0.9, top_k=10))])
def test_kv_state_after_every_round_equals_a_fresh_forward(llama, algo, cfg):
    b, target, _ = llama
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=0.3, seed=1)
    accepted = run_rounds(target, noisy, [1, 17, 42, 99], 12, algo=algo, gamma=3, **cfg)
    assert min(accepted) < 3 and 3 in accepted  # partial rounds and full ones (the draft then lags a token)


def test_kv_state_on_gpt2_graphs(gpt2_bundle):
    b = load_bundle(gpt2_bundle)
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=0.3, seed=1)
    for algo, cfg in [("mjsd", {}), ("mtad", dict(temperature=1.0, seed=0))]:
        run_rounds(ModelSession(b.target, threads=1), noisy, [1, 17, 42, 99], 6, algo=algo, gamma=3, **cfg)


def test_gamma_and_width_may_change_between_rounds(llama):
    """The power controller replaces ctx.cfg's gamma / beam_width between rounds."""
    b, target, _ = llama
    cfg = GenerationConfig(algo="mtad", gamma=2, beam_width=1, temperature=1.0, seed=4)
    ctx = prefill(target, [1, 17, 42], cfg, GenerationStats(), draft=NoisyDraft(ModelSession(b.target), 0.3))
    rounds = mtad(ctx)
    for gamma, width in [(2, 1), (5, 4), (1, 2), (3, 3), (4, 1), (2, 4)] * 2:
        ctx.cfg = dataclasses.replace(ctx.cfg, gamma=gamma, beam_width=width)
        drafted = ctx.stats.draft_tokens
        next(rounds)
        assert ctx.stats.draft_tokens - drafted == gamma
        assert_caches_hold_the_text(ctx)


def test_beam_wider_than_the_vocabulary(tiny):
    b, target, draft = tiny[0], tiny[1], ModelSession(tiny[0].draft, threads=1)
    run_rounds(target, draft, [1, 5], 4, algo="mtad", gamma=3, beam_width=2 * b.vocab_size, temperature=1.0, seed=0)
    run_rounds(target, draft, [1, 5], 4, algo="mjsd", gamma=3, beam_width=2 * b.vocab_size)


@pytest.mark.parametrize("bad", [dict(tau=0), dict(tau=1.5), dict(tau=float("nan")), dict(beam_width=0),
                                 dict(gamma=0), dict(beam_width=2.5)])
def test_bad_parameters_are_refused(bad):
    for algo in ("mjsd", "mtad"):
        with pytest.raises(ConfigError):
            GenerationConfig(algo=algo, **bad)


def test_a_draft_is_required(llama):
    with pytest.raises(ConfigError, match="draft"):
        gen(llama[1], [1], algo="mtad")


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (0.0, 7, 1.0), (0.0, 0, 0.8), (1.0, 10, 0.9),
                                                     (0.7, 0, 1.0), (1.3, 0, 0.6), (1.0, 12, 1.0)])
def test_scoring_graph_routes_equal_the_dense_scores(temperature, top_k, top_p):
    """beam_step and draft_logprobs (one scorer call, or NumPy where top-p needs whole rows) against the dense
    definitions (scoring_logprobs over the vocabulary): every cfg route, padded logits, banned tokens, ties."""
    from types import SimpleNamespace

    from mjsd.runtime.decoding.mjsd import beam_step, draft_logprobs, score
    from mjsd.runtime.joint import beam_search_step, token_logprobs

    rng = np.random.default_rng(0)
    for t in range(40):
        vocab, width = int(rng.integers(20, 200)), int(rng.integers(1, 4))
        cfg = GenerationConfig(algo="mtad", temperature=temperature, top_k=top_k, top_p=top_p, beam_width=width)
        ctx = SimpleNamespace(cfg=cfg, vocab_size=vocab, rng=np.random.default_rng(t))
        logits = (rng.normal(size=(3, vocab + 2)) * 3).astype(np.float32)  # two padded columns
        logits[:, vocab:] = 99.0
        logits[0, :4] = logits[0, 4]  # ties
        logits[1, 5:9] = -np.inf  # banned
        dense = score(ctx, logits)
        tokens = rng.integers(0, vocab, 3)
        np.testing.assert_allclose(draft_logprobs(ctx, logits, tokens), token_logprobs(dense, tokens), atol=2e-6)
        cum = rng.normal(size=3).tolist()
        parents, toks, new_cum, picked, greedy = beam_step(ctx, logits, cum, 1, sampling=temperature > 0)
        assert np.all(np.isfinite(picked)) and len(parents) == len(toks) <= width
        np.testing.assert_allclose(picked, dense[parents, toks], atol=2e-6)
        np.testing.assert_allclose(new_cum, np.array(cum)[parents] + dense[parents, toks], atol=2e-6)
        if not temperature:  # beam search: the dense step's pairs (ties aside: the lower token on both routes)
            want = beam_search_step(np.array(cum), dense, width, 1)
            assert (parents, toks, greedy) == (want[0].tolist(), want[1].tolist(), want[3])
