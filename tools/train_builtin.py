"""Train the built-in bundle: a code-completion target and a draft distilled from it, on Python's own stdlib source.

Nothing is downloaded: the corpus is the running Python's standard library (tests and site-packages excluded), split
by file into train and held-out validation files. Steps, all seeded and deterministic in data order:

1. byte-level BPE tokenizer trained on the train files;
2. target: a deep, narrow Llama (per-call cost on CPU grows with depth), trained on next-token cross-entropy;
3. draft: a 1-layer Llama distilled from the trained target with KL(target || draft) over the target's full
   distribution, so its proposals are what the target would say (acceptance), not merely what the corpus says;
4. validation perplexity, bits per byte and draft/target agreement on the held-out files;
5. export with `mjsd.export.export_bundle` into --out, plus a provenance file (training.json).

    python tools/train_builtin.py --out runtime/builtin_bundle --minutes-target 30 --minutes-draft 14

Budgets in minutes fix the step count from the throughput of the first steps; the steps taken are logged and written
to training.json, and `--target-steps/--draft-steps` with the same seed reproduce the run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

EOT = "<|endoftext|>"  # document separator, bos and eos (as GPT-2)
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                 "pydoc_data"}  # pydoc_data/topics.py is 0.75 MB of prose in a string, not code
VAL_PERCENT = 5

# Shapes chosen by measurement (tools/measure_shapes.py, table in tools/BUILTIN_BUNDLE.md).
TARGET = dict(num_hidden_layers=12, hidden_size=256, intermediate_size=704, num_attention_heads=4,
              num_key_value_heads=4)
DRAFT = dict(num_hidden_layers=1, hidden_size=192, intermediate_size=512, num_attention_heads=3,
             num_key_value_heads=3)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- corpus


def corpus_files(root: Path) -> list[str]:
    """Sorted relative paths of the stdlib's own .py files, without tests and machine-generated config."""
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.name.startswith(("test_", "_sysconfigdata")):
            continue
        files.append(rel.as_posix())
    return sorted(files)


def is_validation(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100 < VAL_PERCENT


def read_texts(root: Path, rels: list[str]) -> list[str]:
    texts = []
    for rel in rels:
        try:
            texts.append((root / rel).read_text(encoding="utf-8"))
        except UnicodeDecodeError:  # a few files are not UTF-8; skipping keeps the byte counts honest
            pass
    return texts


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=None,
                                   model_max_length=10**6, clean_up_tokenization_spaces=False)


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """All texts as one stream, each file preceded by <|endoftext|> (the prompt start the runtime feeds too)."""
    eot = tok.convert_tokens_to_ids(EOT)
    ids = []
    for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.append(eot)
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int32)


def token_bytes(tok) -> np.ndarray:
    """UTF-8 byte length of every id (specials: 0), for bits per byte."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    out = np.zeros(len(tok), dtype=np.int64)
    for t, i in tok.get_vocab().items():
        if t != EOT:
            out[i] = len(t) if all(c in byte_of for c in t) else len(t.encode())
    return out


# ---------------------------------------------------------------- models and training


def make_model(shape: dict, vocab: int, ctx: int, eot: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=ctx, tie_word_embeddings=True, rope_theta=10000.0,
                      bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, **shape)
    return LlamaForCausalLM(cfg)


def batches(stream: np.ndarray, seq: int, batch: int, seed: int):
    """Endless deterministic batches of random windows of seq+1 tokens."""
    import torch

    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(stream) - seq - 1, size=batch)
        yield torch.from_numpy(np.stack([stream[s:s + seq + 1] for s in starts]).astype(np.int64))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(name: str, model, loss_fn, stream: np.ndarray, args, lr: float, steps: int | None,
          minutes: float, seed: int) -> dict:
    """AdamW + warmup/cosine under bf16 autocast. With steps=None, the step count is planned from `minutes` using
    the speed of steps 3..12 (the schedule needs its length up front)."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(stream, args.seq_len, args.batch, seed)
    warmup, total = min(30, steps or 30), steps or 10**9
    t0 = time.time()
    t_probe = None
    model.train()
    step, recent = 0, []
    while step < total:
        x = next(data)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, lr, warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        recent = [*recent[-9:], loss.item()]
        if step == 3:
            t_probe = time.time()
        if steps is None and step == 13:
            per_step = (time.time() - t_probe) / 10
            total = max(warmup + 1, int((minutes * 60 - (time.time() - t0)) / per_step) + step)
            log(f"{name}: {per_step:.2f} s/step -> {total} steps planned for {minutes} min")
        if step % 200 == 0:  # a checkpoint to fall back on if the machine gets too slow to finish
            model.save_pretrained(args.work / f"{name}-step{step}")
        if step % 10 == 0 or step == total:
            el = time.time() - t0
            log(f"{name}: step {step}/{total} loss {sum(recent) / len(recent):.4f} (mean of 10) lr {opt.param_groups[0]['lr']:.2e} "
                f"{step * args.batch * args.seq_len / el:.0f} tok/s elapsed {el / 60:.1f} min")
    el = time.time() - t0
    return {"steps": step, "seconds": round(el), "tokens": step * args.batch * args.seq_len,
            "tokens_per_s": round(step * args.batch * args.seq_len / el), "peak_lr": lr, "warmup": warmup,
            "batch": args.batch, "seq_len": args.seq_len, "seed": seed}


