"""Side-by-side benchmarks: algorithms over a prompt set, interleaved, with speed-up vs AR, acceptance, output
perplexity under the target and energy.

Method: every prompt runs every configuration in turn (interleaved, so drift in machine load hits all alike), after
one warm-up generation per configuration; EOS is ignored so all configurations generate the same number of tokens.
tokens/s = generated tokens / wall time (prefill + decode) summed over prompts; speed-up = that / AR's at the same
sampling settings, in the same run. Output perplexity = exp(-mean log p(token | prefix)) under the target at T=1,
unfiltered, over the generated tokens only (algorithms.md), from one fresh target forward per output.

Parse rate (a task metric for code): the share of completions of a function header that are valid Python, by the
rule of `completion_parses`: the function is the prompt from its last `def` line on plus the completion up to the
first EOS; the body ends at the first non-blank line indented no deeper than the `def`. A function that ended there
(or at EOS) must pass `ast.parse`. One cut by max_new_tokens loses its last line if that has no newline yet, and
the rest must be valid so far: complete, or only unfinished (an open bracket, a block awaiting its body: `codeop`),
never a syntax error. On the real bodies of the built-in prompts the rule gives 100% at every cut length.
"""
from __future__ import annotations

import ast
import codeop
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from .config import GenerationConfig
from .errors import ConfigError
from .sampling import log_softmax, shared_vocab


