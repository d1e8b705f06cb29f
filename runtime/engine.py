"""The Python API for services: load a bundle once, generate many times.

    from mjsd.runtime import Engine
    engine = Engine.from_bundle()                      # the built-in bundle; or a path, provider=..., profile=...
    result = engine.generate("def fibonacci(n):", algo="mtad", max_new_tokens=64)
    print(result.text, result.stats.tokens_per_s)
    for piece in engine.stream("import os\n", temperature=0.8, seed=1):
        print(piece, end="", flush=True)

Threads: an Engine may be shared by the threads of a service; every generation has its own KV caches, random
generator, statistics and energy monitor. Generations take turns round by round (`Turns`): one holds the engine for
one round (prefill counts as one) and releases it before its tokens reach the consumer, and waiting generations get
the next turn in arrival order. So a stream that is slow or never consumed holds no one up, concurrent clients are
served round-robin, and model time and energy are those of the generation's own rounds (wall time and TTFT include
the waits). Results do not depend on the interleaving: a fixed seed gives the same tokens alone or under load.
Rounds are not run in parallel: on a 2-8 core edge device one session's intra-op threads already use every core.
Stop a generation with `stream.close()` (or `with engine.stream(...) as s:`) from the consuming thread, or with
`stream.cancel()` from any thread: it ends before its next round with finish_reason "cancelled".
"""
from __future__ import annotations

import numbers
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .bundle import Bundle, load_bundle
from .config import GenerationConfig, _is_num
from .decoding import stream_ids
from .decoding.common import DecodeContext
from .errors import ConfigError
from .session import ModelSession
from .stats import GenerationStats
from .tuning import OnlineTuning

BUILTIN_BUNDLE = "builtin_bundle"


def builtin_bundle_path() -> Path:
    """The bundle shipped with the package (trained on Python's standard library by tools/train_builtin.py)."""
    return Path(str(resources.files("mjsd.runtime") / BUILTIN_BUNDLE))


@dataclass
class Result:
    text: str
    tokens: list[int]
    stats: GenerationStats = field(repr=False)


class Turns:
    """A FIFO lock over rounds: `with turns.turn():` waits until every generation that asked earlier had its turn.
    A free lock is taken without queueing: a lone generation pays one lock acquisition a round."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._busy = False

    @property
    def waiting(self) -> int:
        """Generations waiting for a turn (the queue depth)."""
        return len(self._queue)

    def turn(self) -> Turns:
        return self

    def __enter__(self) -> None:
        with self._cond:
            if self._busy or self._queue:
                me = object()
                self._queue.append(me)
                self._cond.wait_for(lambda: not self._busy and self._queue[0] is me)
                self._queue.popleft()
            self._busy = True

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._busy = False
            if self._queue:
                self._cond.notify_all()


class TextStream:
    """Iterates over text pieces as they are produced; `tokens`, `text` and `stats` are complete once exhausted.

    Byte-level BPE splits multi-byte characters over tokens, so a piece is only released once it decodes to whole
    characters (no U+FFFD at its end). `close()` (or leaving a `with` block) ends the generation from the consuming
    thread; `cancel()` asks it to stop before its next round from any thread.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], cfg: GenerationConfig, pieces: bool = True):
        self._engine, self._prompt, self._cfg, self._stream_pieces = engine, prompt_ids, cfg, pieces
        self.tokens: list[int] = []
        self.text = ""
        self.stats = GenerationStats()
        self._cancelled = threading.Event()
        self._pieces = self._generate()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pieces.close()

    def cancel(self) -> None:
        self._cancelled.set()

    def _generate(self) -> Iterator[str]:
        rounds = self._engine._rounds(self._prompt, self._cfg, self.stats, self._cancelled)
        if not self._stream_pieces:  # Engine.generate: the text once, at the end
            for new in rounds:
                self.tokens += new
            self.text = self._engine.decode(self.tokens)
            return
        detok = Detokenizer(self._engine.decode)
        for new in rounds:
            self.tokens += new
            piece = detok.add(new, final=self.stats.finish_reason != "")
            self.text += piece
            if piece:
                yield piece


