"""Test fixtures that build tiny random Hugging Face checkpoints offline (no downloads).

`make_checkpoint(dir, arch="llama", ...)` writes config + random weights + a tokenizer trained on a few strings, so
the export stage and the runtime can be tested on real graphs in seconds.
"""
from __future__ import annotations

from pathlib import Path

# A small fixed corpus: the BPE learns merges from it, the word-level tokenizer its vocabulary.
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts tokens and the target verifies them",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 hello world, hello again!",
    "def main(): return 42  # python source is a fine corpus",
]
# Logits of a graph against PyTorch. A fused graph (ORT's GroupQueryAttention, SkipSimplifiedLayerNormalization)
# differs by ~6e-6 on the dev machine but by up to 1.5e-3 (rel 3.4e-4) on the CI's CPU, with the same packages: it is
# held to about the export's own fused tolerance (rel 1e-3 of logits up to ~4.5 here); the unfused standard graph
# stays within 1e-4 on both. A real fault (a wrong rotary position, a swapped weight) is off by 0.1 or more.
def logits_atol(graph_kind: str) -> float:
    return 5e-3 if graph_kind == "fused" else 1e-4


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# With a tiny vocabulary the word-level tokenizer keeps the specials plus these words (vocab_size - 4 of them).
TINY_WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]


def make_tokenizer(vocab_size: int = 256, kind: str | None = None):
    """A PreTrainedTokenizerFast with <pad>=0, <s>=1, </s>=2, <unk>=3 whose vocabulary has exactly `vocab_size` ids.

    kind "bpe" (byte-level BPE: 4 specials + the 256-byte alphabet + merges, so vocab_size >= 260) or "word"
    (whitespace word-level, 5 <= vocab_size <= ~60). Default: bpe when it fits, else word.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    kind = kind or ("bpe" if vocab_size >= 260 else "word")
    if kind == "bpe":
        if vocab_size < 260:
            raise ValueError("a byte-level BPE tokenizer needs vocab_size >= 260 (4 specials + 256 bytes)")
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS * 4, trainer)
    elif kind == "word":
        if vocab_size < 5:
            raise ValueError("a word-level tokenizer needs vocab_size >= 5 (4 specials + 1 word)")
        words = (TINY_WORDS + sorted({w for line in CORPUS for w in line.split()} - set(TINY_WORDS)))
        words = words[: vocab_size - len(SPECIAL_TOKENS)]
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    if tok.get_vocab_size() != vocab_size:  # BPE stops early if the corpus runs out of merges
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids, wanted {vocab_size}; use a smaller vocab_size")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def make_checkpoint(dir, arch: str = "llama", vocab_size: int = 256, layers: int = 2, hidden: int = 64,
                    heads: int = 4, kv_heads: int | None = None, head_dim: int | None = None,
                    max_positions: int = 256, seed: int = 0, tokenizer=None, intermediate: int | None = None,
                    model_vocab_size: int | None = None) -> Path:
    """Write a tiny random causal-LM checkpoint (config, safetensors weights, tokenizer) to `dir`; return the path.

    llama supports grouped-query attention (`kv_heads` < `heads`) and `head_dim` != hidden/heads. `tokenizer` is a
    PreTrainedTokenizerFast (default: `make_tokenizer(vocab_size)`); pass the same object to a target and a draft so
    they share it. `model_vocab_size` pads the logit width beyond the tokenizer's vocabulary (default: equal).
    """
    from transformers import GPT2Config, LlamaConfig

    out = Path(dir)
    tok = tokenizer if tokenizer is not None else make_tokenizer(vocab_size)
    width = model_vocab_size or len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        config = LlamaConfig(vocab_size=width, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                             head_dim=head_dim or hidden // heads, intermediate_size=intermediate or 2 * hidden,
                             max_position_embeddings=max_positions, tie_word_embeddings=False, **ids)
    elif arch == "gpt2":
        if kv_heads not in (None, heads) or head_dim not in (None, hidden // heads):
            raise ValueError("gpt2 has neither grouped-query attention nor a free head_dim")
        config = GPT2Config(vocab_size=width, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                            n_inner=intermediate, **ids)
    else:
        raise ValueError(f"unknown arch {arch!r} (llama or gpt2)")
    return save_random_model(config, tok, out, seed)


def save_random_model(config, tokenizer, out: Path, seed: int = 0) -> Path:
    """Random weights for `config` saved with `tokenizer` to `out` (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # The default init (std 0.02) makes nearly uniform logits; a wider one gives peaked, seed-dependent distributions
    # that make numerical comparisons and acceptance tests meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