def builtin_prompts_path() -> Path:
    """Function headers + docstrings from stdlib files the built-in bundle never trained on (tools/make_prompts.py)."""
    return Path(str(resources.files("mjsd.runtime") / "data" / "prompts.jsonl"))


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file (objects with a "prompt" field, or strings) or a text file (one per line)."""
    p = Path(path) if path is not None else builtin_prompts_path()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the prompt file {p}: {e}") from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}:{n}: not valid JSON ({e}); a JSONL prompt file has one object per line") \
                    from None
            item = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(item, str) or not item:
                raise ConfigError(f'{p}:{n}: expected a non-empty string or an object with a "prompt" string')
            prompts.append(item)
        else:
            prompts.append(line)
    if not prompts:
        raise ConfigError(f"{p} holds no prompts")
    return prompts[:limit] if limit else prompts


def target_logprobs(engine, ids: list[int], n_new: int) -> np.ndarray:
    """log p(token | prefix) of the last n_new of `ids` under the target, T=1, unfiltered (one fresh forward)."""
    cache = engine.target.new_cache()
    logits = engine.target.forward(np.asarray([ids[:-1]], np.int64), cache)[0, -n_new:]
    lp = log_softmax(shared_vocab(logits, engine.bundle.vocab_size))
    return lp[np.arange(n_new), ids[-n_new:]]


_DEF = re.compile(r"^([ \t]*)(async[ \t]+)?def[ \t]")


def completion_parses(prompt: str, completion: str, ended: bool = False) -> bool | None:
    """Whether a completion of the function header at the end of `prompt` parses as Python (rule: module doc).

    ended: the generation stopped at EOS (end of document), so its last line is complete. None when the prompt has
    no `def` line (nothing to judge).
    """
    lines = prompt.splitlines(keepends=True)
    start = next((i for i in range(len(lines) - 1, -1, -1) if _DEF.match(lines[i])), None)
    if start is None:
        return None
    indent = _indent(lines[start])
    head = "".join(lines[start:])
    body = completion.splitlines(keepends=True)
    if head and not head.endswith("\n") and body:  # the completion continues the prompt's last line
        head, body = head + body[0], body[1:]
    kept = []
    for line in body:
        if line.strip() and _indent(line) <= indent:
            ended = True  # dedent: the function is over
            break
        kept.append(line)
    if not ended and kept and not kept[-1].endswith("\n"):
        kept.pop()  # cut by the token limit inside a line: that line is incomplete
    source = "".join(head.splitlines(keepends=True) + kept)
    source = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in source.split("\n"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings (invalid escapes) are not errors
            if ended:
                ast.parse(source)
            else:  # None = valid but unfinished input; a SyntaxError = invalid
                codeop.compile_command(source, "<completion>", "exec")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False
    return True


def _indent(line: str) -> int:
    line = line.expandtabs()
    return len(line) - len(line.lstrip())


@dataclass
class Row:
    """Totals of one configuration over the prompt set."""

    name: str
    config: GenerationConfig
    tokens: int = 0
    seconds: float = 0.0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_calls: int = 0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    logprob_sum: float = 0.0
    energy_j: float = 0.0
    energy_s: float = 0.0  # seconds the energy accounting covered
    energy_source: str | None = None
    estimated: bool = False
    texts: list[str] = field(default_factory=list)
    parsed: int = 0  # completions that parse as Python (completion_parses)
    judged: int = 0  # completions of prompts that end in a function header

    def add(self, stats, logprobs: np.ndarray, text: str, parses: bool | None = None) -> None:
        self.tokens += stats.generated_tokens
        self.seconds += stats.wall_time_s
        self.rounds += stats.rounds
        self.draft_tokens += stats.draft_tokens
        self.accepted_tokens += stats.accepted_tokens
        self.target_calls += stats.target_calls
        for totals, counts in ((self.drafted_at, stats.drafted_at), (self.accepted_at, stats.accepted_at)):
            totals.extend([0] * (len(counts) - len(totals)))
            for j, c in enumerate(counts):
                totals[j] += c
        self.logprob_sum += float(logprobs.sum())
        if stats.energy:
            self.energy_j += stats.energy["energy_j"]
            self.energy_s += stats.energy["seconds"]
            self.energy_source, self.estimated = stats.energy["source"], stats.energy["estimated"]
        self.texts.append(text)
        if parses is not None:
            self.judged += 1
            self.parsed += parses

    def summary(self, baseline: Row | None) -> dict:
        tps = self.tokens / self.seconds if self.seconds else 0.0
        base_tps = baseline.tokens / baseline.seconds if baseline and baseline.seconds else None
        out = {"name": self.name, **{k: v for k, v in self.config.to_dict().items() if k != "stop"},
               "tokens": self.tokens, "seconds": round(self.seconds, 4), "tokens_per_s": round(tps, 2),
               "speedup_vs_ar": round(tps / base_tps, 3) if base_tps else None,
               "acceptance_rate": self.accepted_tokens / self.draft_tokens if self.draft_tokens else None,
               "mean_accepted_length": 1 + self.accepted_tokens / self.rounds if self.rounds else None,
               "tokens_per_target_call": self.tokens / self.target_calls if self.target_calls else None,
               "per_position_acceptance": [a / d for a, d in zip(self.accepted_at, self.drafted_at)],
               "perplexity": math.exp(-self.logprob_sum / self.tokens) if self.tokens else None,
               "parse_rate": self.parsed / self.judged if self.judged else None, "parse_judged": self.judged}
        if self.energy_source:
            out.update(energy_j=round(self.energy_j, 4), j_per_token=self.energy_j / self.tokens,
                       avg_w=self.energy_j / self.energy_s if self.energy_s else None,
                       energy_source=self.energy_source, energy_estimated=self.estimated)
        return out


def run_bench(engine, prompts: list[str], configs: Iterable[tuple[str, GenerationConfig]],
              on_step: Callable[[], None] | None = None, repeats: int = 1, warmup: int = 1,
              engines: dict | None = None) -> list[dict]:
    """Run every configuration on every prompt, interleaved, `repeats` times over the set (sampling seeds differ per
    pass); return one summary per configuration.

    The baseline of a configuration is the "ar" configuration with the same temperature/top_k/top_p, if present.
    warmup: unmeasured generations per configuration first. engines: name -> Engine for configurations that need
    their own (a power budget); the others use `engine`.
    """
    rows = [Row(name, replace(cfg, ignore_eos=True)) for name, cfg in configs]
    if not rows:
        raise ConfigError("nothing to benchmark: give at least one configuration")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    engines = engines or {}
    for row in rows:  # warm-up: first-call allocations and caches, not measured
        for _ in range(warmup):
            engines.get(row.name, engine).generate(prompts[0], row.config,
                                                   max_new_tokens=min(8, row.config.max_new_tokens))
    eos = engine.bundle.eos_token_id
    for i, prompt in enumerate(prompts * repeats):
        ids = engine.encode(prompt)
        for row in rows:
            cfg = replace(row.config, seed=i if row.config.seed is None else row.config.seed + i)
            r = engines.get(row.name, engine).generate(ids, cfg)
            # EOS is ignored for timing; the task metric judges the text up to the first EOS
            end = r.tokens.index(eos) if eos in r.tokens else None
            text = r.text if end is None else engine.decode(r.tokens[:end])
            row.add(r.stats, target_logprobs(engine, ids + r.tokens, len(r.tokens)), r.text,
                    completion_parses(prompt, text, ended=end is not None))
            if on_step:
                on_step()

    def sampling(c: GenerationConfig):
        return c.temperature, c.top_k, c.top_p

    base = {sampling(r.config): r for r in rows if r.config.algo == "ar"}
    return [r.summary(base.get(sampling(r.config))) for r in rows]


def format_table(summaries: list[dict]) -> str:
    """A Markdown table of the summaries."""
    head = ("| config | T | tokens/s | vs AR | accept rate | mean accepted length | tokens/target call | "
            "output ppl | parses | J/token |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for s in summaries:
        jpt = s.get("j_per_token")
        energy = "-" if jpt is None else f"{jpt:.4f}{' (est.)' if s['energy_estimated'] else ''}"
        lines.append(f"| {s['name']} | {s['temperature']:g} | {s['tokens_per_s']:.1f} | "
                     f"{f(s['speedup_vs_ar'], '.2f')}x | {f(s['acceptance_rate'], '.2f')} | "
                     f"{f(s['mean_accepted_length'], '.2f')} | {f(s['tokens_per_target_call'], '.2f')} | "
                     f"{f(s['perplexity'], '.2f')} | {f(s.get('parse_rate'), '.0%')} | {energy} |")
    return "\n".join(lines)
