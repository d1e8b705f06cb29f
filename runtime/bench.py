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

Parse rate does not separate algorithms (100% for all of them on the built-in prompts), so two more metrics that can
contradict a speed or perplexity claim come with it:
- repetition, per completion (up to the first EOS), averaged over prompts: distinct-2 (distinct token bigrams / all
  bigrams; 1 = no bigram repeats) and the duplicated-line fraction (non-blank lines equal, stripped, to an earlier
  line of the same completion; `#\n#\n...` loops push it towards 1);
- the task metric, against the real code that followed the prompt in its held-out file (the prompt file's
  "reference"): next-line exact match (the completion's first non-blank line equals the reference's, stripped) and
  edit similarity of the first REF_LINES non-blank lines (difflib's ratio, 0..1, of the two stripped line lists
  joined by newlines). A completion that drifts into repetition or into the draft's guesses scores lower.

Time is split as the generation stats split it: prefill (prompt processing, both models) and decode; for long
prompts the end-to-end speed-up mixes the two, so the summaries give both speed-ups apart.
"""
from __future__ import annotations

import ast
import codeop
import difflib
import json
import math
import random
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


def load_references(path: str | Path | None = None, limit: int | None = None) -> list[str | None]:
    """The "reference" completion of each prompt of a JSONL prompt file (None where there is none or the file is
    not JSONL), in the order of load_prompts."""
    p = Path(path) if path is not None else builtin_prompts_path()
    if p.suffix != ".jsonl":
        return [None] * len(load_prompts(p, limit))
    items = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    refs = [item.get("reference") if isinstance(item, dict) else None for item in items]
    return refs[:limit] if limit else refs


# --- quality metrics: pure functions of one completion ---------------------------------------------------------------

REF_LINES = 3  # lines of real code the edit similarity compares


def distinct_n(tokens: list[int], n: int = 2) -> float | None:
    """Distinct n-grams / all n-grams of a token sequence (1 = nothing repeats); None below n tokens."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def duplicated_line_fraction(text: str) -> float | None:
    """Share of the non-blank lines that repeat (stripped) an earlier line of the text; None without any line."""
    lines = _lines(text)
    return (len(lines) - len(set(lines))) / len(lines) if lines else None


def next_line_match(completion: str, reference: str) -> bool | None:
    """Whether the completion's first non-blank line equals the reference's (stripped); None without a reference."""
    ref = _lines(reference)
    if not ref:
        return None
    got = _lines(completion)
    return bool(got) and got[0] == ref[0]


