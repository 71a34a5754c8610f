"""An asyncio front for the LLMEngine, which runs in its own process (engine_core.py).

The engine process loads the model, warms it up, then loops: run the commands sent to it, step, and send
one message per step with every request's deltas. Here, commands go out through a sender thread (a full
pipe must never block the event loop: the engine could be blocked sending to us at the same moment), and
a reader on the pipe's fd, run by the event loop itself, rebuilds each request's RequestOutput from its
deltas and hands it to the waiting HTTP request (its _Channel). A request that fails to add fails alone; an engine
process that fails or dies fails every request in flight with a 500, and /health says 503 from then on.
"""
import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nanovllm.engine.output import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.engine_core import ABORT_ALL, SHUTDOWN, run_engine_core
from nanovllm.server.frontend import Frontend
from nanovllm.server.metrics import ServerMetrics
from nanovllm.server.protocol import APIError

logger = logging.getLogger("nanovllm.server")


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class _Channel:
    """The outputs waiting for one HTTP request's task: at most one per engine request, because a step that
    arrives before the task has taken the previous one is joined into it. So a stream that fell behind sends
    one event for several steps, and the server's work per step shrinks as the load grows instead of
    falling further behind (vLLM coalesces the same way). Cheaper than an asyncio.Queue: one dict, and one
    future per wait."""

    def __init__(self) -> None:
        self.ready: dict[str, RequestOutput] = {}  # request id -> its output, deltas since the last take
        self.error: Exception | None = None
        self._waiter: asyncio.Future | None = None

    def put(self, output: RequestOutput) -> None:
        earlier = self.ready.get(output.request_id)
        if earlier is not None:  # outputs are built fresh each step and read by this channel's task only
            for before, c in zip(earlier.outputs, output.outputs):
                c.delta_text = before.delta_text + c.delta_text
                c.delta_token_ids = before.delta_token_ids + c.delta_token_ids
        self.ready[output.request_id] = output
        self._wake()

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    async def take(self) -> dict[str, RequestOutput]:
        """Waits for outputs; returns them all (in the order their requests first got one), or raises."""
        while not self.ready and self.error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.error is not None:
            raise self.error
        ready, self.ready = self.ready, {}
        return ready

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


@dataclass
class _Stream:
    """An engine request in flight: where its outputs go, and its output so far (deltas are added to it)."""
    channel: _Channel | None  # None once its client left: the stream stays until the engine confirms the
    # abort, so that a request finishing in a step that was already running still counts in the metrics
    # (as before the process split)
    request: EngineRequest
    completions: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    last: RequestOutput | None = None  # the latest output built


