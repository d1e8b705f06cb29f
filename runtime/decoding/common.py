"""What every decoding algorithm shares: the DecodeContext and its small helpers.

An algorithm is a generator `algo(ctx) -> Iterator[list[int]]`: each round it appends its new tokens to `ctx.ids`
and yields them. The driver (driver.py) owns prefill, EOS, max_new_tokens, stop strings and timing, and closes the
generator when done, so algorithms loop forever.

Pending-token convention (algorithms.md): `ctx.ids` is prompt + generated; its last token is pending, in neither
cache. A cache holds `ids[:cache.length]`; `ctx.unfed(cache)` is what a model must be fed next (usually the pending
token, sometimes one more draft token the draft never saw). The one exception: for AR, prefill feeds the whole
prompt and keeps the last row's logits in `ctx.next_logits`, which give the first token without another call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import GenerationConfig
from ..errors import ConfigError
from ..kvcache import KVCache
from ..repetition import NGramIndex, ban_tokens, banned_tokens
from ..sampling import probs, sample, shared_vocab
from ..session import ModelSession
from ..stats import GenerationStats


@dataclass
class DecodeContext:
    target: ModelSession
    target_cache: KVCache
    cfg: GenerationConfig
    stats: GenerationStats
    rng: np.random.Generator
    vocab_size: int  # the shared vocabulary: logits are sliced to it before any use
    ids: list[int]  # prompt + generated tokens; the last one is pending
    draft: ModelSession | None = None
    draft_cache: KVCache | None = None
    ngrams: NGramIndex | None = field(default=None, repr=False)  # of ids, for no_repeat (built on first use)
    next_logits: np.ndarray | None = field(default=None, repr=False)  # the target's [V] logits after ids, if known
    remaining: int = 1 << 30  # tokens the generation may still emit (max_new_tokens - generated; set by the driver)
    eos_id: int | None = None  # the token that ends the generation (None: none does; set by the driver)

    def unfed(self, cache: KVCache) -> list[int]:
        return self.ids[cache.length:]

    def draft_len(self) -> int:
        """This round's gamma: cfg.gamma, or less when fewer tokens remain (a round emits at most gamma + 1), so the
        last round of a generation does not draft and verify tokens that max_new_tokens would cut."""
        return max(1, min(self.cfg.gamma, self.remaining - 1))

    def banned(self, extras) -> list | None:
        """Each row's tokens cfg.no_repeat_ngram_size bans, row r's history being ids + extras[r]
        (runtime/repetition.py); None when the ban is off."""
        n = self.cfg.no_repeat_ngram_size
        if not n:
            return None
        if n == 1:
            return [banned_tokens(self.ids + [int(t) for t in e], n) for e in extras]
        return [self._ngrams().banned(self.ids, e) for e in extras]

    def _ngrams(self) -> NGramIndex:
        n = self.cfg.no_repeat_ngram_size
        if self.ngrams is None or self.ngrams.n != n:
            self.ngrams = NGramIndex(n)
        self.ngrams.extend(self.ids)  # ids only grow: this indexes the last round's tokens
        return self.ngrams

    def no_repeat(self, logits: np.ndarray, extras) -> np.ndarray:
        """logits [R, V] (or [V]) with the banned tokens (banned) at -inf. The logits are a model call's fresh
        output, so the ban is written into them (a copy for n = 1)."""
        return self._ban(logits, self.banned(extras))

    def no_repeat_prefixes(self, logits: np.ndarray, draft) -> np.ndarray:
        """no_repeat(logits, [draft[:j] for j in 0..len(draft)]): a round's verification rows, in one pass."""
        if self.cfg.no_repeat_ngram_size < 2:
            return self.no_repeat(logits, [draft[:j] for j in range(len(draft) + 1)])
        return self._ban(logits, self._ngrams().banned_prefixes(self.ids, draft))

    def _ban(self, logits: np.ndarray, rows: list | None) -> np.ndarray:
        if rows is None:
            return logits
        return ban_tokens(logits, rows, in_place=self.cfg.no_repeat_ngram_size > 1)

    def dist(self, logits: np.ndarray) -> np.ndarray:
        """The filtered distribution of algorithms.md over the shared vocabulary."""
        c = self.cfg
        return probs(shared_vocab(logits, self.vocab_size), c.temperature, c.top_k, c.top_p)

    def pick(self, logits: np.ndarray) -> int:
        """One next token from [V] logits: argmax at T = 0, else a sample of the filtered distribution."""
        if self.cfg.temperature == 0:
            return int(shared_vocab(logits, self.vocab_size).argmax())  # greedy's first index on ties
        return sample(self.dist(logits), self.rng)


def require_tree_attention(ctx: DecodeContext, what: str) -> None:
    """Refuse a tree-verifying algorithm on a target graph without tree attention, naming the fix."""
    if not ctx.target.spec.tree_attention:
        raise ConfigError(f"{what} verifies a token tree in one target call and needs a target graph with tree "
                          "attention, which this bundle lacks: re-export it with `mjsd export` (the fused kind has it) or "
                          "`mjsd export --graph-kind standard --tree-attention` "
                          "(export_bundle(..., tree_attention=True))")
