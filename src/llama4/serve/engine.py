"""The scheduler on a thread of its own, with an asyncio face for the HTTP handlers.

The model runs on one background thread, stepping the scheduler whenever it has work (torch releases
the GIL inside its kernels, so the event loop keeps serving sockets meanwhile). Handlers submit
requests and read their tokens from an `asyncio.Queue`; the engine thread collects a step's events and
hands them over in one `call_soon_threadsafe` per step (one wake-up of the event loop, not one per
token), so the scheduler never touches asyncio objects.

New requests go through a thread-safe inbox that the engine drains before each step; a cancelled
request is only flagged, and the scheduler frees its blocks at the start of the next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time

from ..generation.scheduler import Request, Scheduler, TokenEvent

log = logging.getLogger("llama4.serve")


class Engine:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.draining = False
        self.in_flight = 0  # submitted and not finished (event-loop thread only)
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.token_times: collections.deque[float] = collections.deque(maxlen=100_000)
        self.step_lock = threading.Lock()  # held while stepping: stats read from other threads stay whole
        self.outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, object, TokenEvent]] = []  # engine thread

    # Lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="llama4-engine", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        s = self.scheduler
        while not self.stopping:
            while True:
                try:
                    s.waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if not s.has_work():
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                with self.step_lock:
                    s.step()
            except Exception as e:  # a bug or running out of memory: fail these requests, keep serving
                log.exception("engine step failed")
                self.error = f"{type(e).__name__}: {e}"
                with self.step_lock:
                    s.cancel_all("error", self.error)
            self._flush()
        with self.step_lock:
            s.cancel_all()
        self._flush()

    def _flush(self) -> None:
        """Hand the events of the last step to their event loops, one call per loop."""
        if not self.outbox:
            return
        batch, self.outbox = self.outbox, []
        loops = {id(loop): loop for loop, *_ in batch}
        for key, loop in loops.items():
            items = [b[1:] for b in batch if id(b[0]) == key]
            try:
                loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # that loop has closed (its server is gone): nobody is listening
                pass

    async def shutdown(self, grace: float) -> None:
        """Refuse new requests, let running ones finish for up to `grace` seconds, cancel the rest."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            await asyncio.to_thread(self.thread.join, 30)

    # Requests ---------------------------------------------------------------------------------------
    def submit(self, req: Request, out: asyncio.Queue, tag: object = None) -> Request:
        """Queue `req`; its events arrive on `out` as (tag, TokenEvent). Raises ValueError if it can never
        run (checked here, so the caller can answer 400 at once)."""
        s = self.scheduler
        s.check(req)  # before anything is set up, so a refused request leaves no trace
        loop = asyncio.get_running_loop()

        def on_event(ev: TokenEvent) -> None:  # engine thread
            if ev.token is not None:
                self.token_times.append(time.monotonic())
            self.outbox.append((loop, out, tag, ev))

        req.on_event = on_event
        s.prepare(req)
        self.in_flight += 1
        self.inbox.put(req)
        self.wake.set()
        return req

    def _deliver(self, items: list[tuple[asyncio.Queue, object, TokenEvent]]) -> None:
        for out, tag, ev in items:
            if ev.finish_reason is not None:
                self.in_flight -= 1
            out.put_nowait((tag, ev))

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self.wake.set()

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        n = sum(1 for t in reversed(self.token_times) if now - t <= window) if self.token_times else 0
        return n / window
