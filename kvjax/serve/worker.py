"""One `kvjax.Engine` on its own thread, so the HTTP layer never blocks it (nor it them).

Every engine call runs on the engine thread: the HTTP handlers send closures with `call`
and await the returned future; a watched request reports its progress through a callback
after every step. Between steps the thread runs the queued calls; with nothing to do it
sleeps on the queue.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time

log = logging.getLogger("kvjax.serve")

SHUTDOWN = "the server is shutting down and this request did not finish within the grace period"


class EngineWorker:
    """Runs `engine` on a daemon thread.

    Attributes:
      engine: the `kvjax.Engine` (touch it only inside `call`).
      ttft: recent times to first token in seconds (at most 4096).
      draining: True after `drain`: new requests are refused.
    """

    def __init__(self, engine, *, idle_wait_s: float = 0.05):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.ttft: collections.deque[float] = collections.deque(maxlen=4096)
        self.completed = collections.Counter()  # finish reason -> requests
        self.draining = False
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._watch: dict = {}  # request -> (callback, tokens sent)
        self._deadline: float | None = None
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvjax-engine", daemon=True)

    # -- from any thread -------------------------------------------------------------------

    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    def call(self, fn) -> concurrent.futures.Future:
        """Run `fn()` on the engine thread between steps -> a future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, fut))
        return fut

    def drain(self, grace_s: float) -> None:
        """Refuse new requests; let the accepted ones (running or waiting) finish for
        `grace_s`, then end them with an error."""
        self.draining = True
        self.call(lambda: self._begin_drain(grace_s))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until a drain has ended every request (True) or `timeout` passes."""
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._calls.put((lambda: None, concurrent.futures.Future()))
        self._thread.join(timeout)

    # -- on the engine thread ---------------------------------------------------------------

    def watch(self, req, callback) -> None:
        """Call `callback(req)` on the engine thread after each step that adds tokens to
        `req`, and once when it is done (then it is forgotten). Call inside `call`."""
        self._watch[req] = [callback, -1]

    def _begin_drain(self, grace_s: float) -> None:
        self._deadline = time.monotonic() + grace_s

    def _busy(self) -> bool:
        st = self.engine.stats()
        return bool(st.running or st.waiting)

    def _run_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=self.idle_wait_s) if block else \
                self._calls.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as err:  # noqa: BLE001 - the caller gets it
                    fut.set_exception(err)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_calls(block=not self._busy())
            if self._busy():
                try:
                    self.engine.step()
                except Exception as err:  # noqa: BLE001 - fail the requests, serve on
                    log.exception("engine step failed")
                    self._fail_all(f"{type(err).__name__}: {err}")
            self._notify()
            if self._deadline is not None and time.monotonic() > self._deadline \
                    and self._busy():
                self._fail_all(SHUTDOWN)
                self._notify()
            if self.draining and self._deadline is not None and not self._busy():
                self._idle.set()

    def _fail_all(self, reason: str) -> None:
        for req in list(self._watch):
            if not req.done:
                self.engine.cancel(req)
                req.finish_reason, req.error = "error", reason

    def _notify(self) -> None:
        for req, entry in list(self._watch.items()):
            callback, sent = entry
            if len(req.tokens) == sent and not req.done:
                continue
            entry[1] = len(req.tokens)
            if req.done:
                del self._watch[req]
                self.completed[req.finish_reason] += 1
                if req.first_token_time is not None:
                    self.ttft.append(req.first_token_time - req.submit_time)
            try:
                callback(req)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
                log.exception("request callback failed")