class Detokenizer:
    """Text of a growing token list, piece by piece, decoding only a window at each step (vLLM's incremental
    detokenization), so a round costs the same at token 10 and at token 4000 instead of re-decoding everything.

    The window starts at the previous piece's first token: decoders that strip or merge at the start of a string
    (SentencePiece's leading space) treat both decodes alike, and the difference is exactly the new text. A piece is
    held back while it ends in an incomplete UTF-8 sequence (U+FFFD), unless it is the last one."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.tokens = decode, []
        self.prefix = self.read = 0  # window start, and where the text released so far ends

    def add(self, new: list[int], final: bool = False) -> str:
        self.tokens += new
        before = self.decode(self.tokens[self.prefix:self.read])
        text = self.decode(self.tokens[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before):]


class Engine:
    sample_hz = 50.0  # power sampling rate; from_bundle takes the profile's

    def __init__(self, bundle: Bundle, target: ModelSession, draft: ModelSession, *, meters=None, idle_w=None,
                 controller_factory=None):
        self.bundle, self.target, self.draft = bundle, target, draft
        self.tokenizer = bundle.load_tokenizer()
        self.meters, self.idle_w = meters, idle_w
        self._controller_factory = controller_factory
        self.tuning = OnlineTuning()  # throughput tuning without a budget, per kind of generation (cfg.tune)
        self.turns = Turns()

    @classmethod
    def from_bundle(cls, path: str | Path | None = None, *, provider: str | list[str] | None = None,
                    threads: int | None = None, profile=None, meter: str | None = "auto", idle_s: float = 0.0,
                    power_budget: float | None = None, objective: str | None = None, verify: bool = True,
                    **session_options) -> Engine:
        """Load a bundle (default: the built-in one) and create its two sessions once.

        provider: an ordered preference ("tensorrt", "cuda", "cpu") or one name (default: the profile's, else cpu);
        unavailable ones are skipped with a logged reason. profile: a device profile name or path (providers, threads, meters, budgets).
        meter: "auto" (best sensor, else the labelled estimate), a backend name, or None for no energy accounting.
        idle_s: seconds to measure the idle baseline once (enables idle-subtracted figures).
        power_budget / objective: adapt beam width and gamma between rounds (mjsd, mtad, sps) to the budget.
        """
        from .profiles import load_profile

        if power_budget is not None and not (_is_num(power_budget) and power_budget > 0):
            raise ConfigError(f"power_budget={power_budget!r} is invalid: give a finite number of watts > 0")
        prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
        bundle = load_bundle(path if path is not None else builtin_bundle_path(), verify=verify)
        if path is None:  # the built-in bundle is fused fp32 (CPU); on CUDA it runs as its fp16 copy (fp16.py)
            session_options.setdefault("fp16", True)
        if provider is None:
            providers = list(prof.providers) if prof is not None else ["cpu"]
        else:
            providers = [provider] if isinstance(provider, str) else list(provider)
        threads = threads or (prof.intra_op_threads if prof is not None else None)
        sessions = [ModelSession(bundle.model(role), providers, threads, **session_options)
                    for role in ("target", "draft")]
        meters = idle_w = None
        if meter is not None:
            from .energy import measure_idle, open_meters

            meters = open_meters(meter, profile=prof)
            idle_w = measure_idle(meters, idle_s) if idle_s > 0 else None
        factory = None
        if power_budget is not None or objective is not None:
            if meters is None:
                raise ConfigError("a power budget or objective needs energy readings: do not disable the meter")
            factory = _controller_factory(prof, power_budget, objective)
        engine = cls(bundle, *sessions, meters=meters, idle_w=idle_w, controller_factory=factory)
        engine.sample_hz = prof.sample_hz if prof is not None else Engine.sample_hz
        return engine

    # --- text <-> ids -----------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; a BOS token (the document separator the models were trained with) goes first."""
        if isinstance(prompt, str):
            if not prompt:
                raise ConfigError("the prompt is empty: give some text to continue")
            check_utf8(prompt)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids = check_token_ids(prompt, self.bundle.vocab_size)
        bos = self.bundle.bos_token_id
        return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- generation ---------------------------------------------------------------------------------------------
    def config(self, config: GenerationConfig | None = None, **params) -> GenerationConfig:
        """A validated GenerationConfig: `config` (or the defaults) updated with `params`, auto gamma resolved."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise ConfigError(f"config must be a GenerationConfig (or None), not {type(config).__name__}; pass "
                              "parameters as keywords, e.g. generate(prompt, temperature=0.8)")
        base = config or GenerationConfig()
        unknown = sorted(set(params) - PARAMETERS)
        if unknown:
            raise ConfigError(f"unknown generation parameter(s) {unknown}; valid: {sorted(PARAMETERS)}")
        return replace(base, **params).resolved()

    def generate(self, prompt: str | list[int], config: GenerationConfig | None = None, **params) -> Result:
        with TextStream(self, self.encode(prompt), self.config(config, **params), pieces=False) as stream:
            for _ in stream:
                pass
        return Result(stream.text, stream.tokens, stream.stats)

    def stream(self, prompt: str | list[int], config: GenerationConfig | None = None, **params) -> TextStream:
        cfg = self.config(config, **params)
        return TextStream(self, self.encode(prompt), cfg)

    def _rounds(self, prompt_ids: list[int], cfg: GenerationConfig, stats: GenerationStats,
                cancelled: threading.Event) -> Iterator[list[int]]:
        """The driver's rounds, one turn each, wrapped in energy accounting and the power controller when
        configured. Between turns the energy monitor is in phase "wait" (other generations' rounds), which its
        report leaves out."""
        tuner = self._controller_factory(cfg) if self._controller_factory and cfg.algo in TUNABLE else None
        if tuner is None and cfg.tuning and cfg.algo in TUNABLE:
            tuner = self.tuning.tuner(cfg)
        kwargs = dict(draft=self.draft, vocab_size=self.bundle.vocab_size, eos_id=self.bundle.eos_token_id,
                      decode=self.decode, tune=tuner)
        if self.meters is None:
            yield from self._take_turns(stream_ids(self.target, prompt_ids, cfg, stats, **kwargs), stats, cancelled,
                                        tuner.resume if tuner is not None else lambda: None)
            return
        from .energy import EnergyMonitor
        from .energy.accounting import WAIT

        with EnergyMonitor(self.meters, hz=self.sample_hz, idle_w=self.idle_w) as mon:
            if tuner is not None:
                tuner.monitor = mon
            phase = [WAIT]  # the driver's current phase, resumed at each turn
            mon.phase(WAIT)

            def enter(name: str) -> None:
                phase[0] = name
                mon.phase(name)

            def resume() -> None:
                mon.phase(phase[0])
                if tuner is not None:
                    tuner.resume()

            rounds = stream_ids(self.target, prompt_ids, cfg, stats, phase=enter, **kwargs)
            try:
                yield from self._take_turns(rounds, stats, cancelled, resume, lambda: mon.phase(WAIT))
            finally:
                stats.energy = mon.report(stats.generated_tokens, stats.prompt_tokens).to_dict()
        if isinstance(tuner, BudgetTuner):  # a ThroughputTuner fills stats.controller itself
            stats.controller = [d.to_dict() for d in tuner.controller.history]

    def _take_turns(self, rounds: Iterator[list[int]], stats: GenerationStats, cancelled: threading.Event,
                    resume=lambda: None, pause=lambda: None) -> Iterator[list[int]]:
        """Run each round of `rounds` in its own turn and yield its tokens outside it; stop once cancelled."""
        try:
            while not cancelled.is_set():
                with self.turns.turn():
                    if cancelled.is_set():
                        break
                    resume()
                    try:
                        new = next(rounds, None)
                    finally:
                        pause()
                if new is None:
                    return
                yield new
            stats.finish_reason = "cancelled"
        finally:
            rounds.close()


def check_utf8(text: str) -> None:
    """Refuse text with lone surrogates: how Python hands over undecodable bytes of argv (and surrogateescape
    streams); the tokenizer would fail on them with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"the prompt is not valid UTF-8 (undecodable byte 0x{ord(text[e.start]) - 0xDC00:02x} at "
                          f"character {e.start}); convert it to UTF-8 first, e.g. with iconv -t UTF-8") from None


def check_token_ids(prompt, vocab_size: int) -> list[int]:
    """A prompt given as token ids: a sequence of integers in 0..vocab_size-1 (no floats, bools or bytes, which
    would be reinterpreted silently)."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise ConfigError("the prompt is bytes: decode it to a str (text) or pass a list of int token ids")
    try:
        ids = list(prompt)
    except TypeError:
        raise ConfigError(f"the prompt must be a str or a list of int token ids, not {type(prompt).__name__}") from None
    # plain ints first: an isinstance test against numbers.Integral costs ~0.6 us a token (~70 us for a prompt)
    bad = None if all(type(t) is int for t in ids) else next(
        (t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, (bool, np.bool_))), None)
    if bad is not None:
        raise ConfigError(f"prompt token id {bad!r} ({type(bad).__name__}) is not an integer: pass a str or a list "
                          "of int token ids")
    ids = [int(t) for t in ids]
    if not ids:
        raise ConfigError("the prompt is empty: give some text or at least one token id")
    if not all(0 <= t < vocab_size for t in ids):
        raise ConfigError(f"prompt token ids must lie in 0..{vocab_size - 1} (the shared vocabulary); got "
                          f"{min(ids)}..{max(ids)}")
    return ids


PARAMETERS = frozenset(f.name for f in fields(GenerationConfig))  # what generate(**params) accepts
TUNABLE = ("sps", "mjsd", "mtad", "mmtad")  # algorithms whose gamma (and beam width) the power controller may change


class BudgetTuner:
    """Feeds each round's outcome to a PowerController and applies its (beam width, gamma) to the next round.

    The controller offers no gamma or beam width above the run's own: the context check reserved only their lookahead.
    """

    def __init__(self, controller):
        self.controller = controller
        self.monitor = None
        self._last: tuple[float, float] | None = None

    def __call__(self, ctx: DecodeContext, new: list[int] | None) -> None:
        """Called by the driver before the first round (new=None) and after every round."""
        now = self.monitor.energy()
        if new is None:  # settle after each change at least as long as the meter lags (NVML power: a 1-s average)
            self.controller.expect_lag(self.monitor.sampler.meter.averaging_s)
        if new is not None and self._last is not None and now[0] > self._last[0]:
            self.controller.observe(ctx.cfg.beam_width, ctx.cfg.gamma, len(new), now[0] - self._last[0],
                                    joules=now[1] - self._last[1], accepted=len(new) - 1, drafted=ctx.cfg.gamma)
        width, gamma = self.controller.choose()
        ctx.cfg = replace(ctx.cfg, beam_width=width, gamma=gamma)
        self._last = now

    def resume(self) -> None:
        """At the start of a turn: the time and energy since the last round were other generations'."""
        if self._last is not None:
            self._last = self.monitor.energy()


def _controller_factory(profile, power_budget: float | None, objective: str | None):
    from .energy import PowerController
    from .profiles import load_profile

    prof = profile or load_profile("generic-cpu")

    def make(cfg: GenerationConfig) -> BudgetTuner:
        ctl = PowerController.from_profile(prof, power_budget, objective=objective, max_width=cfg.beam_width,
                                           max_gamma=cfg.gamma)
        return BudgetTuner(ctl)

    return make
