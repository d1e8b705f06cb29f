"""HF transformers side of tools/bench_peers.py, in a process of its own like the other peers (in mjsd's process its
torch runtime and objects slowed mjsd's AR by ~2-3%, BENCHMARKS.md "Sixth pass"); runs with mjsd's venv's Python.

Serves JSON lines on stdin/stdout after a hello line ({"ready", "version", "threads"}):
- {"mode": "ar", "ids": [...], "n": N} -> {"tokens": [...], "seconds"}: `generate` greedy, exactly N tokens.
- {"mode": "spec", "ids", "n", "k"} -> the same with `assistant_model` (the draft), K assistant tokens a round.
- {"mode": "logits", "role": "target" | "draft", "ids"} -> {"logits": [[...]]}: one forward (the weights check).
Runs with 1 or --threads torch threads, whichever runs a 1-token forward faster at start-up, or --threads with
--fixed-threads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


class HF:
    def __init__(self, checkpoints: Path, threads: int, fixed: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.torch = torch
        self.target = AutoModelForCausalLM.from_pretrained(checkpoints / "target").eval()
        self.threads = threads if fixed else self.best_threads(threads)
        self.torch.set_num_threads(self.threads)
        self.draft = AutoModelForCausalLM.from_pretrained(checkpoints / "draft").eval()
        eot = self.target.config.eos_token_id
        for m in (self.target, self.draft):  # generate() fills unset values from these: no EOS at all
            m.generation_config.eos_token_id, m.generation_config.pad_token_id = None, eot
        self.config = GenerationConfig(eos_token_id=None, pad_token_id=eot)

    def best_threads(self, threads: int) -> int:
        """1 or `threads` torch threads, whichever runs a 1-token forward faster here: OpenMP's busy-waiting makes
        2 threads many times slower than 1 when another process holds a core (measured on this VM)."""
        x = self.torch.arange(5, 69)[None]
        best = {}
        for t in sorted({1, threads}):
            self.torch.set_num_threads(t)
            with self.torch.inference_mode():
                self.target(x)
                t0 = time.perf_counter()
                for _ in range(10):
                    self.target(x[:, :1])
                best[t] = time.perf_counter() - t0
        return min(best, key=best.get)

    def generate(self, ids: list[int], n: int, gamma: int | None) -> dict:
        x = self.torch.tensor([ids])
        # no EOS token: exactly n tokens (min_length would add a logits processor that assisted generation refuses)
        kw = dict(max_new_tokens=n, do_sample=False, attention_mask=self.torch.ones_like(x),
                  generation_config=self.config)
        if gamma:
            kw.update(assistant_model=self.draft, num_assistant_tokens=gamma,
                      num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.target.generate(x, **kw)
            seconds = time.perf_counter() - t0
        return {"tokens": out[0, len(ids):].tolist(), "seconds": seconds}

    def logits(self, role: str, ids: list[int]):
        with self.torch.inference_mode():
            return getattr(self, role)(self.torch.tensor([ids])).logits[0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=Path, help="folder with target/ and draft/ (HF)")
    ap.add_argument("--cache", type=Path, help="unused (the workers' common interface)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-threads", action="store_true", help="use --threads, do not probe 1 vs --threads")
    args = ap.parse_args()
    import transformers

    hf = HF(args.checkpoints, args.threads, fixed=args.fixed_threads)
    print(json.dumps({"ready": True, "version": transformers.__version__, "threads": hf.threads}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["mode"] == "logits":
            out = {"logits": hf.logits(req["role"], req["ids"]).tolist()}
        else:
            out = hf.generate(req["ids"], req["n"], req["k"] if req["mode"] == "spec" else None)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
