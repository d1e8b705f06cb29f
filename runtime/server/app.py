"""The HTTP layer: the OpenAI API's routes over one Engine (FastAPI).

A generation request is validated and tokenized on the event loop, admitted by the Runner (429 when --max-queue
generations are already in), and answered from its Job's events: as one JSON body, or as SSE chunks ending with
`data: [DONE]`. A streamed request waits for its first event before answering, so errors found when the generation
starts (an algorithm the bundle cannot run) are still a 4xx, not a broken stream. A watcher on the connection
cancels the generation when the client goes away (counted with status 499); a per-request deadline answers 504.
Every request ends in exactly one log line and one count in the metrics (`_Exchange.close`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding import ALGORITHMS, check_context
from ..errors import ContextLengthError, MjsdError
from . import protocol
from .chat import load_chat_template, render_chat
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest
from .runner import Job, Runner

log = logging.getLogger("mjsd.serve")
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
CLIENT_GONE = 499  # nginx's status for a request the client abandoned
STOP_TIMEOUT_S = 5.0  # at shutdown, after the grace period: how long cancelled generations may take to stop


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    max_queue: int = 64  # generations admitted at once (running or waiting for their turn)
    timeout_s: float = 300.0  # per request, queueing included
    grace_s: float = 10.0  # at shutdown: how long in-flight requests may take to finish before they are cancelled
    power_budget: float | None = None
    model_id: str | None = None  # default: the bundle's folder name ("mjsd-builtin" for the built-in bundle)


def default_model_id(engine) -> str:
    from ..engine import builtin_bundle_path

    root = engine.bundle.root
    return "mjsd-builtin" if root.resolve() == builtin_bundle_path().resolve() else root.name


def create_app(engine, settings: Settings = Settings()) -> FastAPI:
    runner = Runner(engine, settings.max_queue)
    metrics = Metrics(engine, runner, settings.power_budget)
    template, specials = load_chat_template(engine.bundle.tokenizer_path.parent)
    model = settings.model_id or default_model_id(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info("serving model %s (bundle %s) to %d generations at once", model, engine.bundle.root,
                 settings.max_queue)
        yield
        jobs = runner.stop()  # what the grace period left running
        left = await asyncio.to_thread(runner.wait, jobs, STOP_TIMEOUT_S)
        metrics.close()
        log.info("stopped; %d generation(s) cancelled at shutdown%s", len(jobs),
                 f", {left} of them still running {STOP_TIMEOUT_S:g} s later" if left else "")

    app = FastAPI(title="mjsd", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runner = runner  # serve() marks it draining on SIGTERM

    def endpoint(request: Request) -> str:
        return request.url.path if request.url.path in ENDPOINTS else "other"

    def refuse(request: Request, e: APIError) -> JSONResponse:
        metrics.observe(endpoint(request), e.status)
        log.info("%s %s %d %s", request.method, request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return refuse(request, e)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request body")
        return refuse(request, APIError(400, f"invalid request: {message}", param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = (f"no route {request.method} {request.url.path}; see GET /v1/models, POST /v1/completions, "
                   "POST /v1/chat/completions" if e.status_code in (404, 405) else str(e.detail))
        return refuse(request, APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: still an error object, and logged
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return refuse(request, APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def authorize(request: Request) -> None:
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the key given to "
                                "mjsd serve --api-key", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if runner.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "model": model, "running": len(runner.jobs), "queue_depth": engine.turns.waiting}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        b = engine.bundle
        card = {"id": model, "object": "model", "created": int(b.root.stat().st_mtime), "owned_by": "mjsd",
                "max_model_len": b.max_context, "vocab_size": b.vocab_size, "algorithms": sorted(ALGORITHMS),
                "graph": "tree-attention" if b.target.tree_attention else "standard",
                "chat_template": template is not None}
        metrics.observe("/v1/models", 200)
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        return await generate(request, body, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        return await generate(request, body, chat=True)

    # --- one generation ---------------------------------------------------------------------------------------------
    def prepare(body, chat: bool):
        """(prompt ids, GenerationConfig) of a request, or an APIError saying what is wrong with it."""
        body.refuse_unsupported()
        if body.model != model:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model!r} "
                                "(GET /v1/models)", code="model_not_found", param="model")
        requested = body.requested_max_tokens if chat else body.max_tokens
        protocol.check_max_tokens(requested)
        try:
            if chat:
                if template is None:
                    raise APIError(400, f"the bundle {engine.bundle.root} has no chat template (its tokenizer files "
                                        "hold none), so chat requests cannot be formatted; use /v1/completions, or "
                                        "export a checkpoint whose tokenizer has a chat_template",
                                   code="no_chat_template")
                ids = engine.encode(render_chat(template, body.template_messages(), specials))
            else:
                ids = engine.encode(body.single_prompt())
            cfg = engine.config(**body.generation_params(requested or 1))
            if requested is None:  # chat: the room left in the context; completions: OpenAI's 16
                room = engine.bundle.max_context - len(ids) - cfg.lookahead + 1
                default = room if chat else min(room, protocol.COMPLETIONS_DEFAULT_MAX_TOKENS)
                cfg = replace(cfg, max_new_tokens=max(1, default))
            check_context(len(ids), cfg, engine.bundle.max_context)
        except ContextLengthError as e:
            raise APIError(400, str(e), code="context_length_exceeded",
                           param="messages" if chat else "prompt") from None
        except MjsdError as e:
            raise APIError(400, str(e)) from None
        return ids, cfg

    async def generate(request: Request, body, chat: bool):
        ex = _Exchange(request.url.path, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24], metrics)
        ids, cfg = prepare(body, chat)
        job = runner.submit(ids, cfg)
        ex.job = job
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job, ex))
        events = _pieces(job, ex, settings.timeout_s)
        try:
            first = await anext(events, None)
        except APIError as e:
            watcher.cancel()
            ex.close(e.status, e.message)
            return JSONResponse(e.body(), status_code=e.status)
        except BaseException:
            watcher.cancel()
            job.cancel()
            raise
        if body.stream:
            return StreamingResponse(_sse(ex, events, first, body, model, chat, cfg.stop, watcher),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async for _ in events:
                pass
        except APIError as e:
            ex.close(e.status, e.message)
            return JSONResponse(e.body(), status_code=e.status)
        finally:
            watcher.cancel()
            job.cancel()
        stream = job.stream
        if stream.stats.finish_reason == "cancelled":  # the client went away: nobody reads this
            ex.close(CLIENT_GONE, "client disconnected")
            return Response(status_code=CLIENT_GONE)
        text, hit = protocol.releasable(stream.text, cfg.stop, final=True)
        finish = "stop" if hit else protocol.FINISH[stream.stats.finish_reason]
        ex.close(200)
        return JSONResponse(protocol.completion(ex.rid, model, text, finish, stream.stats, chat))

    return app


class _Exchange:
    """One generation request's bookkeeping: closed once, with one log line and one metrics count."""

    def __init__(self, path: str, rid: str, metrics: Metrics):
        self.path, self.rid, self.metrics = path, rid, metrics
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.job: Job | None = None
        self.closed = False

    def close(self, status: int, note: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.t0
        stats = self.job.stream.stats if self.job is not None and self.job.finished.is_set() else None
        self.metrics.observe(self.path, status, stats, seconds, self.ttft)
        parts = [self.rid, self.path, str(status)]
        if stats is not None:
            parts += [f"prompt={stats.prompt_tokens}", f"completion={stats.generated_tokens}",
                      f"finish={stats.finish_reason}"]
        parts.append(f"{seconds * 1e3:.0f} ms")
        if self.ttft is not None:
            parts.append(f"ttft={self.ttft * 1e3:.0f} ms")
        e = stats.energy if stats is not None else None
        if e and e.get("energy_j") is not None:
            parts.append(f"{e['energy_j']:.3f} J" + (" (estimated)" if e.get("estimated") else ""))
        if note:
            parts.append(note)
        log.info(" ".join(parts))


async def _pieces(job: Job, ex: _Exchange, timeout_s: float):
    """The job's text pieces as they come; ends when it is done. Raises APIError on its error or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:  # TimeoutError since 3.11
            job.cancel()
            raise APIError(504, f"the generation did not finish within the server's --timeout of {timeout_s:g} s; "
                                "ask for fewer max_tokens or retry when the server is less busy",
                           code="timeout") from None
        if kind == "done":
            return
        if kind == "error":
            if isinstance(value, MjsdError):
                raise APIError(400, str(value))
            log.error("%s: generation failed", ex.rid, exc_info=value)
            raise APIError(500, f"internal error: {type(value).__name__}: {value}")
        if ex.ttft is None:
            ex.ttft = time.perf_counter() - ex.t0
        yield value


async def _sse(ex: _Exchange, events, first: str | None, body, model: str, chat: bool, stops, watcher):
    """SSE chunks: (chat: the role first) text pieces, the finish, the usage when asked for, `[DONE]`."""
    created = int(time.time())
    stream = ex.job.stream

    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def pieces():
        if first is not None:
            yield first
            async for piece in events:
                yield piece

    done = False
    try:
        if chat:
            yield data(protocol.chunk(ex.rid, model, created, chat, role=True))
        text = sent = ""
        async for piece in pieces():
            text += piece
            out, _ = protocol.releasable(text, stops, final=False)
            if len(out) > len(sent):
                yield data(protocol.chunk(ex.rid, model, created, chat, text=out[len(sent):]))
                sent = out
        if stream.stats.finish_reason == "cancelled":
            ex.close(CLIENT_GONE, "client disconnected")
            return
        out, hit = protocol.releasable(stream.text, stops, final=True)
        finish = "stop" if hit else protocol.FINISH[stream.stats.finish_reason]
        yield data(protocol.chunk(ex.rid, model, created, chat, text=out[len(sent):], finish=finish))
        if body.include_usage:
            yield data(protocol.chunk(ex.rid, model, created, chat, stats=stream.stats))
        done = True
        ex.close(200)
        yield "data: [DONE]\n\n"
    except APIError as e:  # after the headers: an error event, as OpenAI's clients expect it
        done = True
        ex.close(e.status, e.message)
        yield data(e.body())
        yield "data: [DONE]\n\n"
    finally:
        if done:
            watcher.cancel()
        ex.job.cancel()  # a no-op once it is done; stops it when the response was abandoned


async def _cancel_on_disconnect(request: Request, job: Job, ex: _Exchange) -> None:
    """Cancel the job once the client disconnects, and close the exchange (499) after the job has stopped."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()
    await job.done
    ex.close(CLIENT_GONE, "client disconnected")