class AsyncEngine:
    def __init__(self, engine_args: dict, metrics: ServerMetrics | None = None, max_pending: int = 4096):
        self.engine_args = engine_args  # LLMEngine(**engine_args) in the engine process: must pickle
        self.metrics = metrics
        self.max_pending = max_pending
        self.frontend: Frontend | None = None  # tokenizer and limits, set once the engine is loaded
        self.ready = False  # loaded and warmed up
        self.error: str | None = None  # why the engine died
        self.accepting = True  # False once shutdown begins
        self.num_pending = 0  # engine requests submitted and not yet finished
        self._streams: dict[str, _Stream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # lists of commands, for the sender thread
        self._outbox: list = []  # commands of this event-loop pass, not yet handed to the sender thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._stopping = False
        self._loading: asyncio.Task | None = None

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")  # fork would copy a process with threads (CUDA)
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=run_engine_core, name="nanovllm-engine",
                                        args=(self.engine_args, child_conn, os.getpid()))
        self._process.start()
        child_conn.close()  # else the engine's death would never show here as EOF
        self._loop.add_reader(self._conn.fileno(), self._on_readable)
        # uvloop's add_reader (libuv) makes the fd non-blocking; recv must read whole messages, and the
        # sender thread must wait on a full pipe rather than fail.
        os.set_blocking(self._conn.fileno(), True)
        threading.Thread(target=self._send_commands, name="nanovllm-engine-sender", daemon=True).start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the engine process (after the drain): asks it to, and kills it if it has not within
        `timeout` s."""
        self.accepting = False
        self._stopping = True
        if self._process is None:
            return
        commands, self._outbox = [*self._outbox, SHUTDOWN], []
        self._commands.put(commands)
        self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; killing it", timeout)
            self._process.kill()
            self._process.join()
        self._close_pipe()

    async def drain(self, timeout: float) -> None:
        """Shutdown: stop accepting, let in-flight requests finish for `timeout` s, then abort the rest."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.num_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.num_pending:
            logger.info("aborting %d unfinished request(s) for shutdown", self.num_pending)
            self._send([("abort", ABORT_ALL)])

    # ---- requests ---------------------------------------------------------------------------------
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
        channel = _Channel()
        index = {r.request_id: i for i, r in enumerate(requests)}
        pending = set(index)
        arrival = time.time()
        self.num_pending += len(requests)
        try:
            for r in requests:
                self._streams[r.request_id] = _Stream(channel, r, _empty_completions(r.params))
            self._send([("add", r.request_id, r.prompt_token_ids, r.params, arrival) for r in requests])
            while pending:
                for request_id, output in (await channel.take()).items():
                    if output.finished:
                        pending.discard(request_id)
                    yield index[request_id], output
        finally:
            self.num_pending -= len(requests)
            aborts = [("abort", rid) for rid in pending if self._detach(rid)]
            if aborts:
                self._send(aborts)

    def _detach(self, request_id: str) -> bool:
        """Its client is gone: deliver nothing more; True if the engine may still run it."""
        if (s := self._streams.get(request_id)) is None:
            return False
        s.channel = None
        return True

    def _forget(self, request_id: str) -> None:
        """The engine no longer runs the request (finished, aborted, failed): stop tracking it."""
        if self.metrics:
            self.metrics.forget(request_id)
        self._streams.pop(request_id, None)

    # ---- the pipe -----------------------------------------------------------------------------------
    def _send(self, commands: list) -> None:
        """Queues commands for the engine; those of one event-loop pass go out together. A burst of requests
        (256 at once) then wakes the sender thread, which takes the GIL from the event loop to pickle, a few
        times instead of once per request, and the engine gets them in a few messages."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush_outbox)
        self._outbox += commands

    def _flush_outbox(self) -> None:
        commands, self._outbox = self._outbox, []
        if commands:  # else stop() sent them already
            self._commands.put(commands)

    def _send_commands(self) -> None:
        """The sender thread: one pipe message per batch of commands queued meanwhile."""
        while True:
            batch = self._commands.get()
            try:
                while True:
                    batch = batch + self._commands.get_nowait()
            except queue.Empty:
                pass
            try:
                self._conn.send(batch)
            except (OSError, ValueError):  # the engine process is gone (its death is reported by the reader)
                return
            if SHUTDOWN in batch:
                return

    def _on_readable(self) -> None:
        """Handles every message waiting. Step messages that queued up while the event loop was busy are
        handled as one step, so rebuilding outputs and metrics costs less per step the further behind we
        are, instead of keeping us behind."""
        steps: list[list] = []
        try:
            while self._conn.poll():
                kind, *body = self._conn.recv()
                if kind == "step":
                    steps.append(body)
                    continue
                self._flush_steps(steps)
                if kind == "ready":
                    self._on_ready(*body)
                else:  # "failed" (loading) or "dead" (a step raised)
                    self._fail(body[0])
        except (EOFError, OSError):
            self._flush_steps(steps)
            self._close_pipe()
            if not self._stopping:
                self._process.join(1.0)
                self._fail(f"the engine process exited (exit code {self._process.exitcode})")
        self._flush_steps(steps)

    def _flush_steps(self, steps: list[list]) -> None:
        if steps:
            self._on_step(*_join_steps(steps))
            steps.clear()

    def _on_ready(self, config, vocab_size: int, stats: dict) -> None:
        async def load_frontend() -> None:
            try:
                self.frontend = await asyncio.to_thread(Frontend.load, config, vocab_size)
            except Exception as e:  # noqa: BLE001 - shown on /health and in the exit code, like any load error
                logger.exception("failed to load the tokenizer")
                self._fail(f"{type(e).__name__}: {e}")
                return
            if self.metrics:
                self.metrics.set_baseline(stats)
            # Everything loaded so far lives as long as the server: out of the collector's sight, so the
            # many small objects each step makes do not trigger full passes over it (as vLLM does).
            gc.freeze()
            # Each step builds a few objects per stream, which die young, by reference count: at the default
            # threshold (700) the collector still ran ~450 young passes in a 256-stream run, ~10% of this
            # process's CPU; at 20,000 it runs a handful (measured with gc.callbacks, tiny model on CPU).
            gc.set_threshold(20_000, 10, 10)
            self.ready = True
            logger.info("engine ready")
        self._loading = self._loop.create_task(load_frontend())  # keep a reference

    def _on_step(self, now: float, packed: list, aborted: list[str], errors: list, stats: dict) -> None:
        outputs = [self._unpack(p) for p in packed if p[0] in self._streams]
        if self.metrics:
            self.metrics.observe_step(outputs, now)
            self.metrics.update_stats(stats)
        for output in outputs:
            s = self._streams.pop(output.request_id) if output.finished else self._streams[output.request_id]
            if s.channel is not None:
                s.channel.put(output)
        for rid in aborted:
            self._end(rid)
        for rid, status, message in errors:
            self._end(rid, APIError(status, message))

    def _end(self, request_id: str, error: Exception | None = None) -> None:
        """The request ended without a finished output (aborted by the server if no `error`): forget it,
        and tell its client if still there."""
        if (s := self._streams.get(request_id)) is not None:
            self._forget(request_id)
            if s.channel is None:
                return
            if error is not None:
                s.channel.fail(error)
            else:
                s.channel.put(_aborted(s.last, s.request))

    def _unpack(self, packed: tuple) -> RequestOutput:
        """The RequestOutput of a step, from its deltas and what the request had so far."""
        rid, finished, num_cached_tokens, metrics, prompt_logprobs, deltas = packed
        s = self._streams[rid]
        if prompt_logprobs is not None:
            s.prompt_logprobs = prompt_logprobs
        s.completions = [
            CompletionOutput(c.index, c.text + text, c.token_ids + ids, cumulative,
                             None if logprobs is None else c.logprobs + logprobs, reason, stop_reason, text, ids)
            for c, (text, ids, logprobs, cumulative, reason, stop_reason) in zip(s.completions, deltas)]
        s.last = RequestOutput(rid, None, s.request.prompt_token_ids, s.prompt_logprobs, s.completions, finished,
                               num_cached_tokens, RequestMetrics(*metrics))
        return s.last

    def _fail(self, reason: str) -> None:
        """The engine is gone (or never came up): every request in flight gets a 500."""
        if self.error is None:  # the first reason is the cause; an EOF that follows it is not news
            logger.error("the engine has failed: %s", reason)
            self.error = reason
        failure = APIError(500, "The engine failed while running this request.", type="InternalServerError")
        for rid in list(self._streams):
            self._end(rid, failure)

    def _close_pipe(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._loop.remove_reader(self._conn.fileno())
            self._conn.close()


def _join_steps(steps: list[list]) -> list:
    """Several step messages as one: each request's deltas joined in order, the latest stats and time."""
    if len(steps) == 1:
        return steps[0]
    joined: dict[str, tuple] = {}
    for _, packed, _, _, _ in steps:
        for p in packed:
            earlier = joined.get(p[0])
            joined[p[0]] = p if earlier is None else _join_deltas(earlier, p)
    aborted = [rid for step in steps for rid in step[2]]
    errors = [error for step in steps for error in step[3]]
    return [steps[-1][0], list(joined.values()), aborted, errors, steps[-1][4]]


def _join_deltas(earlier: tuple, later: tuple) -> tuple:
    rid, finished, num_cached_tokens, metrics, prompt_logprobs, deltas = later
    completions = [(text + more_text, ids + more_ids, None if logprobs is None else logprobs + more_logprobs,
                    cumulative, reason, stop_reason)
                   for (text, ids, logprobs, *_), (more_text, more_ids, more_logprobs, cumulative, reason,
                                                   stop_reason) in zip(earlier[5], deltas)]
    prompt_logprobs = earlier[4] if earlier[4] is not None else prompt_logprobs
    return rid, finished, num_cached_tokens, metrics, prompt_logprobs, completions


def _empty_completions(params: SamplingParams) -> list[CompletionOutput]:
    return [CompletionOutput(index=i, text="", token_ids=[], logprobs=[] if params.logprobs is not None else None)
            for i in range(params.n)]


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

