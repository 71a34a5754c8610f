"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

On the signal, uvicorn stops accepting connections while the engine stops accepting requests (503 on
connections kept alive); in-flight requests get `drain_timeout` seconds to finish, then are aborted (their
streams end with finish_reason "abort"); the engine process stops, then this one exits 0.
"""
import asyncio
import contextlib
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


def run_server(app, engine: AsyncEngine, host: str, port: int, drain_timeout: float, log_level: str = "info"
               ) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    # uvicorn's default h11 limits bound header size (16 KiB); the app bounds the body.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_timeout + 5)
    _Server(config, engine, drain_timeout).run()