def edit_similarity(completion: str, reference: str, lines: int = REF_LINES) -> float | None:
    """difflib's similarity ratio (0..1) of the first `lines` non-blank lines of the reference (fewer if it is
    shorter) and as many of the completion, stripped; None without a reference."""
    ref = _lines(reference)[:lines]
    if not ref:
        return None
    return difflib.SequenceMatcher(None, "\n".join(_lines(completion)[:len(ref)]), "\n".join(ref),
                                   autojunk=False).ratio()


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def config_variant(spec: str, base: GenerationConfig) -> GenerationConfig:
    """A benchmark configuration from `algo[:key=value...]` (e.g. "sps:gamma=5:tune=false", "mcsd-tree"): `base`
    with that algorithm and those GenerationConfig fields."""
    algo, *pairs = spec.strip().split(":")
    changes: dict = {"algo": "mcsd", "mcsd_strategy": "tree"} if algo == "mcsd-tree" else {"algo": algo}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in base.to_dict() or key in ("algo", "stop", "k_config"):
            raise ConfigError(f"{spec!r}: {pair!r} is not key=value with a GenerationConfig field, e.g. "
                              "sps:gamma=5:tune=false")
        old = getattr(base, key)
        try:
            if isinstance(old, bool) or key == "tune":  # tune: None (auto), true or false
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                changes[key] = value.lower() in ("true", "1")
            else:
                changes[key] = type(old)(value) if old is not None else int(value)
        except ValueError:
            kind = "bool" if key == "tune" else type(old).__name__
            raise ConfigError(f"{spec!r}: {key}={value!r} is not a valid {kind}") from None
    return replace(base, **changes)


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
    degraded: set = field(default_factory=set)  # why some readings were not whole measurements (energy accounting)
    texts: list[str] = field(default_factory=list)
    parsed: int = 0  # completions that parse as Python (completion_parses)
    judged: int = 0  # completions of prompts that end in a function header
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    distinct2: list = field(default_factory=list)  # per completion (up to EOS)
    dup_lines: list = field(default_factory=list)
    next_line: list = field(default_factory=list)
    edit_sim: list = field(default_factory=list)
    tuned: list = field(default_factory=list)  # (beam width, gamma) the online tuner ended at, per generation

    def add(self, stats, logprobs: np.ndarray, text: str, parses: bool | None = None, *,
            tokens: list[int] | None = None, reference: str | None = None) -> None:
        """One generation: its stats, the target log-probs of its tokens, its text (up to EOS), the parse verdict,
        its tokens up to EOS and the prompt's reference completion."""
        self.tokens += stats.generated_tokens
        self.seconds += stats.wall_time_s
        self.prompt_tokens += stats.prompt_tokens
        self.prefill_s += stats.prefill_time_s
        self.decode_s += stats.decode_time_s
        self.distinct2.append(distinct_n(tokens, 2) if tokens is not None else None)
        self.dup_lines.append(duplicated_line_fraction(text))
        if reference is not None:
            self.next_line.append(next_line_match(text, reference))
            self.edit_sim.append(edit_similarity(text, reference))
        if getattr(stats, "controller", None):
            self.tuned.append((stats.controller[-1]["width"], stats.controller[-1]["gamma"]))
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
            self.degraded.update(stats.energy.get("degraded") or [])
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
               "parse_rate": self.parsed / self.judged if self.judged else None, "parse_judged": self.judged,
               "distinct_2": _mean(self.distinct2), "dup_line_fraction": _mean(self.dup_lines),
               "half_duplicated": sum(d is not None and d >= 0.5 for d in self.dup_lines),
               "next_line_match": _mean(self.next_line), "edit_similarity": _mean(self.edit_sim),
               "prefill_tokens_per_s": self.prompt_tokens / self.prefill_s if self.prefill_s else None,
               "decode_tokens_per_s": self.tokens / self.decode_s if self.decode_s else None,
               "prefill_speedup_vs_ar": _ratio(baseline.prefill_s, self.prefill_s) if baseline else None,
               "decode_speedup_vs_ar": (_ratio(self.tokens * baseline.decode_s, baseline.tokens * self.decode_s)
                                        if baseline else None)}
        if self.tuned:
            out["tuned_to"] = {f"W={w} gamma={g}": self.tuned.count((w, g)) for w, g in sorted(set(self.tuned))}
        if self.energy_source:
            out.update(energy_j=round(self.energy_j, 4), j_per_token=self.energy_j / self.tokens,
                       avg_w=self.energy_j / self.energy_s if self.energy_s else None,
                       energy_source=self.energy_source, energy_estimated=self.estimated,
                       energy_degraded=sorted(self.degraded))
        return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def run_bench(engine, prompts: list[str], configs: Iterable[tuple[str, GenerationConfig]],
              on_step: Callable[[], None] | None = None, repeats: int = 1, warmup: int = 1,
              engines: dict | None = None, references: list[str | None] | None = None) -> list[dict]:
    """Run every configuration on every prompt, interleaved in a seeded random order per prompt, `repeats` times over
    the set (sampling seeds differ per pass); return one summary per configuration.

    The baseline of a configuration is the "ar" configuration with the same temperature/top_k/top_p, if present.
    warmup: unmeasured generations per configuration first. engines: name -> Engine for configurations that need
    their own (a power budget, no online tuning); the others use `engine`. references: the real continuation of each
    prompt (load_references), for the task metric.
    """
    references = references or [None] * len(prompts)
    # tune=None (auto) is resolved before the per-prompt seeds below, which would otherwise turn tuning off; gamma
    # None (auto) too, so the report says which gamma ran
    rows = [Row(name, replace(cfg.resolved(), ignore_eos=True, tune=cfg.tuning)) for name, cfg in configs]
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
    for i, (prompt, reference) in enumerate(list(zip(prompts, references)) * repeats):
        ids = engine.encode(prompt)
        for row in random.Random(i).sample(rows, len(rows)):  # a fresh order per prompt: no config always goes first
            cfg = replace(row.config, seed=i if row.config.seed is None else row.config.seed + i)
            r = engines.get(row.name, engine).generate(ids, cfg)
            # EOS is ignored for timing; the task metric judges the text up to the first EOS
            end = r.tokens.index(eos) if eos in r.tokens else None
            text = r.text if end is None else engine.decode(r.tokens[:end])
            row.add(r.stats, target_logprobs(engine, ids + r.tokens, len(r.tokens)), text,
                    completion_parses(prompt, text, ended=end is not None), tokens=r.tokens[:end],
                    reference=reference)
            if on_step:
                on_step()

    def sampling(c: GenerationConfig):
        return c.temperature, c.top_k, c.top_p

    base = {sampling(r.config): r for r in rows if r.config.algo == "ar"}
    return [r.summary(base.get(sampling(r.config))) for r in rows]


def format_table(summaries: list[dict]) -> str:
    """A Markdown table of the summaries."""
    head = ("| config | T | tokens/s | vs AR | decode vs AR | accept rate | mean accepted length | "
            "tokens/target call | output ppl | dup lines | distinct-2 | next line | edit sim | parses | J/token |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for s in summaries:
        jpt = s.get("j_per_token")
        energy = "-" if jpt is None else (f"{jpt:.4f}{' (est.)' if s['energy_estimated'] else ''}"
                                          f"{' (DEGRADED)' if s.get('energy_degraded') else ''}")
        lines.append(f"| {s['name']} | {s['temperature']:g} | {s['tokens_per_s']:.1f} | "
                     f"{f(s['speedup_vs_ar'], '.2f')}x | {f(s.get('decode_speedup_vs_ar'), '.2f')}x | "
                     f"{f(s['acceptance_rate'], '.2f')} | "
                     f"{f(s['mean_accepted_length'], '.2f')} | {f(s['tokens_per_target_call'], '.2f')} | "
                     f"{f(s['perplexity'], '.2f')} | {f(s.get('dup_line_fraction'), '.2f')} | "
                     f"{f(s.get('distinct_2'), '.2f')} | {f(s.get('next_line_match'), '.0%')} | "
                     f"{f(s.get('edit_similarity'), '.2f')} | {f(s.get('parse_rate'), '.0%')} | {energy} |")
    return "\n".join(lines)
