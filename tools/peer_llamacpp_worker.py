"""llama.cpp side of tools/bench_peers.py; runs in the separate venv .venv-llamacpp (llama-cpp-python built here from
its source distribution, plus the converter's needs: torch CPU, transformers, gguf from the sdist).

Converts the target and the draft HF checkpoints to GGUF at f32 (the same weights as mjsd's fp32 graphs) with the
HF-to-GGUF converter the sdist carries (vendor/llama.cpp/convert_hf_to_gguf.py) into --cache once, then serves JSON
lines on stdin/stdout:
- {"mode": "ar", "ids": [...], "n": N} -> {"tokens": [...], "seconds": wall time of prefill + N greedy tokens}:
  llama-cpp-python's `Llama.generate` (temp 0 = greedy sampler, the KV cache reset first: no prefix reuse).
- {"mode": "spec", "ids": [...], "n": N, "k": K, "ref": [...]} -> {"n_tokens" (N to N+K: its last round may
  overshoot), "seconds", "text_same_as_ref", "stats"}: llama.cpp's own draft-model speculative decoding, the
  `llama-speculative-simple` binary of the same build (`-md draft --spec-type draft-simple --spec-draft-n-max K
  --spec-draft-n-min 0 --spec-draft-p-min 0`: K draft tokens every round, greedy, --ignore-eos),
  one process per generation (load and warm-up outside its timings). It takes text, not ids and prints text, not
  ids: the prompt is llama.cpp's detokenization of `ids`, checked to tokenize back to exactly `ids`; the generated
  text is compared with llama.cpp's detokenization of `ref` (mjsd AR's tokens). `seconds` = its own "encoded" +
  "decoded" times (prefill + decode, printed to the millisecond); `stats` = its predicted/drafted/accepted counts.
Both run with 1 or --threads threads, whichever generates faster at start-up (reported in the hello line), or
--threads with --fixed-threads.
"""
from __future__ import annotations

import argparse
import glob
import json
import re
import subprocess
import sys
import time
from pathlib import Path

VENV = Path(sys.prefix)
TRIES = 3  # runs of llama-speculative-simple per generation when its summary is lost (parse_spec_log)


def llamacpp_src() -> Path:
    """The llama.cpp tree of the llama-cpp-python sdist this venv was built from (setup: BENCHMARKS.md)."""
    hits = sorted(glob.glob(str(VENV / "src" / "llama_cpp_python-*" / "vendor" / "llama.cpp")))
    if not hits:
        raise SystemExit(f"no llama.cpp sources under {VENV / 'src'}: unpack the llama-cpp-python sdist there "
                         "(see BENCHMARKS.md, 'llama.cpp peer')")
    return Path(hits[-1])


def speculative_binary() -> Path:
    path = VENV / "build" / "bin" / "llama-speculative-simple"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: build it in the llama-cpp-python build folder "
                         "(see BENCHMARKS.md, 'llama.cpp peer')")
    return path


