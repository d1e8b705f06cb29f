"""AR and SpS on real exported graphs, the speculative-sampling math, the driver, config and stats."""
import dataclasses
import importlib

import numpy as np
import pytest

from mjsd.runtime import sampling
from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import ALGORITHMS, generate_ids, prefill, sps, sps_verify, stream_ids
from mjsd.runtime.decoding.sps import LazyRows, greedy_verify
from mjsd.runtime.errors import ConfigError, ContextLengthError
from mjsd.runtime.session import ModelSession
from mjsd.runtime.stats import GenerationStats

SPS_MODULE = importlib.import_module("mjsd.runtime.decoding.sps")  # the package attribute `sps` is the function
AR_MODULE = importlib.import_module("mjsd.runtime.decoding.ar")
PROMPTS = [[1, 17, 42, 99], [1], [5, 250, 3, 8, 60, 61, 62, 63, 64]]


class NoisyDraft:
    """The target graph plus logit noise: a draft that agrees with the target often but not always."""

    def __init__(self, session, scale, seed=0):
        self.s, self.scale, self.rng = session, scale, np.random.default_rng(seed)
        self.spec, self.time_s, self.calls = session.spec, 0.0, 0
        self.beam_head = False  # its logits are noised after the call: beam steps must score them

    def new_cache(self, batch=1):
        return self.s.new_cache(batch)

    def release(self, cache):
        self.s.release(cache)

    def forward(self, tokens, cache, copy=True, last=0):
        self.calls += 1
        logits = self.s.forward(tokens, cache, last=last)
        return logits + self.rng.normal(scale=self.scale, size=logits.shape).astype(np.float32)


@pytest.fixture(scope="module")
def llama(llama_bundle):
    b = load_bundle(llama_bundle)
    return b, ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)


def run(target, prompt, draft=None, **cfg):
    ids, stats = generate_ids(target, prompt, GenerationConfig(**cfg), draft=draft)
    return ids, stats


# ---- T = 0: SpS is token-identical to AR greedy --------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_sps_greedy_equals_ar_greedy(llama, gamma):
    b, target, draft = llama
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=0.2)
    accepted = []
    for prompt in PROMPTS:
        ref, _ = run(target, prompt, algo="ar", max_new_tokens=40)
        for d in (draft, target, noisy):  # rarely / always / often accepted
            out, stats = run(target, prompt, d, algo="sps", max_new_tokens=40, gamma=gamma)
            assert out == ref, (gamma, prompt, type(d).__name__)
            assert stats.generated_tokens == 40 and stats.finish_reason == "length"
            accepted.append(stats.acceptance_rate)
    assert 0.1 < np.mean(accepted[2::3]) < 0.9  # the noisy draft exercises partial acceptance


def test_sps_greedy_statistics(llama):
    _, target, draft = llama
    _, s = run(target, PROMPTS[0], target, algo="sps", max_new_tokens=30, gamma=4)
    assert s.acceptance_rate == 1.0 and s.mean_accepted_length == 5.0 and s.per_position_acceptance == [1.0] * 4
    # one session in both roles: its prefill, verification and draft calls all count as target calls
    assert s.rounds == 6 and s.target_calls == 2 * 1 + 6 + 6 * 4
    assert s.draft_time_s == 0.0 and s.draft_calls == 0
    _, s = run(target, PROMPTS[0], draft, algo="sps", max_new_tokens=30, gamma=4)
    # 4 drafts a round, fewer in the last rounds (never past max_new_tokens): one draft call per draft token
    assert s.target_calls == 1 + s.rounds and s.draft_calls == 1 + s.draft_tokens
    assert s.rounds <= s.draft_tokens <= 4 * s.rounds
    assert s.target_time_s > 0 and s.draft_time_s > 0 and 0 <= s.orchestration_time_s < s.wall_time_s
    d = s.to_dict()
    assert d["algo"] == "sps" and d["prompt_tokens"] == 4 and "energy" not in d


