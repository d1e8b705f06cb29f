"""The OpenAI API's shapes: request bodies, what they mean for a GenerationConfig, responses, stream chunks, errors.

Standard fields: max_tokens (chat also max_completion_tokens), temperature (default 1, as OpenAI's), top_p, seed,
stop, stream (+ stream_options.include_usage), n=1. Extension fields (as vLLM and llama-server accept extra fields):
top_k, algo (ar, sps, mjsd, mtad, mmtad, mcsd, mjgd; default mtad), gamma, beam_width, tau, ignore_eos, and any
other GenerationConfig field by its name (k_config, mcsd_strategy, ...). Fields the runtime cannot honour (n > 1,
logprobs, echo, best_of > 1, penalties, tools, images) are refused with a 400, never silently ignored; unknown
fields are ignored like OpenAI's own clients' extras.
"""
from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerationConfig

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI completions API's default; chat defaults to the room left
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}


class APIError(Exception):
    """An error answered as an OpenAI error object: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
             504: "timeout_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    # extensions
    top_k: int | None = None
    algo: str | None = None
    gamma: int | None = None
    beam_width: int | None = None
    tau: float | None = None
    ignore_eos: bool | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: this server returns one choice per request (n=1)",
                           param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by mjsd's decoders; leave it out or set it to 0",
                               param=name)
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported; leave the field out", param="logprobs")

    def generation_params(self, max_tokens: int) -> dict:
        """GenerationConfig fields for this request (validated by GenerationConfig)."""
        params = dict(algo=self.algo or "mtad", max_new_tokens=max_tokens,
                      temperature=1.0 if self.temperature is None else self.temperature,
                      top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                      stop=() if self.stop is None else self.stop)
        for name in ("top_k", "gamma", "beam_width", "tau", "ignore_eos"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        fields = set(GenerationConfig.__dataclass_fields__) - {"max_new_tokens", *params}
        params.update({k: v for k, v in (self.model_extra or {}).items() if k in fields})
        return params

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported; the prompt is in your request already", param="echo")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string, or token ids. A batch of several prompts is refused."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError(400, f"{len(p)} prompts in one request: send one prompt per request", param="prompt")
            p = p[0]
        if not p:
            raise APIError(400, "the prompt is empty: give some text to continue", param="prompt")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "response_format other than text is not supported", param="response_format")

    def template_messages(self) -> list[dict]:
        """Messages as chat templates expect them: content a string (text parts joined)."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
                content = "".join(str(part.get("text", "")) for part in content)
            out.append({**m.model_dump(exclude_none=True), "content": content or ""})
        return out

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def check_max_tokens(value: int | None) -> None:
    if value is not None and value < 1:
        raise APIError(400, f"max_tokens={value} is invalid: max_tokens must be an integer >= 1", param="max_tokens")


# --- responses ------------------------------------------------------------------------------------------------------

def usage(stats) -> dict:
    """OpenAI usage plus an `mjsd` block: the generation's statistics (acceptance, speed, energy)."""
    s = stats.to_dict()
    block = {k: s[k] for k in ("algo", "finish_reason", "rounds", "draft_tokens", "accepted_tokens", "acceptance_rate",
                               "mean_accepted_length", "per_position_acceptance", "tokens_per_s",
                               "decode_tokens_per_s", "ttft_s", "prefill_time_s", "wall_time_s", "target_time_s",
                               "draft_time_s")}
    e = s.get("energy")
    if e:
        block["energy"] = {k: e.get(k) for k in ("energy_j", "j_per_token", "avg_w", "source", "estimated",
                                                 "degraded")}
    if s.get("controller"):
        block["controller"] = s["controller"][-1]  # the power controller's last decision
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens, "mjsd": block}


def completion(rid: str, model: str, text: str, finish: str | None, stats, chat: bool) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(stats)}


def chunk(rid: str, model: str, created: int, chat: bool, text: str | None = None, finish: str | None = None,
          role: bool = False, stats=None) -> dict:
    """One SSE chunk: a piece of text, the final one with finish_reason, or the usage-only one (stats given)."""
    if stats is not None:
        choices: list[dict] = []
    elif chat:
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": choices}
    if stats is not None:
        out["usage"] = usage(stats)
    return out


def releasable(text: str, stops: tuple[str, ...], final: bool) -> tuple[str, bool]:
    """(the part of `text` that may be sent, whether a stop string was found).

    OpenAI's output ends before the stop string. While generating, a tail that could still grow into a stop string
    is held back; at the end (final) it is released."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True
    if final or not stops:
        return text, False
    hold = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)
    return text[:len(text) - hold], False

