"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

On the signal, uvicorn stops accepting connections while the engine stops accepting requests (503 on
connections kept alive); in-flight requests get `drain_timeout` seconds to finish, then are aborted (their
streams end with finish_reason "abort"); the engine process stops, then this one exits 0.
"""
import asyncio
import contextlib
import importlib.util
import logging
import signal
import threading

import uvicorn

from nanovllm.server.async_engine import AsyncEngine


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        # A model that failed to load will never serve: exit (non-zero, see run_serve) instead of
        # answering 503 forever.
        if self.engine.error is not None and not self.engine.ready:
            self.should_exit = True
        return await super().on_tick(counter)

    def _start_drain(self) -> None:
        self._drain = self._loop.create_task(self.engine.drain(self.drain_timeout))  # keep a reference

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after its graceful shutdown, so the process would die of it; after
        # a clean drain we exit 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def run_server(app, engine: AsyncEngine, host: str, port: int, drain_timeout: float, log_level: str = "info",
               loop: str = "auto", http: str = "auto") -> None:
    """`loop` and `http` are uvicorn's names. "auto": uvloop and httptools where installed (`pip install
    nanovllm[serve]`'s), the HTTP process's CPU per streamed token ~25% below asyncio and h11's."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    if http in ("auto", "httptools") and importlib.util.find_spec("httptools") is not None:
        http = _bounded_httptools()
    # The request head is bounded to 16 KiB (h11's limit in uvicorn, or _bounded_httptools); the app bounds
    # the body.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, loop=loop, http=http,
                            timeout_graceful_shutdown=drain_timeout + 5)
    _Server(config, engine, drain_timeout).run()


MAX_HEAD_BYTES = 16 * 1024  # request line and headers: uvicorn's h11 default


def _bounded_httptools() -> type:
    """uvicorn's httptools protocol, with h11's bound on a request's head: llhttp buffers a request line or
    header of any size, so one endless header could fill this process's memory (vLLM's CVE-2025-48956)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _head: int | None = None  # bytes received since this request's head began; None once it is complete

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head = 0

        def on_headers_complete(self) -> None:
            self._head = None
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Counts whole reads: with pipelined requests, the tail of the one before counts too.
            if self._head is not None and not self.transport.is_closing():
                self._head += len(data)
                if self._head > MAX_HEAD_BYTES:
                    self.send_400_response("Invalid HTTP request received.")  # as uvicorn's h11 answers

    return BoundedHttpToolsProtocol
