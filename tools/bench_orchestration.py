"""Orchestration overhead of the decoding loop: time outside ONNX Runtime's run calls vs wall time, per round.

Exports (once, into --workdir) a random Llama target of ~30M parameters (6 layers, d 384, 32000-wide logits) and a
1-layer d 128 draft, then runs AR and SpS and prints, per round: wall, target ORT, draft ORT and orchestration
(wall minus ORT) time. Random weights are fine: only timing matters. The shared vocabulary is the full logit width,
so sampling works over 32000 entries like a real Llama. Needs the export extra (torch, optimum-onnx).

    .venv/bin/python tools/bench_orchestration.py --tokens 128 --gamma 4
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers (the checkpoint builder)

VOCAB = 32000


def build_bundle(workdir: Path) -> Path:
    from mjsd.export import export_bundle
    from tests.helpers import make_checkpoint, make_tokenizer

    out = workdir / "bundle"
    if not (out / "bundle.json").exists():
        tok = make_tokenizer(300)
        target = make_checkpoint(workdir / "target", tokenizer=tok, model_vocab_size=VOCAB, layers=6, hidden=384,
                                 heads=6, kv_heads=2, intermediate=1024, max_positions=1024, seed=0)
        draft = make_checkpoint(workdir / "draft", tokenizer=tok, model_vocab_size=VOCAB, layers=1, hidden=128,
                                heads=4, kv_heads=2, intermediate=256, max_positions=1024, seed=1)
        export_bundle(target, draft, out)
    return out


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/mjsd-bench-orchestration"),
              show_default=True, help="where the random checkpoints and their bundle are kept between runs")
@click.option("--tokens", default=128, show_default=True, help="new tokens per run")
@click.option("--prompt-len", default=64, show_default=True)
@click.option("--gamma", default=4, show_default=True)
@click.option("--threads", default=2, show_default=True, help="ORT intra-op threads")
@click.option("--repeats", default=3, show_default=True, help="runs per setting; the fastest is reported")
def main(workdir: Path, tokens: int, prompt_len: int, gamma: int, threads: int, repeats: int) -> None:
    from mjsd.runtime.bundle import load_bundle
    from mjsd.runtime.config import GenerationConfig
    from mjsd.runtime.decoding import generate_ids
    from mjsd.runtime.session import ModelSession

    workdir.mkdir(parents=True, exist_ok=True)
    b = load_bundle(build_bundle(workdir))
    target, draft = ModelSession(b.target, threads=threads), ModelSession(b.draft, threads=threads)
    print(f"target {b.target.path.stat().st_size / 4e6:.1f}M params, draft {b.draft.path.stat().st_size / 4e6:.1f}M "
          f"params (fp32 graph size / 4), logits {VOCAB}, {threads} threads")
    prompt = np.random.default_rng(0).integers(4, VOCAB, prompt_len).tolist()
    print(f"{'setting':<22} {'rounds':>6} {'tok/round':>9} {'wall ms/rd':>10} {'target':>7} {'draft':>7} "
          f"{'orch':>6} {'orch %':>6} {'tok/s':>7}")
    # the random draft is never accepted (1 token per round); the target as its own draft is always accepted
    # (gamma + 1 tokens per round, every verification row filtered): the two ends of the per-round work
    for algo, temperature, d, name in (("ar", 0.0, None, ""), ("ar", 1.0, None, ""), ("sps", 0.0, draft, ""),
                                       ("sps", 1.0, draft, ""), ("sps", 0.0, target, " self"),
                                       ("sps", 1.0, target, " self")):
        cfg = GenerationConfig(algo=algo, max_new_tokens=tokens, gamma=gamma, temperature=temperature, top_k=50,
                               seed=0, ignore_eos=True)
        generate_ids(target, prompt, cfg, draft=d, vocab_size=VOCAB)  # warm-up
        s = min((generate_ids(target, prompt, cfg, draft=d, vocab_size=VOCAB)[1] for _ in range(repeats)),
                key=lambda s: s.wall_time_s)
        ms = 1e3 / s.rounds
        print(f"{algo + name} T={temperature:<{17 - len(name)}} {s.rounds:>6} {s.generated_tokens / s.rounds:>9.2f} "
              f"{s.wall_time_s * ms:>10.2f} {s.target_time_s * ms:>7.2f} {s.draft_time_s * ms:>7.2f} "
              f"{s.orchestration_time_s * ms:>6.2f} {100 * s.orchestration_time_s / s.wall_time_s:>6.1f} "
              f"{s.tokens_per_s:>7.1f}")


if __name__ == "__main__":
    main()
