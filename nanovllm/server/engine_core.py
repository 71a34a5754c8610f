"""The engine's own process: it owns the LLMEngine and talks to the HTTP process over one Pipe.

Why a process: the engine loop (scheduling, sampling bookkeeping, detokenization) and the event loop (HTTP,
JSON, SSE for hundreds of streams) are both Python-heavy; in one process they take turns on one GIL, and
each waits for the other (vLLM moved its engine core out of the API server for the same reason).

The loop: run the commands the HTTP process sent (add / abort / shutdown), without blocking while there is
work, step, then send ONE message with every request's deltas and the stats the metrics need. Outputs are
packed as plain tuples of deltas (not RequestOutputs with the full token lists), so a step's message costs
little to pickle; the HTTP process rebuilds RequestOutputs from them (async_engine.py).

Detokenization and stop strings stay here, in the engine, with its own tokenizer: the text the engine
produces is exactly the offline LLM's, stop strings end the sequence in the same step that made them (no
extra tokens decoded, no KV held longer), and the HTTP process only appends text it is given.
"""
import gc
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

from nanovllm.engine.output import RequestOutput
from nanovllm.sampling_params import SamplingParams

ABORT_ALL = "*"
SHUTDOWN = None


def run_engine_core(engine_args: dict, conn: Connection, parent_pid: int) -> None:
    """The child's entry point: load, warm up, report ready (or why not), then serve commands."""
    # Ctrl-C and `kill` of the process group reach this process too: the HTTP process decides when the
    # engine stops (after its drain), and a watchdog ends it if that process dies first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    from nanovllm.engine.llm_engine import LLMEngine  # here: the HTTP process never imports the model code
    try:
        engine = LLMEngine(**engine_args)
        stats = _warm_up(engine)
    except Exception as e:  # any load failure must reach /health and the exit code, not vanish
        traceback.print_exc()
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    gc.freeze()  # the model and the engine's long-lived state: never worth a collector's pass
    conn.send(("ready", engine.config, engine.model_config.vocab_size, stats))
    try:
        EngineCore(engine, conn).run()
    finally:
        engine.close()


def _exit_with_parent(parent_pid: int) -> None:
    # A parent killed with SIGKILL cannot stop us: poll for it, as the tensor-parallel workers do.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _warm_up(engine) -> dict:
    """One short greedy request, so the first user request does not pay for lazy initialization; returns
    the stats after it (the metrics' baseline: warm-up is not user traffic)."""
    prompt = (engine.tokenizer.encode("Hello") if engine.tokenizer else None) or [0]
    engine.add_request("warmup", prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return engine.stats()


class EngineCore:
    def __init__(self, engine, conn: Connection):
        self.engine, self.conn = engine, conn
        self.request_ids: set[str] = set()  # added and not yet finished or aborted
        self.started: set[str] = set()  # requests whose first output (with the prompt logprobs) went out
        self.aborted: list[str] = []
        self.errors: list[tuple[str, int, str]] = []  # (request id, HTTP status, message) of failed adds

    def run(self) -> None:
        while True:
            if not self._run_commands(block=not self.engine.has_unfinished_requests()):
                return
            packed, now = [], time.time()
            if self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except Exception:
                    traceback.print_exc()
                    self.conn.send(("dead", "engine step failed"))
                    return
                now = time.time()
                packed = [p for p in map(self._pack, outputs) if p is not None]
            if packed or self.aborted or self.errors:
                self.conn.send(("step", now, packed, self.aborted, self.errors, self.engine.stats()))
                self.aborted, self.errors = [], []

    def _run_commands(self, block: bool) -> bool:
        """Runs every command batch waiting (waits for one if `block`); False on shutdown."""
        ran = False
        while (block and not ran) or self.conn.poll():
            for command in self.conn.recv():
                if command is SHUTDOWN:
                    return False
                self._run(command)
            ran = True
        if ran and not self.engine.has_unfinished_requests():
            # Nothing will step: the aborts' freed blocks must still show in the stats.
            self.conn.send(("step", time.time(), [], self.aborted, self.errors, self.engine.stats()))
            self.aborted, self.errors = [], []
        return True

    def _run(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_token_ids, params, arrival_time = command
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, arrival_time=arrival_time)
            except Exception as e:  # noqa: BLE001 - one bad request fails alone, whatever it raised
                self.errors.append((request_id, 400 if isinstance(e, ValueError) else 500, str(e)))
            else:
                self.request_ids.add(request_id)
            return
        _, request_id = command  # abort
        ids = list(self.request_ids) if request_id == ABORT_ALL else [request_id]
        for rid in ids:
            self.engine.abort_request(rid)
            if rid in self.request_ids:
                self._forget(rid)
                self.aborted.append(rid)

    def _forget(self, request_id: str) -> None:
        self.request_ids.discard(request_id)
        self.started.discard(request_id)

    def _pack(self, output: RequestOutput) -> tuple | None:
        """What is new in `output`, as plain tuples; None when nothing is (a prefill chunk). Runs for every
        request every step (256 at a time), in the engine's loop: kept to plain loads and one tuple each."""
        finished, outputs = output.finished, output.outputs
        if not finished and not _has_new_tokens(outputs):
            return None
        rid = output.request_id
        prompt_logprobs = None
        if rid not in self.started:
            prompt_logprobs = output.prompt_logprobs
            self.started.add(rid)
        if finished:
            self._forget(rid)
        m = output.metrics
        metrics = (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.last_token_time,
                   m.finished_time)
        completions = []
        for c in outputs:
            logprobs = c.logprobs
            if logprobs is not None:
                logprobs = logprobs[len(logprobs) - len(c.delta_token_ids):]
            completions.append((c.delta_text, c.delta_token_ids, logprobs, c.cumulative_logprob, c.finish_reason,
                                c.stop_reason))
        return rid, finished, output.num_cached_tokens, metrics, prompt_logprobs, completions


def _has_new_tokens(outputs: list) -> bool:
    for c in outputs:
        if c.delta_token_ids:
            return True
    return False
