"""An asyncio front for LLMEngine, which is not thread-safe: one background thread owns the engine.

The thread loads the model, warms it up, then loops: drain the command queue (add / abort), step while
there is work, and hand each step's outputs to the requests' asyncio queues with one
`loop.call_soon_threadsafe`. HTTP handlers never touch the engine, so they never block a step, and a step
never waits for a slow client. A request that fails to add fails alone; a failing step kills the engine
(its state is unknown), and every request then gets a 500 and /health a 503.
"""
import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanovllm.engine.output import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.metrics import ServerMetrics
from nanovllm.server.protocol import APIError

if TYPE_CHECKING:
    from nanovllm.engine.llm_engine import LLMEngine

logger = logging.getLogger("nanovllm.server")

_ABORTED = object()  # delivered to a request the server aborted itself (shutdown), not a disconnect
_ABORT_ALL = "*"


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Add:
    request: EngineRequest
    arrival_time: float
    queue: asyncio.Queue  # receives (request_id, RequestOutput | Exception | _ABORTED)


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], "LLMEngine"], metrics: ServerMetrics | None = None,
                 max_pending: int = 4096):
        self._make_engine = make_engine
        self.metrics = metrics
        self.max_pending = max_pending
        self.engine: LLMEngine | None = None  # set by the engine thread once loaded
        self.ready = False  # loaded and warmed up
        self.error: str | None = None  # why the engine died
        self.accepting = True  # False once shutdown begins
        self.num_pending = 0  # engine requests submitted and not yet finished (event-loop side)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}  # engine-thread side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)

    # ---- event-loop side ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def check_accepting(self, num_requests: int) -> None:
        """Raises what a new request gets now: 500 engine dead; 503 not ready, shutting down or full."""
        if self.error is not None:
            raise APIError(500, "The engine has failed; restart the server.", type="InternalServerError")
        if not self.ready or not self.accepting:
            raise APIError(503, "The server is not ready." if self.accepting
                           else "The server is shutting down.")
        if self.num_pending + num_requests > self.max_pending:
            raise APIError(503, f"The server is at capacity ({self.max_pending} pending requests); "
                           "retry later.")

    async def generate(self, requests: list[EngineRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yields (index into `requests`, output) until every request has finished. Leaving early (client
        disconnect, cancellation, an error) aborts the unfinished ones, which frees their KV blocks."""
        if self.error is not None:  # admission (check_accepting) happened before the response started
            raise APIError(500, "The engine has failed; restart the server.", type="InternalServerError")
        stream: asyncio.Queue = asyncio.Queue()
        index = {r.request_id: i for i, r in enumerate(requests)}
        pending = set(index)
        last: dict[str, RequestOutput] = {}
        arrival = time.time()
        self.num_pending += len(requests)
        try:
            for r in requests:
                self._commands.put(_Add(r, arrival, stream))
            while pending:
                # Everything queued since the last turn, one merged output per request: a stream that fell
                # behind sends one event for several steps, so the server's work per step shrinks as the
                # load grows instead of falling further behind (vLLM coalesces the same way).
                batch = [await stream.get()]
                while not stream.empty():
                    batch.append(stream.get_nowait())
                queued: dict[str, list[RequestOutput]] = {}
                for request_id, item in batch:
                    if isinstance(item, Exception):
                        raise item
                    if item is _ABORTED:
                        earlier = queued.get(request_id)
                        item = _aborted(earlier[-1] if earlier else last.get(request_id), requests[index[request_id]])
                    queued.setdefault(request_id, []).append(item)
                for request_id, items in queued.items():
                    item = last[request_id] = _merge(items) if len(items) > 1 else items[0]
                    if item.finished:
                        pending.discard(request_id)
                    yield index[request_id], item
        finally:
            self.num_pending -= len(requests)
            for request_id in pending:
                self._commands.put(("abort", request_id))

    async def drain(self, timeout: float) -> None:
        """Shutdown: stop accepting, let in-flight requests finish for `timeout` s, then abort the rest."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.num_pending:
            logger.info("aborting %d unfinished request(s) for shutdown", self.num_pending)
            self._commands.put(("abort", _ABORT_ALL))

    def stop(self, timeout: float = 10.0) -> None:
        self.accepting = False
        self._commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
            self._warm_up()
        except Exception as e:  # any load failure must show on /health, not kill the thread silently
            logger.exception("failed to load the model")
            self.error = f"{type(e).__name__}: {e}"
            return
        self.ready = True
        logger.info("engine ready")
        while True:
            if not self._drain_commands(block=not self.engine.has_unfinished_requests()):
                return
            if self.engine.has_unfinished_requests() and not self._step():
                return

    def _warm_up(self) -> None:
        """One short greedy request, so the first user request does not pay for lazy initialization."""
        engine = self.engine
        engine.add_request("warmup", engine.tokenizer.encode("Hello") or [0],
                           SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        if self.metrics:
            self.metrics.set_baseline(engine.stats())

    def _drain_commands(self, block: bool) -> bool:
        """Runs queued commands; False when told to stop."""
        try:
            command = self._commands.get() if block else self._commands.get_nowait()
            while True:
                if command is None:
                    return False
                self._run_command(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        if self.metrics:
            self.metrics.update_stats(self.engine.stats())
        return True

    def _run_command(self, command) -> None:
        if isinstance(command, _Add):
            request = command.request
            try:
                self.engine.add_request(request.request_id, request.prompt_token_ids, request.params,
                                        arrival_time=command.arrival_time)
            except Exception as e:  # noqa: BLE001 - one bad request fails alone, whatever it raised
                status = 400 if isinstance(e, ValueError) else 500
                self._deliver([(command.queue, request.request_id, APIError(status, str(e)))])
            else:
                self._streams[request.request_id] = command.queue
            return
        _, request_id = command
        ids = list(self._streams) if request_id == _ABORT_ALL else [request_id]
        aborted = []
        for rid in ids:
            self.engine.abort_request(rid)
            if self.metrics:
                self.metrics.forget(rid)
            if rid in self._streams:
                aborted.append((self._streams.pop(rid), rid, _ABORTED))
        self._deliver(aborted)

    def _step(self) -> bool:
        try:
            outputs = self.engine.step()
        except Exception:
            logger.exception("engine step failed; the engine is now dead")
            self.error = "engine step failed"
            failure = APIError(500, "The engine failed while running this request.",
                               type="InternalServerError")
            self._deliver([(q, rid, failure) for rid, q in self._streams.items()])
            self._streams.clear()
            return False
        if self.metrics:
            self.metrics.observe_step(outputs)
            self.metrics.update_stats(self.engine.stats())
        items = []
        for output in outputs:
            stream = self._streams.pop(output.request_id) if output.finished else \
                self._streams.get(output.request_id)
            if stream is not None:
                items.append((stream, output.request_id, output))
        self._deliver(items)
        return True

    def _deliver(self, items: list[tuple[asyncio.Queue, str, object]]) -> None:
        if not items:
            return
        try:
            self._loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass


def _put_all(items: list[tuple[asyncio.Queue, str, object]]) -> None:
    for stream, request_id, item in items:
        stream.put_nowait((request_id, item))


def _aborted(last: RequestOutput | None, request: EngineRequest) -> RequestOutput:
    """The final output of a request the server aborted: what it had so far, finish_reason "abort"."""
    if last is None:
        completions = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(request.params.n)]
        last = RequestOutput(request_id=request.request_id, prompt=None,
                             prompt_token_ids=request.prompt_token_ids, prompt_logprobs=None,
                             outputs=completions, finished=False, num_cached_tokens=0, metrics=None)
    outputs = [dataclasses.replace(c, delta_text="", delta_token_ids=[],
                                   finish_reason=c.finish_reason or "abort") for c in last.outputs]
    return dataclasses.replace(last, outputs=outputs, finished=True)


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    """The last output with the deltas of all, as if those steps had been one. Outputs are built fresh each
    step and delivered to one consumer only, so the last one is updated in place."""
    merged = outputs[-1]
    for i, c in enumerate(merged.outputs):
        c.delta_text = "".join(o.outputs[i].delta_text for o in outputs)
        c.delta_token_ids = [t for o in outputs for t in o.outputs[i].delta_token_ids]
    return merged