def test_sps_greedy_equals_ar_on_gpt2(gpt2_bundle):
    b = load_bundle(gpt2_bundle)
    target, draft = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    ref, _ = run(target, [1, 2, 3], algo="ar", max_new_tokens=25)
    for d in (draft, target):
        assert run(target, [1, 2, 3], d, algo="sps", max_new_tokens=25, gamma=3)[0] == ref


# ---- KV state after every round equals a fresh forward over the accepted text ----------------------------------

@pytest.mark.parametrize("temperature, noise", [(0.0, 0.2), (1.0, 1.0)])  # noise for ~50% acceptance
def test_caches_equal_fresh_prefill_after_every_round(llama, temperature, noise):
    b, target, _ = llama
    draft = NoisyDraft(ModelSession(b.draft, threads=1), scale=0.0)  # the real draft graph
    noisy = NoisyDraft(ModelSession(b.target, threads=1), scale=noise, seed=3)
    for d in (draft, noisy):
        cfg = GenerationConfig(algo="sps", gamma=3, temperature=temperature, seed=5)
        ctx = prefill(target, PROMPTS[0], cfg, GenerationStats(), draft=d, vocab_size=b.vocab_size)
        rounds = sps(ctx)
        for i in range(8):
            ctx.cfg = dataclasses.replace(cfg, gamma=[3, 1, 4, 2][i % 4])  # a controller may retune every round
            next(rounds)
            assert ctx.target_cache.length == len(ctx.ids) - 1  # the pending token is in neither cache
            assert len(ctx.ids) - 2 <= ctx.draft_cache.length <= len(ctx.ids) - 1
            for m, cache, n in ((target, ctx.target_cache, len(ctx.ids) - 1),
                                (d, ctx.draft_cache, ctx.draft_cache.length)):
                fresh = m.new_cache()
                d.s.forward(ctx.ids[:n], fresh) if m is d else m.forward(ctx.ids[:n], fresh)
                assert all(np.allclose(x, y, atol=1e-4) for x, y in zip(cache.arrays(), fresh.arrays()))


# ---- T > 0: SpS reproduces the target distribution ------------------------------------------------------------

def _tv(a, b):
    return 0.5 * np.abs(a - b).sum()


def _tv_bound(p, n):
    """4x the expected total-variation distance of an n-sample empirical distribution of p."""
    return 4 * 0.5 * np.sqrt(2 * p * (1 - p) / (np.pi * n)).sum()


def _sps_joint(p, q, n, rng):
    """Empirical joint distribution of the first two output tokens, with position-wise fixed p [3,V], q [2,V]."""
    counts = np.zeros((p.shape[1], p.shape[1]))
    for _ in range(n):
        out = []
        while len(out) < 2:  # a round that yields one token is followed by one starting at the next position
            j = len(out)
            drafts = [sampling.sample(q[i], rng) for i in range(j, 2)]
            k, tok = sps_verify(p[j:], q[j:], drafts, rng)
            out += drafts[:k] + [tok]
        counts[out[0], out[1]] += 1
    return counts / n


def _filtered(rng, v, top_k):
    return np.stack([sampling.probs(rng.normal(scale=2, size=v), temperature=1.3, top_k=top_k) for _ in range(3)])


def test_sps_verify_reproduces_target_joint_with_zero_mass_tokens(monkeypatch):
    rng = np.random.default_rng(0)
    v, n = 6, 12000
    p, q = _filtered(rng, v, top_k=3), _filtered(rng, v, top_k=4)[:2]  # zeros in both; q covers tokens p lacks
    truth = np.outer(p[0], p[1])
    emp = _sps_joint(p, q, n, rng)
    bound = _tv_bound(truth.ravel(), n)
    assert _tv(emp, truth) < bound
    assert emp[truth == 0].sum() == 0  # zero-probability target tokens never come out
    # the same bound catches a wrong residual: resampling from p instead of norm(max(0, p - q))
    monkeypatch.setattr(SPS_MODULE, "residual", lambda p_, q_: p_)
    assert _tv(_sps_joint(p, q, n, np.random.default_rng(0)), truth) > bound


