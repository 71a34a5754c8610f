"""The engine: requests in, scheduled steps through the model runner, incremental outputs back."""
import time
from dataclasses import dataclass, field, fields
from itertools import count

import torch

from nanovllm.config import Config
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.model_runner import ModelRunner, PendingStep, StepOutput
from nanovllm.engine.output import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from nanovllm.engine.prompt import prompt_token_ids
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.default_model import resolve_model_path
from nanovllm.utils.tokenizer import load_tokenizer

_MAX_DEFAULT_CONTEXT = 8192


@dataclass
class _Inflight:
    """A launched step whose sampled ids are not read back yet (async scheduling)."""
    batch: ScheduledBatch
    pending: PendingStep
    scheduled_time: float


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    sent: list[tuple[int, int]] = field(default_factory=list)  # per seq: (text chars, tokens) already returned
    texts: list[str] = field(default_factory=list)
    stream: bool = True  # False: the only output is the final one
    # Detokenize every step (for streamed text or stop strings); else once the seq has finished.
    incremental: bool = True

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class _NoDetokenizer:
    """Stands in for IncrementalDetokenizer when the engine runs without a tokenizer."""
    finished = False

    def update(self, new_token_ids: list[int]) -> tuple[str, None]:
        return "", None

    def flush(self) -> str:
        return ""


