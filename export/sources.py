"""Resolve a checkpoint source (local folder or Hugging Face hub id) and read what the bundle needs from its config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mjsd.runtime.errors import ExportError

TASK = "text-generation-with-past"
# Files a hub snapshot needs for config, weights and tokenizer; skips other frameworks' weights (and .bin weights
# unless the repo has no safetensors).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"]


def reason(e: BaseException) -> str:
    """A library exception as one short line for an error message: its type and first line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _looks_like_hub_id(src: str) -> bool:
    parts = src.split("/")
    return (not src.startswith((".", "/", "~")) and len(parts) <= 2 and all(parts)
            and "\\" not in src)


def resolve_source(src: str | Path, role: str) -> Path:
    """Return a local folder holding the checkpoint: the path itself, or a hub snapshot (downloaded or cached)."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ExportError(f"{role} checkpoint {src} is a file; pass the folder holding config.json")
        if not (p / "config.json").is_file():
            raise ExportError(f"{role} checkpoint {src} has no config.json; pass a Hugging Face checkpoint folder")
        return p.resolve()
    if not _looks_like_hub_id(str(src)):
        raise ExportError(f"{role} checkpoint {src} does not exist; pass a local checkpoint folder or a hub id")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(str(src), allow_patterns=_HUB_PATTERNS))
        if not any(path.glob("*.safetensors")):  # an older repo with PyTorch .bin weights only
            path = Path(snapshot_download(str(src), allow_patterns=[*_HUB_PATTERNS, "*.bin"]))
        return path
    except Exception as e:  # offline, unknown id, gated repo: all end here
        raise ExportError(f"{role} checkpoint {src!r} is not a local folder and could not be fetched from the "
                          f"Hugging Face hub ({reason(e)}); "
                          "check the path, or the hub id and network") from None


def load_config(path: Path, role: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ExportError(f"{role} checkpoint {path}: cannot read config.json ({reason(e)}); "
                          "is it a Hugging Face checkpoint?") from None


def check_causal_lm(config, role: str) -> None:
    """Refuse what the optimum exporter cannot turn into a decoder graph with a KV cache (encoders, seq2seq, ...)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs with TasksManager)
    from optimum.exporters.tasks import TasksManager

    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise ExportError(f"{role} checkpoint is an encoder-decoder model ({mt}); mjsd needs a decoder-only causal LM")
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(mt, "onnx", library_name="transformers")
    except KeyError:
        raise ExportError(f"{role} checkpoint: model type {mt!r} is not supported by the optimum ONNX exporter; "
                          "mjsd needs a decoder-only causal LM such as llama, qwen2, mistral, phi3 or gpt2") from None
    if TASK not in tasks:
        archs = ", ".join(getattr(config, "architectures", None) or [mt])
        raise ExportError(f"{role} checkpoint ({archs}) is not a causal language model: optimum can export "
                          f"{mt} only as {sorted(tasks)}; mjsd needs a decoder-only causal LM")


def config_dims(config) -> dict[str, Any]:
    """Architecture numbers from the config (the exported graph's KV shape is checked against these later)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    hidden = c.hidden_size
    return {
        "num_layers": c.num_hidden_layers,
        "num_attention_heads": heads,
        "num_kv_heads": _kv_heads(c),
        "head_dim": getattr(c, "head_dim", None) or hidden // heads,
        "hidden_size": hidden,
        "vocab_size": c.vocab_size,
    }


def _kv_heads(c) -> int:
    """KV heads as the model caches them. Falcon names them num_kv_heads; its original architecture ignores that
    field (multi_query: one KV head shared by all query heads, else one per head), and transformers' new-architecture
    Falcon caches keys and values already repeated to every query head."""
    if c.model_type == "falcon":
        if getattr(c, "new_decoder_architecture", False):
            return c.num_attention_heads
        return 1 if getattr(c, "multi_query", False) else c.num_attention_heads
    return getattr(c, "num_key_value_heads", None) or getattr(c, "num_kv_heads", None) or c.num_attention_heads


def optimum_limitation(config) -> str | None:
    """Why optimum's standard graph would come out wrong or fail for this config (checked before exporting), or None."""
    if config.model_type == "falcon" and getattr(config, "new_decoder_architecture", False) \
            and (getattr(config, "num_kv_heads", None) or config.num_attention_heads) != config.num_attention_heads:
        return (f"new-architecture Falcon with {config.num_kv_heads} KV heads: transformers caches its keys and values "
                f"repeated to all {config.num_attention_heads} heads, while optimum-onnx declares "
                f"{config.num_kv_heads}-head past inputs, so its export fails")
    return None


def cap_context(config, ctx: int, role: str, adjust) -> int:
    """The context the exported graph is exact for. A longrope model (Phi-3 128k style) switches its rope factors
    from short to long past original_max_position_embeddings, and a traced graph keeps only the short ones: cap the
    context there; `adjust(message)` records the reason."""
    from .validate import rope_switch

    switch = rope_switch(config)
    if switch is not None and ctx > switch:
        adjust(f"{role} max_context capped from {ctx} to {switch}: longrope switches to its long rope factors past "
               f"original_max_position_embeddings={switch}, which the exported graph does not reproduce")
        return switch
    return ctx


def max_positions(config) -> int | None:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(c, key, None), int):
            return getattr(c, key)
    return None


def count_parameters(config) -> int:
    """Parameter count without loading weights (the model is built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