def test_one_hot_sps_verify_is_greedy_verification():
    p = np.eye(5)[[2, 4, 1]]
    rng = np.random.default_rng(0)
    for drafts, expected in (([2, 3], (1, 4)), ([2, 4], (2, 1)), ([0, 4], (0, 2))):
        assert sps_verify(p, np.eye(5)[drafts], drafts, rng) == expected
        assert greedy_verify(p.argmax(-1), drafts) == expected


def test_lazy_rows_compute_only_what_verification_reads():
    seen = []
    rows = LazyRows(lambda r: seen.append(r[0]) or r / r.sum(), np.arange(1.0, 13.0).reshape(4, 3))
    assert np.allclose(rows[1], [4 / 15, 5 / 15, 6 / 15]) and rows[1] is rows[1] and seen == [4.0]


def _first_tokens(target, draft, prompt, cfg, n):
    counts = np.zeros(target.spec.vocab_size)
    for seed in range(n):
        ids, _ = generate_ids(target, prompt, dataclasses.replace(cfg, seed=seed), draft=draft)
        counts[ids[0]] += 1
    return counts / n


@pytest.mark.slow
def test_sps_end_to_end_matches_target_distribution(tiny_vocab_bundle, monkeypatch):
    b = load_bundle(tiny_vocab_bundle)
    target, draft = ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)
    prompt, n = [1, 7, 8, 9], 1500  # a prompt where p and q overlap by 25%: a wrong residual is far off
    cfg = GenerationConfig(algo="sps", gamma=2, max_new_tokens=1, temperature=1.0, top_k=4, ignore_eos=True)
    truth = sampling.probs(target.forward(prompt, target.new_cache())[0, -1, :b.vocab_size], 1.0, 4)
    emp = _first_tokens(target, draft, prompt, cfg, n)
    bound = _tv_bound(truth, n)
    assert _tv(emp, truth) < bound and emp[truth == 0].sum() == 0
    monkeypatch.setattr(SPS_MODULE, "residual", lambda p_, q_: p_)
    assert _tv(_first_tokens(target, draft, prompt, cfg, n), truth) > bound


def test_sampled_runs_are_reproducible(llama):
    _, target, draft = llama
    a = run(target, PROMPTS[0], draft, algo="sps", temperature=0.8, top_p=0.9, seed=3, max_new_tokens=20)[0]
    assert a == run(target, PROMPTS[0], draft, algo="sps", temperature=0.8, top_p=0.9, seed=3, max_new_tokens=20)[0]
    c = run(target, PROMPTS[0], algo="ar", temperature=0.8, seed=3, max_new_tokens=20)[0]
    assert c == run(target, PROMPTS[0], algo="ar", temperature=0.8, seed=3, max_new_tokens=20)[0]


# ---- driver: EOS, stop strings, streaming, refusals -------------------------------------------------------------

def test_eos_and_stop_strings_cut_output(llama):
    _, target, draft = llama
    ref, _ = run(target, PROMPTS[0], algo="ar", max_new_tokens=30)
    k = 12
    eos = ref[k]
    first = ref.index(eos)
    ids, s = generate_ids(target, PROMPTS[0], GenerationConfig(algo="sps", max_new_tokens=30), draft=draft,
                          eos_id=eos)
    assert ids == ref[: first + 1] and s.finish_reason == "eos"
    ids, s = generate_ids(target, PROMPTS[0], GenerationConfig(algo="sps", max_new_tokens=30, ignore_eos=True),
                          draft=draft, eos_id=eos)
    assert ids == ref and s.finish_reason == "length"
    decode = lambda t: "".join(f"<{i}>" for i in t)  # noqa: E731
    stop = f"<{ref[k]}><{ref[k + 1]}>"
    end = decode(ref).index(stop)
    ids, s = generate_ids(target, PROMPTS[0], GenerationConfig(algo="sps", max_new_tokens=30, stop=[stop]),
                          draft=target, decode=decode)
    assert s.finish_reason == "stop" and stop in decode(ids) and decode(ids[:-1]).find(stop) == -1
    assert decode(ids).index(stop) == end