class LLMEngine:
    def __init__(self, model: str = "", **kwargs):
        names = {f.name for f in fields(Config)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"Unknown engine argument(s) {unknown}; valid ones are {sorted(names)}.")
        config = Config(model=model, **kwargs)
        path = resolve_model_path(config.model)
        torch.manual_seed(config.seed)  # unseeded random rows draw from torch's default generator
        self.model_runner = ModelRunner(config, path)  # with tensor_parallel_size > 1, starts the workers
        try:
            self.model_config = self.model_runner.model_config
            context = self.model_config.max_position_embeddings
            if config.max_model_len is None:
                config.max_model_len = min(context, _MAX_DEFAULT_CONTEXT)
            self.config = config
            self.tokenizer = None if config.skip_tokenizer_init else load_tokenizer(path)
            Sequence.block_size = config.block_size
            num_blocks = self.model_runner.allocate_kv_cache(config.max_model_len)
        except BaseException:
            self.model_runner.close()
            raise
        self.scheduler = Scheduler(config, num_blocks)
        tokenizer_eos = self.tokenizer.eos_token_ids if self.tokenizer else []
        self.eos_token_ids = set(tokenizer_eos) | set(self.model_config.eos_token_ids)
        self.model_runner.eos_token_ids = sorted(self.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self._counter = count()
        self._token_text: dict[int, str] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.async_scheduling = config.async_scheduling
        self._inflight: _Inflight | None = None  # async scheduling: the step launched and not read back

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (also done at interpreter exit). Idempotent."""
        self.model_runner.close()

    # ---- requests ---------------------------------------------------------------------------------
    def process_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Tokenizes and validates a prompt; raises ValueError with a clear message. Thread-safe."""
        token_ids = prompt_token_ids(prompt, self.tokenizer, self.model_config.vocab_size, self.config)
        self.scheduler.check_prompt(len(token_ids))
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling_params must be a SamplingParams.")
        if self.tokenizer is None and params.stop_strs:
            raise ValueError("Stop strings need a tokenizer; this engine has none (skip_tokenizer_init).")
        return token_ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, stream: bool = True) -> None:
        """Queues a request. With stream=False, step() returns its output only once it has finished
        (building a RequestOutput for every request every step is the engine's largest host cost)."""
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        token_ids = self.process_prompt(prompt, params)
        arrival = time.time() if arrival_time is None else arrival_time
        seqs, detoks = [], []
        for index in range(params.n):
            seq = Sequence(list(token_ids), params, request_id=request_id, index=index, arrival_time=arrival)
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, token_ids, params) if self.tokenizer
                          else _NoDetokenizer())
        request = _Request(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, seqs,
                           detoks, RequestMetrics(arrival_time=arrival))
        request.stream = stream
        request.incremental = self.tokenizer is not None and (stream or bool(params.stop_strs))
        request.sent = [(0, 0)] * params.n
        request.texts = [""] * params.n
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(token_ids)
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        self.scheduler.abort(request_id)
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
        del self.requests[request_id]
        self._drop_idle_inflight()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self._inflight is not None:
            return self._step_overlapped()
        batch = self.scheduler.schedule()
        touched, done = self._finished_by_scheduler(batch)
        if self.async_scheduling and self.scheduler.can_overlap(batch):
            # Starts the pipeline: this step's ids are read back by the next step(), after it has launched
            # the step after this one.
            self._inflight = _Inflight(batch, self.model_runner.launch(batch), time.time())
        elif batch.seqs:
            scheduled_time = time.time()
            result = self.model_runner.run(batch)
            self.scheduler.postprocess(batch, result.sampled)
            self._process(batch, result, scheduled_time, touched, done)
        return self._outputs(touched, done)

    def _step_overlapped(self) -> list[RequestOutput]:
        """Async scheduling, with step n in flight: schedules and launches step n+1 (decodes, prefill chunks
        and new prompts alike; a decode's input id is its seq's sampled id of step n, gathered on the
        device), and only then waits for step n's ids and processes them, so the host's work overlaps the
        GPU's. When step n+1 cannot be scheduled that way, step n is drained alone and the next step()
        schedules as usual."""
        prev, self._inflight = self._inflight, None
        self.scheduler.advance(prev.batch)
        batch = self.scheduler.schedule_overlapped()
        touched, done = self._finished_by_scheduler(batch) if batch is not None else ({}, set())
        if batch is not None and batch.seqs:
            self._inflight = _Inflight(batch, self.model_runner.launch(batch, prev.pending), time.time())
        result = prev.pending.result()
        self.scheduler.resolve(prev.batch, result.sampled)
        self._process(prev.batch, result, prev.scheduled_time, touched, done)
        self._drop_idle_inflight()
        return self._outputs(touched, done)

    def _drop_idle_inflight(self) -> None:
        """Ends the step in flight once every seq in it has finished (stopped at the step before, or
        aborted): nothing reads its ids, and left in flight it would outlive the requests
        (has_unfinished_requests() is False) and hold up the next one for a step. Waited for, not dropped:
        the graphs' host buffers of a launch are rewritten two launches on."""
        inflight = self._inflight
        if inflight is not None and all(seq.is_finished for seq in inflight.batch.seqs):
            inflight.pending.result()
            self._inflight = None

    def _finished_by_scheduler(self, batch: ScheduledBatch) -> tuple[dict[str, _Request], set[str]]:
        touched: dict[str, _Request] = {}  # requests that progressed, in batch order
        done: set[str] = set()  # those with a seq that finished: the only ones a stream=False request needs
        for seq in batch.finished:  # finished by the scheduler itself (could never fit)
            if seq.request_id in self.requests:
                touched[seq.request_id] = self.requests[seq.request_id]
                done.add(seq.request_id)
        return touched, done

    def _process(self, batch: ScheduledBatch, result: StepOutput, scheduled_time: float,
                 touched: dict[str, _Request], done: set[str]) -> None:
        """The engine's side of a computed step: prompt logprobs, new tokens, stop checks."""
        now = time.time()
        for seq in batch.seqs:
            if seq.status is SequenceStatus.FINISHED:  # async: finished or aborted while the step ran
                continue  # its token (computed past its end) is dropped
            request = touched[seq.request_id] = self.requests[seq.request_id]
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = scheduled_time
            if seq.index == 0 and seq.seq_id in result.prompt_logprobs:  # n > 1 seqs share one prompt
                self._record_prompt_logprobs(request, result.prompt_logprobs[seq.seq_id])
            if seq.seq_id in result.sampled:
                self._on_token(request, seq, result, now)
                if seq.status is SequenceStatus.FINISHED:
                    done.add(seq.request_id)

    def _outputs(self, touched: dict[str, _Request], done: set[str]) -> list[RequestOutput]:
        outputs = [self._make_output(r) for request_id, r in touched.items()
                   if r.stream or (request_id in done and r.finished)]
        for output in outputs:
            if output.finished:
                del self.requests[output.request_id]
        return outputs

    def _on_token(self, request: _Request, seq: Sequence, result, now: float) -> None:
        token = seq.last_token
        params = request.params
        self.num_generation_tokens += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            self.num_prompt_tokens += len(request.prompt_token_ids)
        request.metrics.last_token_time = now
        if seq.seq_id in result.logprobs:
            seq.output_logprobs.append(self._logprob_dict(token, *result.logprobs[seq.seq_id]))
        min_done = seq.num_completion_tokens >= params.min_tokens
        if min_done and not params.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop", None)
        if min_done and token in params.stop_token_ids:
            return self._finish(seq, "stop", token)
        if request.incremental:
            delta, stop = request.detokenizers[seq.index].update([token])
            request.texts[seq.index] += delta
            if stop is not None and min_done:
                return self._finish(seq, "stop", stop)
        if self.scheduler.reached_length(seq):
            self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq, reason)

    def _logprob_dict(self, token: int, lp: float, ids: list[int], vals: list[float], rank: int):
        entry = {token: Logprob(lp, rank, self._decode_token(token))}
        for r, (i, v) in enumerate(zip(ids, vals), start=1):
            entry.setdefault(i, Logprob(v, r, self._decode_token(i)))
        return entry

    def _decode_token(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None and self.tokenizer is None:
            return ""
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def _record_prompt_logprobs(self, request: _Request, entries) -> None:
        # Stored by position: a prompt recomputed after preemption overwrites, never duplicates.
        for pos, lp, ids, vals, rank in entries:
            token = request.prompt_token_ids[pos]
            request.prompt_logprobs[pos] = self._logprob_dict(token, lp, ids, vals, rank)

    def _make_output(self, request: _Request) -> RequestOutput:
        completions = []
        finished = True
        for i, seq in enumerate(request.seqs):
            text = request.texts[i]
            seq_finished = seq.status is SequenceStatus.FINISHED
            finished = finished and seq_finished
            if seq_finished and seq.finish_reason != "abort":
                text += self._final_text(request, seq)
                request.texts[i] = text
            sent_chars, sent_tokens = request.sent[i]
            token_ids = seq.completion_token_ids  # a fresh slice (one copy): later steps append to seq's list
            request.sent[i] = (len(text), len(token_ids))
            logprobs = list(seq.output_logprobs) if request.params.logprobs is not None else None
            cumulative = sum(d[t].logprob for d, t in zip(logprobs, token_ids)) if logprobs else None
            completions.append(CompletionOutput(
                index=i, text=text, token_ids=token_ids, cumulative_logprob=cumulative, logprobs=logprobs,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=text[sent_chars:], delta_token_ids=token_ids[sent_tokens:]))
        if finished:
            request.metrics.finished_time = time.time()
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=request.prompt_logprobs, outputs=completions, finished=finished,
            num_cached_tokens=request.seqs[0].num_cached_tokens, metrics=request.metrics)

    @staticmethod
    def _final_text(request: _Request, seq: Sequence) -> str:
        """The text still to come once seq has finished: what the detokenizer holds back, or, for a seq not
        detokenized per step, all of it at once (the same text: the deltas of IncrementalDetokenizer join to
        the decode of all its ids)."""
        detokenizer = request.detokenizers[seq.index]
        if request.incremental or detokenizer.finished:
            return detokenizer.flush()
        # As per step, the EOS or stop token id that ended the seq stays out of the text.
        token_ids = seq.completion_token_ids[:-1] if seq.finish_reason == "stop" else seq.completion_token_ids
        return detokenizer.update(token_ids)[0] + detokenizer.flush()

    # ---- stats ------------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.scheduler.block_manager
        return {
            "num_running": self.scheduler.num_running, "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage, "num_preemptions": self.scheduler.num_preemptions,
            "prefix_queries": bm.prefix_queries, "prefix_hits": bm.prefix_hits,
            "prompt_tokens": self.num_prompt_tokens, "generation_tokens": self.num_generation_tokens,
            "num_free_blocks": bm.num_free_blocks, "num_blocks": self.model_runner.num_blocks,
        }
