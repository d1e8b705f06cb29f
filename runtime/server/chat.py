"""Chat templates: read a bundle's template from its tokenizer files and render messages the way transformers'
`apply_chat_template` does (sandboxed Jinja2, trim_blocks/lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, `add_generation_prompt`, the special tokens as strings), so a prompt is the one the model was
trained with. Only Jinja2 is needed at run time, not transformers.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError

TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 saves the template beside tokenizer_config.json


def load_chat_template(tokenizer_dir: Path) -> tuple[str | None, dict[str, str]]:
    """(template or None, special tokens {"bos_token": "<s>", ...}) from a bundle's tokenizer folder.

    The template is chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or a list of
    {"name", "template"} of which "default" is used)."""
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    specials = {k: v for k, v in specials.items() if v is not None}
    template = None
    if (tokenizer_dir / TEMPLATE_FILE).is_file():
        template = (tokenizer_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):
        named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
        template = named.get("default")
    return template, specials


def _token_text(tok) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    return tok.get("content") if isinstance(tok, dict) else tok


def render_chat(template: str, messages: list[dict], specials: dict[str, str], add_generation_prompt: bool = True,
                **extra) -> str:
    """The prompt text of `messages` under `template`. A template error (including the template's own
    raise_exception, e.g. "roles must alternate") becomes a ConfigError with its message."""
    from jinja2.exceptions import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **specials, **extra)
    except TemplateError as e:
        raise ConfigError(f"the chat template refused these messages: {e}") from None


@lru_cache(maxsize=4)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
