"""`mjsd serve`: an OpenAI-compatible HTTP service over one Engine (FastAPI + uvicorn + prometheus-client).

    from mjsd.runtime import Engine
    from mjsd.runtime.server import Settings, create_app, serve
    serve(Engine.from_bundle(), host="127.0.0.1", port=8080)          # blocks; SIGTERM stops it, exit 0
    app = create_app(Engine.from_bundle(), Settings(api_key="k"))    # or mount the ASGI app yourself

Endpoints: GET /health, GET /metrics (Prometheus), GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (protocol.py lists the fields). A product feature beside the decoding core: it uses the Engine
API like any other embedder. Needs the `serve` extra: pip install 'mjsd[serve]'.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading

from ..errors import MjsdError
from .app import Settings, create_app, default_model_id

__all__ = ["Settings", "create_app", "default_model_id", "serve"]


def serve(engine, host: str = "127.0.0.1", port: int = 8080, settings: Settings = Settings(),
          log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C. On SIGTERM: stop accepting, let in-flight requests finish for
    settings.grace_s, cancel what is left, return (the CLI then exits 0)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(engine, settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.runner.draining = True  # /health answers 503, new generations 503
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=settings.grace_s, lifespan="on")
    try:  # bound here, so a busy port is one clear line, not uvicorn's exit code 3
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise MjsdError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick a free --port or another --host") \
            from None
    # uvicorn re-raises the signal it stopped on once it is done; a SIGTERM that ended a graceful shutdown is a
    # clean exit (0), not death by signal (143).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_cleanly)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    logging.getLogger("mjsd.serve").info("listening on %s (OpenAI base_url %s/v1)", url, url)
    Server(config).run(sockets=[sock])


def _exit_cleanly(sig, frame) -> None:
    raise SystemExit(0)