def is_gpt2_bytelevel(checkpoint: Path) -> bool:
    pre = json.loads((checkpoint / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)


def convert_main(checkpoint: Path, out: Path) -> None:
    """convert_hf_to_gguf.py at f32. The converter names a BPE pre-tokenizer by hashing a probe string's tokens,
    which matches only published vocabularies; a byte-level BPE with the GPT-2 split regex (the built-in bundle's
    tokenizer) is llama.cpp's "gpt-2" pre-tokenizer, so that is the answer when the hash is unknown."""
    src = llamacpp_src()
    sys.path.insert(0, str(src))
    sys.argv = ["convert_hf_to_gguf.py", str(checkpoint), "--outtype", "f32", "--outfile", str(out)]
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def pre(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if is_gpt2_bytelevel(checkpoint):
                return "gpt-2"
            raise

    TextModel.get_vocab_base_pre = pre
    convert_hf_to_gguf.main()


def convert(checkpoint: Path, out: Path) -> None:
    if out.is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    # a child process: the converter logs freely and must not write on this worker's stdout (the JSON channel)
    subprocess.run([sys.executable, __file__, "--convert", str(checkpoint), str(tmp)], check=True,
                   stdout=subprocess.DEVNULL)
    tmp.rename(out)


class LlamaCpp:
    def __init__(self, cache: Path, threads: int, fixed: bool = False):
        import llama_cpp  # here: this module's parsing helpers import without it (tests, the converter)

        self.lib = llama_cpp
        self.target_path, self.draft_path = cache / "target-f32.gguf", cache / "draft-f32.gguf"
        self.llm = llama_cpp.Llama(str(self.target_path), n_ctx=0, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.binary = speculative_binary()
        vocab = self.llm._model.vocab
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = llama_cpp.llama_vocab_bos(vocab)
        self.threads = threads if fixed else self.best_threads(threads)
        self.lib.llama_set_n_threads(self.llm._ctx.ctx, self.threads, self.threads)

    def best_threads(self, threads: int) -> int:
        """1 or `threads` threads, whichever generates faster here (like the HF peer): ggml's OpenMP workers
        busy-wait, which makes 2 threads many times slower than 1 while other processes hold the cores (measured
        on this shared VM: 64 tokens in 2.7-18.7 s with 2 threads vs 0.46-0.52 s with 1)."""
        ids = [self.bos, *range(100, 140)]
        best = {}
        for t in sorted({1, threads}):
            self.lib.llama_set_n_threads(self.llm._ctx.ctx, t, t)
            self.ar(ids, 16)
            best[t] = min(self.ar(ids, 32)["seconds"] for _ in range(3))
        return min(best, key=best.get)

    def ar(self, ids: list[int], n: int) -> dict:
        t0 = time.perf_counter()
        self.llm.reset()  # no prefix reuse from the previous generation: every system prefills the whole prompt
        tokens = []
        for tok in self.llm.generate(ids, top_k=1, temp=0.0, reset=False):
            tokens.append(int(tok))
            if len(tokens) == n:
                break
        return {"tokens": tokens, "seconds": time.perf_counter() - t0}

    def prompt_text(self, ids: list[int]) -> bytes:
        """Text that llama.cpp tokenizes (special tokens parsed, BOS added as the vocab says) into exactly `ids`."""
        body = ids[1:] if self.add_bos and ids and ids[0] == self.bos else ids
        text = self.llm.detokenize(body, special=True)
        back = self.llm.tokenize(text, add_bos=self.add_bos, special=True)
        if back != ids:
            raise SystemExit(f"llama.cpp does not tokenize the prompt back to the same ids ({back[:8]}... vs "
                             f"{ids[:8]}...): llama-speculative-simple takes text, so it cannot run this prompt")
        return text

    def spec(self, ids: list[int], n: int, k: int, ref: list[int] | None) -> dict:
        # it stops once it has more than -n tokens; the last round may draft past that (n_tokens: n to n + K)
        t = str(self.threads)
        cmd = [str(self.binary), "-m", str(self.target_path), "-md", str(self.draft_path), "-p", self.prompt_text(ids),
               "-n", str(n - 1), "--spec-type", "draft-simple", "--spec-draft-n-max", str(k), "--spec-draft-n-min", "0",
               "--spec-draft-p-min", "0", "--temp", "0", "--top-k", "1", "--ignore-eos", "-t", t, "-tb", t, "-td", t,
               "-c", "0"]
        for attempt in range(TRIES):
            r = subprocess.run(cmd, capture_output=True, timeout=600)
            err = r.stderr.decode("utf-8", "replace")
            if r.returncode:
                raise SystemExit(f"llama-speculative-simple failed ({r.returncode}):\n{err[-2000:]}")
            stats = parse_spec_log(err)
            if stats:
                break
        else:
            raise SystemExit(f"llama-speculative-simple printed no summary in {TRIES} runs:\n{err[-2000:]}")
        stats["retries"] = attempt
        out = {"n_tokens": stats["n_predict"], "seconds": stats["encode_s"] + stats["decode_s"], "stats": stats}
        if ref is not None:  # stdout: "\n\n", the prompt's pieces, the generated pieces (n or a few more), ...
            want = b"\n\n" + self.llm.detokenize(ids, special=True) + self.llm.detokenize(ref[:n], special=True)
            out["text_same_as_ref"] = r.stdout.startswith(want)
        return out


def parse_spec_log(err: str) -> dict | None:
    """Its summary lines, or None when they are missing: llama.cpp's logger writes from a thread that the process
    does not wait for at exit (ggml-org/llama.cpp#22142), so on a busy machine a run's last lines can be lost. They
    come last in one queue with the generated text, so a run whose summary is there printed everything."""
    found = {key: re.search(pattern, err) for key, pattern in (
        ("encode_s", r"encoded\s+\d+ tokens in\s+([\d.]+) seconds"),
        ("decode_s", r"decoded\s+\d+ tokens in\s+([\d.]+) seconds"), ("n_predict", r"n_predict = (\d+)"),
        ("n_drafted", r"n_drafted = (\d+)"), ("n_accept", r"n_accept\s+= (\d+)"))}
    if not all(found.values()):
        return None
    return {key: (float if key.endswith("_s") else int)(m.group(1)) for key, m in found.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", type=Path, help="folder with target/ and draft/ (HF)")
    ap.add_argument("--cache", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-threads", action="store_true", help="use --threads, do not probe 1 vs --threads")
    ap.add_argument("--convert", nargs=2, type=Path, metavar=("CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.convert:
        return convert_main(*args.convert)
    args.cache.mkdir(parents=True, exist_ok=True)
    for role in ("target", "draft"):
        convert(args.checkpoints / role, args.cache / f"{role}-f32.gguf")
    peer = LlamaCpp(args.cache, args.threads, args.fixed_threads)
    print(json.dumps({"ready": True, "version": peer.lib.__version__, "threads": peer.threads}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["mode"] == "ar":
            out = peer.ar(req["ids"], req["n"])
        else:
            out = peer.spec(req["ids"], req["n"], req["k"], req.get("ref"))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
