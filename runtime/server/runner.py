"""Generations for the HTTP layer: a bounded number admitted at once, each consumed by its own worker thread.

The engine's rounds block (ONNX Runtime calls), so each admitted generation iterates its TextStream in a pool
thread; the generations take turns round by round inside the engine (Engine.turns), so concurrent requests are
served round-robin. A worker hands each text piece to the event loop through an asyncio queue and never waits on
the consumer: a client that stops reading holds up nobody. `cancel()` (client gone, timeout, shutdown) stops a
generation before its next round; it stays admitted until its thread is free, so threads stay bounded.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .protocol import APIError


class Job:
    """One generation: events ("piece", text), then ("done", None) or ("error", exception), in `events`."""

    def __init__(self, stream, loop: asyncio.AbstractEventLoop):
        self.stream = stream
        self.events: asyncio.Queue = asyncio.Queue()
        self.finished = threading.Event()  # the worker has let go of the stream (for threads)
        self.done = loop.create_future()  # the same, for coroutines
        self._loop = loop

    def run(self) -> None:
        """The worker thread's body. `finished` is set before the last event, so its consumer sees final stats."""
        last = ("done", None)
        try:
            for piece in self.stream:
                self._put(("piece", piece))
        except Exception as e:  # every error reaches the request (a 400 for MjsdError, else a 500)
            last = ("error", e)
        finally:
            self.finished.set()
            self._put(last)
            _call_soon(self._loop, lambda: self.done.done() or self.done.set_result(None))

    def cancel(self) -> None:
        self.stream.cancel()

    def _put(self, event) -> None:
        _call_soon(self._loop, self.events.put_nowait, event)


class Runner:
    """Admits at most `max_queue` generations (running or waiting for their turn); more get a 429."""

    def __init__(self, engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.jobs: set[Job] = set()  # touched only from the event loop thread
        self.draining = False
        self._pool = ThreadPoolExecutor(max_workers=max_queue, thread_name_prefix="mjsd-generation")

    def submit(self, prompt_ids: list[int], cfg) -> Job:
        if self.draining:
            raise APIError(503, "the server is shutting down; retry against another instance", code="shutting_down")
        if len(self.jobs) >= self.max_queue:
            raise APIError(429, f"the server is busy: {len(self.jobs)} generations are queued or running "
                                f"(--max-queue {self.max_queue}); retry shortly", code="queue_full")
        loop = asyncio.get_running_loop()
        job = Job(self.engine.stream(prompt_ids, cfg), loop)
        self.jobs.add(job)
        future = self._pool.submit(job.run)
        future.add_done_callback(lambda _: _call_soon(loop, self.jobs.discard, job))
        return job

    def stop(self) -> list[Job]:
        """Admit nothing more and cancel every generation (on the event loop thread); returns them."""
        self.draining = True
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        return jobs

    def wait(self, jobs: list[Job], timeout: float) -> int:
        """Wait at most `timeout` s for the stopped generations' workers (blocks); returns how many are left."""
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.finished.wait(max(0.0, deadline - time.monotonic()))
        self._pool.shutdown(wait=False, cancel_futures=True)
        return sum(not job.finished.is_set() for job in jobs)


def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
        pass