def test_streaming_yields_rounds(llama):
    _, target, _ = llama
    stats = GenerationStats()
    chunks = list(stream_ids(target, PROMPTS[0], GenerationConfig(algo="sps", max_new_tokens=13, gamma=4), stats,
                             draft=target))
    assert [len(c) for c in chunks] == [5, 5, 3] and stats.generated_tokens == 13
    assert stats.ttft_s > 0 and stats.prefill_time_s > 0 and stats.wall_time_s >= stats.decode_time_s


def test_ar_rounds_hold_stream_interval_tokens_and_end_at_eos(llama, monkeypatch):
    _, target, _ = llama
    ref, _ = run(target, PROMPTS[0], algo="ar", max_new_tokens=20, stream_interval=1)

    def chunks(eos=None, **cfg):
        stats = GenerationStats()
        out = list(stream_ids(target, PROMPTS[0], GenerationConfig(algo="ar", **cfg), stats, eos_id=eos))
        assert sum(out, []) == ref[: stats.generated_tokens] and stats.rounds == stats.generated_tokens
        return [len(c) for c in out]

    monkeypatch.setattr(AR_MODULE, "AR_ROUND_S", 60.0)  # only the token count ends a round
    assert chunks(max_new_tokens=20) == [1, 8, 8, 3]  # the prompt pass's token alone: time to first token
    assert chunks(max_new_tokens=20, stream_interval=1) == [1] * 20
    k = next(i for i in range(1, 20) if ref.index(ref[i]) == i)  # EOS mid-round: the round and the generation end
    calls = target.calls
    assert sum(chunks(max_new_tokens=20, eos=ref[k]), 0) == k + 1
    assert target.calls - calls == k + 1  # the prompt pass and k steps: nothing decoded past EOS
    monkeypatch.setattr(AR_MODULE, "AR_ROUND_S", 0.0)  # a model slower than AR_ROUND_S a token streams every token
    assert chunks(max_new_tokens=20) == [1] * 20


def test_stopping_a_stream_early_still_finalises_stats(llama):
    _, target, _ = llama
    stats = GenerationStats()
    gen = stream_ids(target, PROMPTS[0], GenerationConfig(algo="ar", max_new_tokens=50), stats)
    next(gen)
    gen.close()
    # one call: AR's prefill takes the whole prompt, and its last logits give the first token
    assert stats.generated_tokens == 1 and stats.wall_time_s > 0 and stats.target_calls == 1


def test_context_overflow_refused_up_front(llama):
    b, target, draft = llama
    ctx = min(b.target.max_context, b.draft.max_context)
    calls = target.calls
    with pytest.raises(ContextLengthError, match=f"needs {ctx + 1} positions but the model context is {ctx}: "
                                                 "at most max_new_tokens=.* fit"):
        run(target, [1] * 10, draft, algo="sps", gamma=4, max_new_tokens=ctx - 10 - 4 + 2)
    assert target.calls == calls
    run(target, [1] * 10, draft, algo="sps", gamma=4, max_new_tokens=ctx - 10 - 4 + 1, ignore_eos=True)
    with pytest.raises(ContextLengthError, match=f"shorten the prompt to at most {ctx} tokens"):
        run(target, [1] * (ctx + 1), algo="ar", max_new_tokens=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "the prompt is empty"),
    (dict(prompt=[1, 100000]), "prompt token ids must lie in 0..299"),
    (dict(algo="sps", draft=None), "needs a draft model"),
    (dict(stop=["x"]), "stop strings need a decode function"),
])
def test_driver_refusals(llama, kwargs, match):
    _, target, draft = llama
    kwargs = dict(kwargs)  # the parameters are shared by every graph kind's run: do not pop from them
    prompt = kwargs.pop("prompt", [1, 2])
    d = kwargs.pop("draft", draft)
    with pytest.raises(ConfigError, match=match):
        generate_ids(target, prompt, GenerationConfig(**kwargs), draft=d)


