"""Tiny random checkpoints of the model families edge users export, built from configs (nothing downloaded).

`make_family_checkpoint(dir, name, tokenizer)` writes one; FAMILIES maps a name to its config builder. Every config
is as small as its family allows (2 layers, hidden 32, 4 heads, GQA where the family has it) so exporting and
validating one takes seconds.
"""
from __future__ import annotations

from pathlib import Path

VOCAB = 300
POSITIONS = 128
WINDOW = 16  # sliding window of the windowed variants: validation must reach past it


def _common(vocab: int, tok) -> dict:
    return dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _llama_like(cls_name: str, **extra):
    def build(vocab, tok):
        import transformers

        base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=POSITIONS, tie_word_embeddings=False)
        return getattr(transformers, cls_name)(**{**base, **_common(vocab, tok), **extra})
    return build


def _build(cls_name: str, **fields):
    def build(vocab, tok):
        import transformers

        return getattr(transformers, cls_name)(**fields, **_common(vocab, tok))
    return build


# name -> config builder(vocab_size, tokenizer)
FAMILIES = {
    "llama": _llama_like("LlamaConfig"),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen2-sliding": _llama_like("Qwen2Config", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "qwen3": _llama_like("Qwen3Config", head_dim=8),
    "phi3": _llama_like("Phi3Config", sliding_window=None),
    "phi3-sliding": _llama_like("Phi3Config", sliding_window=WINDOW),
    "phi3-longrope": _llama_like(
        "Phi3Config", sliding_window=None, max_position_embeddings=POSITIONS, original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(4)],
                      "long_factor": [2.0 + 0.5 * i for i in range(4)]}),
    "gemma2": _llama_like("Gemma2Config", head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8),
    "gemma3_text": _llama_like("Gemma3TextConfig", head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                               sliding_window_pattern=2),
    "mistral": _llama_like("MistralConfig", sliding_window=WINDOW),
    "smollm3": _llama_like("SmolLM3Config"),
    "granite": _llama_like("GraniteConfig"),
    "olmo2": _llama_like("Olmo2Config"),
    "stablelm": _llama_like("StableLmConfig"),
    "gpt2": _build("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS),
    "gpt_neox": _build("GPTNeoXConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=POSITIONS, rotary_pct=0.25),
    "opt": _build("OPTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                  word_embed_proj_dim=32, max_position_embeddings=POSITIONS),
    "falcon": _build("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                     new_decoder_architecture=False, max_position_embeddings=POSITIONS, alibi=False),
    "falcon-gqa": _build("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                         new_decoder_architecture=True, max_position_embeddings=POSITIONS, alibi=False),
}


# The families the fused graph kind covers (export/fused_graph.py), at head_dim 16: GroupQueryAttention's rotary needs
# a multiple of 16 (the tiny configs above have 8, so `auto` exports them as the standard kind).
FUSED = {
    "llama": _llama_like("LlamaConfig", head_dim=16),
    "qwen2": _llama_like("Qwen2Config", head_dim=16),
    "mistral": _llama_like("MistralConfig", head_dim=16, sliding_window=None),
}


def make_family_checkpoint(dir, name: str, tokenizer, seed: int = 0, vocab: int | None = None,
                           table: dict | None = None) -> Path:
    """Write a tiny random checkpoint of family `name` (config, safetensors weights, tokenizer) to `dir`."""
    from tests.helpers import save_random_model

    config = (table or FAMILIES)[name](vocab or len(tokenizer), tokenizer)
    return save_random_model(config, tokenizer, Path(dir), seed)
