"""Repetition control (no-repeat-ngram) applied alike by AR, SpS and MTAD, and MTAD's adaptive draft length, on
real exported graphs."""
import numpy as np
import pytest

from mjsd.runtime.bundle import load_bundle
from mjsd.runtime.config import GenerationConfig
from mjsd.runtime.decoding import generate_ids
from mjsd.runtime.decoding.mjsd import draft_should_stop
from mjsd.runtime.errors import ConfigError
from mjsd.runtime.repetition import NGramIndex, ban_repeats, banned_tokens
from mjsd.runtime.session import ModelSession

PROMPTS = [[1, 5, 6, 5, 6, 5], [1, 20, 21, 22], [1, 7, 7, 7, 7]]


@pytest.fixture(scope="module")
def llama(llama_bundle):
    b = load_bundle(llama_bundle)
    return ModelSession(b.target, threads=1), ModelSession(b.draft, threads=1)


def test_banned_tokens():
    assert banned_tokens([1, 2, 3, 1, 2], 3).tolist() == [3]  # (1, 2) was followed by 3
    assert banned_tokens([1, 2, 3, 1, 2, 4, 1, 2], 3).tolist() == [3, 4]
    assert banned_tokens([1, 2, 3, 1, 2], 2).tolist() == [3]
    assert banned_tokens([4, 4, 4], 2).tolist() == [4]
    assert banned_tokens([1, 2, 3], 1).tolist() == [1, 2, 3]
    assert banned_tokens([1, 2, 3], 4).size == 0 and banned_tokens([1, 2, 1], 0).size == 0
    assert banned_tokens([1, 2, 3, 1, 9], 3).size == 0


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ngram_index_equals_a_full_scan(n):
    """The incremental index (what the algorithms use) bans exactly what a scan of the whole history bans, as the
    text grows round by round and for any extra tokens after it."""
    rng = np.random.default_rng(n)
    seq, index = [], NGramIndex(n)
    for _ in range(40):
        seq += rng.integers(0, 5, rng.integers(0, 6)).tolist()  # a small vocabulary: many repeats
        index.extend(seq)
        for _ in range(5):
            extra = rng.integers(0, 5, rng.integers(0, 7)).tolist()
            assert index.banned(seq, extra) == banned_tokens(seq + extra, n).tolist(), (seq, extra)
    with pytest.raises(ValueError):
        NGramIndex(1)


def test_ban_repeats_rows_and_never_everything():
    logits = np.zeros((2, 4), np.float32)
    out = ban_repeats(logits, [[0, 1, 0], [2, 3, 2]], 2)
    assert np.isneginf(out[0, 1]) and np.isneginf(out[1, 3]) and np.isfinite(out).sum() == 6
    assert np.all(logits == 0)  # the input is left alone
    assert ban_repeats(logits, [[0], [1]], 0) is logits  # off: no copy
    one = ban_repeats(np.zeros(2, np.float32), [[0, 1, 0, 0, 1, 1]], 1)
    assert np.isfinite(one).all()  # banning both tokens of the vocabulary would leave nothing: not done


def _repeats(seq: list[int], start: int, n: int) -> list[tuple]:
    """n-grams ending at a generated position (>= start) that occurred earlier in seq."""
    seen, out = set(), []
    for i in range(len(seq) - n + 1):
        gram = tuple(seq[i:i + n])
        if i + n - 1 >= start and gram in seen:
            out.append(gram)
        seen.add(gram)
    return out


@pytest.mark.parametrize("cfg", [dict(algo="ar"), dict(algo="sps", gamma=3), dict(algo="mtad", gamma=4),
                                 dict(algo="mtad", gamma=5, beam_width=2, temperature=1.0, top_k=20, seed=3),
                                 dict(algo="sps", gamma=3, temperature=1.0, seed=1)])
def test_no_output_repeats_an_ngram(llama, cfg):
    target, draft = llama
    for prompt in PROMPTS:
        out, stats = generate_ids(target, prompt, GenerationConfig(max_new_tokens=40, ignore_eos=True,
                                                                   no_repeat_ngram_size=3, **cfg), draft=draft)
        assert len(out) == 40 and _repeats(prompt + out, len(prompt), 3) == []


def test_the_control_changes_outputs_that_repeat(llama):
    """Without the control the tiny random model repeats 3-grams on these prompts (so the test above tests it)."""
    target, _ = llama
    outs = [generate_ids(target, p, GenerationConfig(algo="ar", max_new_tokens=40, ignore_eos=True,
                                                     no_repeat_ngram_size=0))[0]
            for p in PROMPTS]
    assert any(_repeats(p + o, len(p), 3) for p, o in zip(PROMPTS, outs))


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_sps_greedy_equals_ar_greedy_under_the_control(llama, gamma):
    target, draft = llama
    for prompt in PROMPTS:
        ar, _ = generate_ids(target, prompt, GenerationConfig(algo="ar", max_new_tokens=30, ignore_eos=True,
                                                              no_repeat_ngram_size=2))
        sps, _ = generate_ids(target, prompt, GenerationConfig(algo="sps", gamma=gamma, max_new_tokens=30,
                                                               ignore_eos=True, no_repeat_ngram_size=2), draft=draft)
        assert sps == ar


def test_draft_should_stop():
    cum, last = np.log([0.5, 0.2]).tolist(), np.log([0.3, 0.9]).tolist()
    assert draft_should_stop(cum, last, 0.4)  # the best beam (0) drew its last token with q = 0.3 < 0.4
    assert not draft_should_stop(cum, last, 0.25)


def test_adaptive_draft_length(llama):
    target, draft = llama
    base = dict(algo="mtad", gamma=6, beam_width=2, max_new_tokens=48, ignore_eos=True)
    fixed_out, fixed = generate_ids(target, [1, 20, 21], GenerationConfig(**base), draft=draft)
    assert fixed.draft_tokens > 5 * fixed.rounds  # 6 a round, fewer only where fewer than 7 tokens remain
    same_out, same = generate_ids(target, [1, 20, 21], GenerationConfig(draft_p_min=1e-9, **base), draft=draft)
    assert same_out == fixed_out and same.draft_tokens == fixed.draft_tokens
    out, short = generate_ids(target, [1, 20, 21], GenerationConfig(draft_p_min=0.9, **base), draft=draft)
    # a random tiny draft is never 90% sure: every round stops after its first token
    assert len(out) == 48 and short.draft_tokens == short.rounds and len(short.drafted_at) == 1


def test_bad_values_are_refused():
    for bad in (dict(no_repeat_ngram_size=-1), dict(no_repeat_ngram_size=2.0), dict(draft_p_min=1.0),
                dict(draft_p_min=-0.1), dict(draft_p_min=float("nan")), dict(tune="yes")):
        with pytest.raises(ConfigError):
            GenerationConfig(**bad)


def test_banned_prefixes_equal_banned_per_prefix():
    """A verification's rows in one pass equal banned() of every draft prefix (random texts, drafts, n, vocabularies
    small enough that n-grams repeat inside the draft too)."""
    rng = np.random.default_rng(0)
    for _ in range(4000):
        n, vocab = int(rng.integers(2, 5)), int(rng.integers(2, 6))
        seq = rng.integers(0, vocab, int(rng.integers(0, 30))).tolist()
        extra = rng.integers(0, vocab, int(rng.integers(0, 12)))
        index = NGramIndex(n)
        index.extend(seq)
        assert index.banned_prefixes(seq, extra) == [index.banned(seq, extra[:j]) for j in range(len(extra) + 1)]
