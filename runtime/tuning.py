"""Online tuning without a power budget: adapt gamma between rounds to maximise tokens/s.

The power controller's machinery (runtime/energy/controller.py: EWMA estimates per configuration, dwell, probes of
neighbours judged by standard errors, backoff, tabu) with the throughput objective and no budget, fed the wall time
of each round instead of meter readings, so it needs no meter. What a configuration yields depends on the prompt
mix and the machine, not on one generation, so the Engine keeps one controller per kind of generation (algorithm,
sampling settings, tau, draft_p_min, the run's gamma and width) and every generation of that kind continues where
the last one left off. Each generation's stats carry the decisions in force during it (`stats.controller`).

It tunes gamma only, never above the run's own (the context check reserved only that lookahead). The beam width
stays the run's: it is a quality knob as much as a speed one (on the built-in bundle, width 1 instead of 2 is faster
but loses MTAD's perplexity advantage over AR; BENCHMARKS.md), and a tuner that chases tokens/s alone would trade
it away. A power budget (runtime/engine.py's BudgetTuner) may still narrow the beams to meet the budget.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace

from .config import GenerationConfig
from .decoding.common import DecodeContext
from .energy.controller import PowerController

GAMMAS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24)  # the steps a tuner walks (finer where acceptance changes)
# Where a tuner starts: the run's gamma, except for sps, whose acceptance decays per token (its best on the built-in
# bundle is 3-6 while MTAD's is 12-16, BENCHMARKS.md): walking down from the shared default 16 one probe at a time
# took SpS more than 32 generations, so it starts at 4 and may grow up to the run's gamma.
SPS_START_GAMMA = 4
# An undecided probe is settled after 2 dwells (24 rounds), not the power controller's 4: without a budget nothing
# rides on a probe but speed, and a long probe of a configuration within noise of the current one is pure cost (the
# first probe of a 32-generation run took 48 of its 80-144 rounds; MTAD tuned vs untuned 3-5% -> 1-2%, BENCHMARKS.md
# "Fifth pass")
PROBE_DWELLS = 2


def search_space(cfg: GenerationConfig) -> tuple[list[int], list[int]]:
    """(widths, gammas) a tuner may pick for `cfg`: its own width, gammas up to its own."""
    return [cfg.beam_width], sorted({g for g in GAMMAS if g <= cfg.gamma} | {cfg.gamma})


def start_gamma(cfg: GenerationConfig) -> int:
    return min(cfg.gamma, SPS_START_GAMMA) if cfg.algo == "sps" else cfg.gamma


def controller_key(cfg: GenerationConfig) -> tuple:
    """Generations that share a key share a controller: what they observe says the same about a configuration."""
    return (cfg.algo, cfg.temperature, cfg.top_k, cfg.top_p, cfg.tau, cfg.draft_p_min, cfg.gamma, cfg.beam_width)


class ThroughputTuner:
    """The driver's `tune` hook: observes each round's tokens and wall time, applies the controller's gamma."""

    def __init__(self, controller: PowerController, lock: threading.Lock,
                 clock: Callable[[], float] = time.perf_counter):
        self.controller, self._lock, self._clock = controller, lock, clock
        self._last: float | None = None
        self._counts = (0, 0)  # stats.draft_tokens, stats.accepted_tokens at the last call
        self._first = 0  # the controller's first decision in force during this generation

    def __call__(self, ctx: DecodeContext, new: list[int] | None) -> None:
        """Called by the driver before the first round (new=None) and after every round."""
        now, s = self._clock(), ctx.stats
        with self._lock:
            if new is None:
                self._first = len(self.controller.history) - 1
            elif self._last is not None and now > self._last and not s.finish_reason:
                # (a generation's last round is cut at max_new_tokens, EOS or a stop string: its tokens say nothing
                # about the configuration, and counting them would penalise long drafts)
                self.controller.observe(ctx.cfg.beam_width, ctx.cfg.gamma, len(new), now - self._last, watts=0.0,
                                        drafted=s.draft_tokens - self._counts[0],
                                        accepted=s.accepted_tokens - self._counts[1])
            width, gamma = self.controller.choose()
            history = self.controller.history[self._first:]
            if s.controller is None or len(history) != len(s.controller):  # (rebuilt every round: ~1% of a round)
                s.controller = [d.to_dict() for d in history]
        if (width, gamma) != (ctx.cfg.beam_width, ctx.cfg.gamma):  # a new config validates itself: only on a change
            ctx.cfg = replace(ctx.cfg, beam_width=width, gamma=gamma)
        self._counts = (s.draft_tokens, s.accepted_tokens)
        self._last = self._clock()  # the tuner's own time is not the next round's

    def resume(self) -> None:
        """At the start of a turn: the time since the last round was other generations'."""
        if self._last is not None:
            self._last = self._clock()


class OnlineTuning:
    """An Engine's throughput controllers, one per controller_key, shared by its generations (thread-safe)."""

    def __init__(self, dwell_rounds: int = 12, ewma_alpha: float = 0.25):
        self.dwell_rounds, self.ewma_alpha = dwell_rounds, ewma_alpha
        self.controllers: dict[tuple, PowerController] = {}
        self._lock = threading.Lock()

    def tuner(self, cfg: GenerationConfig) -> ThroughputTuner:
        cfg = cfg.resolved()
        with self._lock:
            key = controller_key(cfg)
            if key not in self.controllers:
                widths, gammas = search_space(cfg)
                self.controllers[key] = PowerController(widths, gammas, None, "throughput",
                                                        (cfg.beam_width, start_gamma(cfg)), self.ewma_alpha,
                                                        self.dwell_rounds, probe_dwells=PROBE_DWELLS)
            return ThroughputTuner(self.controllers[key], self._lock)
