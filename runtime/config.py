"""Generation parameters and their validation.

Defaults: greedy (temperature 0, reproducible), 128 new tokens; k_config (2, 2, 1) a small MCSD tree (4 leaves);
MCSD sampling without replacement (higher acceptance in the MCSD paper) in batch mode. The joint-decoding defaults
were chosen by measurement (BENCHMARKS.md, "MTAD defaults"): the fastest MTAD on the held-out prompts at T=0 and T=1
whose output perplexity stays below AR's and whose duplicated-line fraction stays within AR's + 0.05 at 64 and 256
tokens: gamma 16, or 24 for mjsd and mtad at T = 0, whose beam-search drafts pass the acceptance test almost to the
end ("auto", gamma None; the most a round drafts: online tuning lowers it where that is faster, e.g. for sps, whose
best here is 3-5), beam width 2, tau 0.05, no-repeat-ngram 3 (without it MTAD loops on lines of `#`), no
draft_p_min.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import ConfigError

MCSD_STRATEGIES = ("batch", "tree")
DEFAULT_GAMMA, GREEDY_JOINT_GAMMA = 16, 24  # what gamma=None (auto) means: auto_gamma


def auto_gamma(algo: str, temperature: float) -> int:
    """The default draft length: 24 for joint decoding's deterministic beam search (mjsd, mtad at T = 0: ~96% of a
    16-token draft passes, so a longer draft saves target calls; +4-7% tokens/s over 16 at 64 new tokens, perplexity
    still below AR's, BENCHMARKS.md "Fifth pass"), 16 otherwise (at T = 1 16 beats 20 and 24)."""
    return GREEDY_JOINT_GAMMA if algo in ("mjsd", "mtad") and temperature == 0 else DEFAULT_GAMMA


def _check(ok: bool, name: str, value, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {name} must be {valid}")


@dataclass(frozen=True)
class GenerationConfig:
    algo: str = "mtad"  # a key of mjsd.runtime.decoding.ALGORITHMS; the CLI and Engine take this default too
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy / deterministic mode
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None = fresh entropy; an int makes sampling reproducible
    # draft tokens per round, at most (sps, mjsd, mtad; mmtad: tree depth); None: auto_gamma (resolved())
    gamma: int | None = None
    beam_width: int = 2  # draft beams (mjsd, mtad, mmtad)
    tau: float = 0.05  # joint-likelihood acceptance threshold (mjsd, mtad, mmtad)
    draft_p_min: float = 0.0  # mjsd, mtad: stop drafting once the best beam's last token has q below it (0 = off)
    no_repeat_ngram_size: int = 3  # ar, sps, mjsd, mtad (not mmtad, mcsd, mjgd): ban n-gram repeats (0 = off)
    # Engine: adapt gamma / beam width between rounds for tokens/s (runtime/tuning.py). None: on, unless a seed is
    # given (tuning follows the timing of the rounds, and a fixed seed must give the same tokens every time)
    tune: bool | None = None
    k_config: tuple[int, ...] = (2, 2, 1)  # MCSD children per depth
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer to decode)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks, like llama.cpp --ignore-eos)
    # ar: tokens decoded per round before they are streamed (SGLang's and vLLM's name); a round also ends after
    # AR_ROUND_S, so a slow model still streams token by token. 1 = every token in a round of its own
    stream_interval: int = 8
    mcsd_replacement: bool = False  # MCSD: sample children with (True) or without (False) replacement
    mcsd_strategy: str = "batch"  # MCSD verification: "batch" rows or one "tree" attention call

    def __post_init__(self) -> None:
        # normalise list inputs (CLI, JSON) to tuples so the config stays hashable and immutable
        for name, valid in (("k_config", "a non-empty sequence of integers >= 1, e.g. (2, 2, 1)"),
                            ("stop", "a list of non-empty strings")):
            value = getattr(self, name)
            if name == "stop" and isinstance(value, str):
                value = (value,)
            _check(isinstance(value, (list, tuple)), name, value, valid)
            object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        from .decoding import ALGORITHMS  # lazy: decoding imports this module

        _check(isinstance(self.algo, str) and self.algo in ALGORITHMS, "algo", self.algo, f"one of {sorted(ALGORITHMS)}")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens,
               "an integer >= 1")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature", self.temperature,
               "a finite number >= 0 (0 = greedy)")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0 = off)")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1] (1 = off)")
        _check(self.seed is None or (_is_int(self.seed) and self.seed >= 0), "seed", self.seed,
               "None or an integer >= 0")
        _check(self.gamma is None or _is_int(self.gamma) and self.gamma >= 1, "gamma", self.gamma,
               "an integer >= 1, or None (auto)")
        _check(_is_int(self.beam_width) and self.beam_width >= 1, "beam_width", self.beam_width, "an integer >= 1")
        _check(_is_num(self.tau) and 0 < self.tau <= 1, "tau", self.tau, "in (0, 1]")
        _check(_is_num(self.draft_p_min) and 0 <= self.draft_p_min < 1, "draft_p_min", self.draft_p_min,
               "in [0, 1) (0 = always draft gamma tokens)")
        _check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size",
               self.no_repeat_ngram_size, "an integer >= 0 (0 = off)")
        _check(len(self.k_config) >= 1 and all(_is_int(k) and k >= 1 for k in self.k_config), "k_config",
               self.k_config, "a non-empty sequence of integers >= 1, e.g. (2, 2, 1)")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "a list of non-empty strings")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")
        _check(_is_int(self.stream_interval) and self.stream_interval >= 1, "stream_interval", self.stream_interval,
               "an integer >= 1 (1 = stream every token)")
        _check(self.tune is None or isinstance(self.tune, bool), "tune", self.tune, "true, false or None (auto)")
        _check(isinstance(self.mcsd_replacement, bool), "mcsd_replacement", self.mcsd_replacement, "true or false")
        _check(self.mcsd_strategy in MCSD_STRATEGIES, "mcsd_strategy", self.mcsd_strategy,
               f"one of {list(MCSD_STRATEGIES)}")

    def resolved(self) -> GenerationConfig:
        """This config with gamma=None (auto) replaced by auto_gamma: what a generation runs with."""
        return self if self.gamma is not None else replace(self, gamma=auto_gamma(self.algo, self.temperature))

    @property
    def lookahead(self) -> int:
        """Cache positions a round may fill beyond the accepted text (reserved up front in the context check)."""
        if self.algo == "ar":
            return 0
        if self.algo == "mcsd":
            if self.mcsd_strategy == "tree":  # every node of the tree is one position
                total, width = 0, 1
                for k in self.k_config:
                    width *= k
                    total += width
                return total
            return len(self.k_config)
        gamma = self.resolved().gamma
        if self.algo == "mmtad":  # every beam of every depth is a tree node
            return gamma * self.beam_width
        return gamma

    @property
    def tuning(self) -> bool:
        """Whether the Engine tunes this generation online: `tune`, or when unset, only without a fixed seed."""
        return self.tune if self.tune is not None else self.seed is None

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    """A finite real number: inf and NaN are refused (inf temperature would silently emit EOS at once)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