def ce_loss(model, x):
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1]).logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def kl_loss(target):
    """KL(target || draft) per token, the target's distribution computed on the fly (no gradient)."""
    import torch
    import torch.nn.functional as F

    def fn(model, x):
        with torch.no_grad():
            t = F.log_softmax(target(input_ids=x[:, :-1]).logits.float(), -1)
        d = F.log_softmax(model(input_ids=x[:, :-1]).logits.float(), -1)
        return F.kl_div(d.reshape(-1, d.shape[-1]), t.reshape(-1, t.shape[-1]), log_target=True,
                        reduction="batchmean")

    return fn


# ---------------------------------------------------------------- evaluation


def evaluate(target, draft, stream: np.ndarray, nbytes: np.ndarray, seq: int, max_tokens: int) -> dict:
    """Per-token perplexity and bits per byte of both models on held-out files, in non-overlapping windows of
    `seq` tokens (each window starts without context); draft/target top-1 agreement and sum(min(p, q)), the
    expected acceptance of one drafted token at temperature 1."""
    import torch
    import torch.nn.functional as F

    n = min(len(stream) - 1, max_tokens) // seq * seq
    x = torch.from_numpy(stream[:n + 1].astype(np.int64))
    nll = {"target": 0.0, "draft": 0.0}
    agree = overlap = 0.0
    count = 0
    target.eval(), draft.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, n, seq * 8):
            inp = torch.stack([x[j:j + seq] for j in range(i, min(n, i + seq * 8), seq)])
            lab = torch.stack([x[j + 1:j + seq + 1] for j in range(i, min(n, i + seq * 8), seq)])
            lt = F.log_softmax(target(input_ids=inp).logits.float(), -1)
            ld = F.log_softmax(draft(input_ids=inp).logits.float(), -1)
            nll["target"] -= lt.gather(-1, lab[..., None]).sum().item()
            nll["draft"] -= ld.gather(-1, lab[..., None]).sum().item()
            agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
            overlap += torch.minimum(lt.exp(), ld.exp()).sum().item()
            count += lab.numel()
    total_bytes = int(nbytes[stream[1:n + 1]].sum())
    out = {"tokens": count, "bytes": total_bytes, "window": seq,
           "top1_agreement": round(agree / count, 4), "expected_acceptance_t1": round(overlap / count, 4)}
    for r in ("target", "draft"):
        out[f"{r}_ppl"] = round(math.exp(nll[r] / count), 3)
        out[f"{r}_bits_per_byte"] = round(nll[r] / math.log(2) / total_bytes, 4)
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="bundle directory to write (replaced if present)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mjsd-train"), help="checkpoints, outside the repo")
    ap.add_argument("--minutes-target", type=float, default=30.0)
    ap.add_argument("--minutes-draft", type=float, default=14.0)
    ap.add_argument("--target-steps", type=int, help="train exactly this many steps (overrides --minutes-target)")
    ap.add_argument("--draft-steps", type=int, help="train exactly this many steps (overrides --minutes-draft)")
    ap.add_argument("--reuse-target", action="store_true", help="load the target from --work instead of training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr-target", type=float, default=8e-4)
    ap.add_argument("--lr-draft", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=131072)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    root = Path(sysconfig.get_paths()["stdlib"])
    rels = corpus_files(root)
    train_rels = [r for r in rels if not is_validation(r)]
    val_rels = [r for r in rels if is_validation(r)]
    train_texts, val_texts = read_texts(root, train_rels), read_texts(root, val_rels)
    log(f"corpus: Python {platform.python_version()} stdlib at {root}: {len(train_texts)} train files "
        f"({sum(len(t.encode()) for t in train_texts) / 1e6:.1f} MB), {len(val_texts)} validation files")

    tdir, ddir = args.work / "target", args.work / "draft"
    if args.reuse_target:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(tdir)
    else:
        tok = train_tokenizer(train_texts, args.vocab)
    train_ids, val_ids = token_stream(tok, train_texts), token_stream(tok, val_texts)
    nbytes = token_bytes(tok)
    eot = tok.convert_tokens_to_ids(EOT)
    log(f"tokenizer: {len(tok)} ids; train {len(train_ids)} tokens, val {len(val_ids)} tokens, "
        f"{nbytes[val_ids].sum() / len(val_ids):.2f} bytes/token on val")

    if args.reuse_target:
        from transformers import LlamaForCausalLM

        target = LlamaForCausalLM.from_pretrained(tdir)
        target_run = json.loads((tdir / "run.json").read_text())
        log(f"target: reused from {tdir}")
    else:
        target = make_model(TARGET, len(tok), args.seq_len, eot)
        log(f"target: {sum(p.numel() for p in target.parameters()) / 1e6:.2f}M params {TARGET}")
        target_run = train("target", target, ce_loss, train_ids, args, args.lr_target, args.target_steps,
                           args.minutes_target, args.seed)
        target.save_pretrained(tdir)
        tok.save_pretrained(tdir)
        (tdir / "run.json").write_text(json.dumps(target_run))
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)

    draft = make_model(DRAFT, len(tok), args.seq_len, eot)
    log(f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M params {DRAFT}")
    draft_run = train("draft", draft, kl_loss(target), train_ids, args, args.lr_draft, args.draft_steps,
                      args.minutes_draft, args.seed + 1)
    draft.save_pretrained(ddir)
    tok.save_pretrained(ddir)

    log("evaluating on held-out files")
    ev = evaluate(target, draft, val_ids, nbytes, args.seq_len, args.eval_tokens)
    log(f"validation: {json.dumps(ev)}")

    from mjsd.export import export_bundle

    log(f"exporting to {args.out}")
    # the tree-attention target graph costs no speed for AR/SpS (tools/bench_tree_graph.py) and enables mmtad
    export_bundle(tdir, ddir, args.out, force=True, tree_attention=True)
    provenance = {
        "corpus": {"python": platform.python_version(), "stdlib": str(root), "files": len(rels),
                   "train_files": len(train_texts), "validation_files": len(val_texts),
                   "train_tokens": int(len(train_ids)), "validation_tokens": int(len(val_ids)),
                   "excluded_dirs": sorted(EXCLUDED_DIRS), "validation_rule": f"sha256(relpath) % 100 < {VAL_PERCENT}"},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tok), "special": EOT},
        "target": {"shape": TARGET, "params": sum(p.numel() for p in target.parameters()), **target_run},
        "draft": {"shape": DRAFT, "params": sum(p.numel() for p in draft.parameters()), **draft_run,
                  "loss": "KL(target || draft)"},
        "validation": ev,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "reproduce": (f"python tools/train_builtin.py --out {args.out} --seed {args.seed} --vocab {args.vocab} "
                      f"--target-steps {target_run['steps']} --draft-steps {draft_run['steps']}"),
        "total_minutes": round((time.time() - t_start) / 60, 1),
    }
    (args.out / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log(f"done in {(time.time() - t_start) / 60:.1f} min; provenance in {args.out / 'training.json'}")


if __name__ == "__main__":
    main()
