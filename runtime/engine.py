"""The Python API for services: load a bundle once, generate many times.

    from mjsd.runtime import Engine
    engine = Engine.from_bundle()                      # the built-in bundle; or a path, provider=..., profile=...
    result = engine.generate("def fibonacci(n):", algo="mtad", max_new_tokens=64)
    print(result.text, result.stats.tokens_per_s)
    for piece in engine.stream("import os\n", temperature=0.8, seed=1):
        print(piece, end="", flush=True)

Threads: an Engine may be shared by the threads of a service. ONNX Runtime sessions are thread-safe, but each
generation keeps the device busy and the per-session timers feed the statistics, so generations are serialised by
a lock: a second thread's call waits for the first one to finish (on a 2-8 core edge device, concurrent generations
would only contend for the same cores). For true parallelism create one Engine per worker process.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from .bundle import Bundle, load_bundle
from .config import GenerationConfig
from .decoding import stream_ids
from .decoding.common import DecodeContext
from .errors import ConfigError
from .session import ModelSession
from .stats import GenerationStats

BUILTIN_BUNDLE = "builtin_bundle"


def builtin_bundle_path() -> Path:
    """The bundle shipped with the package (trained on Python's standard library by tools/train_builtin.py)."""
    return Path(str(resources.files("mjsd.runtime") / BUILTIN_BUNDLE))


@dataclass
class Result:
    text: str
    tokens: list[int]
    stats: GenerationStats = field(repr=False)


class TextStream:
    """Iterates over text pieces as they are produced; `tokens`, `text` and `stats` are complete once exhausted.

    Byte-level BPE splits multi-byte characters over tokens, so a piece is only released once it decodes to whole
    characters (no U+FFFD at its end).
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], cfg: GenerationConfig):
        self._engine, self._prompt, self._cfg = engine, prompt_ids, cfg
        self.tokens: list[int] = []
        self.text = ""
        self.stats = GenerationStats()

    def __iter__(self) -> Iterator[str]:
        with self._engine._lock:
            for new in self._engine._rounds(self._prompt, self._cfg, self.stats):
                self.tokens += new
                text = self._engine.decode(self.tokens)
                if text.endswith("\ufffd") and self.stats.finish_reason == "":
                    continue  # an incomplete UTF-8 sequence: wait for the next round
                piece, self.text = text[len(self.text):], text
                if piece:
                    yield piece


class Engine:
    sample_hz = 50.0  # power sampling rate; from_bundle takes the profile's

    def __init__(self, bundle: Bundle, target: ModelSession, draft: ModelSession, *, meters=None, idle_w=None,
                 controller_factory=None):
        self.bundle, self.target, self.draft = bundle, target, draft
        self.tokenizer = bundle.load_tokenizer()
        self.meters, self.idle_w = meters, idle_w
        self._controller_factory = controller_factory
        self._lock = threading.RLock()

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

        prof = load_profile(profile) if isinstance(profile, (str, Path)) else profile
        bundle = load_bundle(path if path is not None else builtin_bundle_path(), verify=verify)
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
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        else:
            ids = [int(t) for t in prompt]
        bos = self.bundle.bos_token_id
        return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- generation ---------------------------------------------------------------------------------------------
    def config(self, config: GenerationConfig | None = None, **params) -> GenerationConfig:
        """A validated GenerationConfig: `config` (or the defaults with algo="mtad") updated with `params`."""
        base = config or GenerationConfig(algo="mtad")
        unknown = sorted(set(params) - set(base.to_dict()))
        if unknown:
            raise ConfigError(f"unknown generation parameter(s) {unknown}; valid: {sorted(base.to_dict())}")
        return replace(base, **params)

    def generate(self, prompt: str | list[int], config: GenerationConfig | None = None, **params) -> Result:
        stream = self.stream(prompt, config, **params)
        for _ in stream:
            pass
        return Result(stream.text, stream.tokens, stream.stats)

    def stream(self, prompt: str | list[int], config: GenerationConfig | None = None, **params) -> TextStream:
        cfg = self.config(config, **params)
        return TextStream(self, self.encode(prompt), cfg)

    def _rounds(self, prompt_ids: list[int], cfg: GenerationConfig, stats: GenerationStats) -> Iterator[list[int]]:
        """The driver's rounds, wrapped in energy accounting and the power controller when configured."""
        tuner = self._controller_factory(cfg) if self._controller_factory and cfg.algo in TUNABLE else None
        kwargs = dict(draft=self.draft, vocab_size=self.bundle.vocab_size, eos_id=self.bundle.eos_token_id,
                      decode=self.decode, tune=tuner)
        if self.meters is None:
            yield from stream_ids(self.target, prompt_ids, cfg, stats, **kwargs)
            return
        from .energy import EnergyMonitor

        with EnergyMonitor(self.meters, hz=self.sample_hz, idle_w=self.idle_w) as mon:
            if tuner is not None:
                tuner.monitor = mon
            yield from stream_ids(self.target, prompt_ids, cfg, stats, phase=mon.phase, **kwargs)
            stats.energy = mon.report(stats.generated_tokens, stats.prompt_tokens).to_dict()
        if tuner is not None:
            stats.controller = [d.to_dict() for d in tuner.controller.history]


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
        if new is not None and self._last is not None and now[0] > self._last[0]:
            self.controller.observe(ctx.cfg.beam_width, ctx.cfg.gamma, len(new), now[0] - self._last[0],
                                    joules=now[1] - self._last[1], accepted=len(new) - 1, drafted=ctx.cfg.gamma)
        width, gamma = self.controller.choose()
        ctx.cfg = replace(ctx.cfg, beam_width=width, gamma=gamma)
        self._last = now


def _controller_factory(profile, power_budget: float | None, objective: str | None):
    from .energy import PowerController
    from .profiles import load_profile

    prof = profile or load_profile("generic-cpu")

    def make(cfg: GenerationConfig) -> BudgetTuner:
        ctl = PowerController.from_profile(prof, power_budget, objective=objective, max_width=cfg.beam_width,
                                           max_gamma=cfg.gamma)
        return BudgetTuner(ctl)

    return make