# ---- config and stats -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, valid", [
    ("algo", "beam", "one of"), ("max_new_tokens", 0, ">= 1"), ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"), ("top_k", -1, ">= 0"), ("top_p", 0.0, "in \\(0, 1\\]"),
    ("top_p", 1.5, "in \\(0, 1\\]"), ("seed", -3, "integer >= 0"), ("gamma", 0, ">= 1"), ("gamma", 2.5, ">= 1"),
    ("beam_width", 0, ">= 1"), ("tau", 0.0, "in \\(0, 1\\]"), ("tau", 1.1, "in \\(0, 1\\]"),
    ("k_config", (), "non-empty"), ("k_config", (2, 0), "non-empty"), ("stop", ("",), "non-empty strings"),
    ("mcsd_strategy", "graph", "one of"), ("mcsd_replacement", "yes", "true or false"),
    ("stream_interval", 0, ">= 1"), ("stream_interval", 2.0, ">= 1"),
])
def test_config_refusals_name_parameter_value_and_range(field, value, valid):
    with pytest.raises(ConfigError, match=f"{field}={value!r}".replace("(", "\\(").replace(")", "\\)")
               .replace("[", "\\[").replace("]", "\\]") + f" is invalid: {field} must be .*{valid}"):
        GenerationConfig(**{field: value})


def test_config_defaults_and_normalisation():
    c = GenerationConfig(algo="sps", k_config=[3, 1], stop="END")
    assert c.k_config == (3, 1) and c.stop == ("END",) and c.gamma is None and c.tau == 0.05  # BENCHMARKS.md
    assert c.resolved().gamma == 16 and GenerationConfig().resolved().gamma == 24  # auto: mtad at T=0 drafts more
    assert GenerationConfig(temperature=1.0).resolved().gamma == 16 and GenerationConfig().lookahead == 24
    assert (c.beam_width, c.no_repeat_ngram_size, c.draft_p_min, c.tune, c.tuning) == (2, 3, 0.0, None, True)
    assert not dataclasses.replace(c, seed=1).tuning and dataclasses.replace(c, seed=1, tune=True).tuning
    assert c.lookahead == 16 and GenerationConfig(algo="ar").lookahead == 0 and GenerationConfig().algo == "mtad"
    assert set(ALGORITHMS) >= {"ar", "sps"}
    with pytest.raises(ConfigError):
        dataclasses.replace(c, gamma=0)


def test_stats_record_round():
    s = GenerationStats()
    s.record_round(4, 4)
    s.record_round(4, 1)
    s.record_round(2, 0)  # a shorter (adaptive) draft counts only for its own positions
    assert s.rounds == 3 and s.draft_tokens == 10 and s.accepted_tokens == 5
    assert s.acceptance_rate == 0.5 and s.mean_accepted_length == pytest.approx(1 + 5 / 3)
    assert s.per_position_acceptance == [2 / 3, 1 / 3, 1 / 2, 1 / 2]
    with pytest.raises(ValueError):
        s.record_round(2, 3)
    s.energy = {"joules": 1.0}
    assert s.to_dict()["energy"] == {"joules": 1.0}


def test_sps_on_the_io_binding_branch_equals_ar(llama):
    b, target, _ = llama
    t, d = (ModelSession(s, threads=1, io_binding=True) for s in (b.target, b.draft))
    ref, _ = run(target, PROMPTS[0], algo="ar", max_new_tokens=30)
    noisy = NoisyDraft(ModelSession(b.target, threads=1, io_binding=True), scale=0.2)
    for draft in (d, noisy):
        assert run(t, PROMPTS[0], draft, algo="sps", max_new_tokens=30, gamma=3)[0] == ref
