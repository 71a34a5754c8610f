"""Prometheus metrics under vLLM's names, so existing dashboards and `vllm bench` tooling read them as is.

Gauges and the engine's own counters (preemptions, prefix-cache lookups) are read from the latest
`LLMEngine.stats()` snapshot (sent by the engine process with every step) at scrape time; per-request
latencies and token counts are observed from each step's outputs as the HTTP process receives them, per
completion (a request with n=3 counts three, as vLLM v1's child requests do).
"""
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nanovllm.engine.output import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
_GAUGES = {"num_running": ("vllm:num_requests_running", "Requests in the running batch."),
           "num_waiting": ("vllm:num_requests_waiting", "Requests waiting or preempted."),
           "kv_cache_usage": ("vllm:kv_cache_usage_perc", "Fraction of KV blocks in use.")}
# Engine counters that are cumulative in stats(): exported minus their value after warm-up.
_ENGINE_COUNTERS = {"num_preemptions": ("vllm:num_preemptions", "Cumulative number of preemptions."),
                    "prefix_queries": ("vllm:prefix_cache_queries", "Prefix-cache tokens looked up."),
                    "prefix_hits": ("vllm:prefix_cache_hits", "Prefix-cache tokens found.")}


@dataclass
class _Completion:
    """Timing of one completion (one of a request's n), kept until it finishes."""
    first_token_time: float | None = None
    last_token_time: float = 0.0
    num_tokens: int = 0
    done: bool = False


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        disable_created_metrics()  # no `*_created` series, as vLLM
        self.registry = registry or CollectorRegistry()
        self.labels = {"model_name": model_name, "engine": "0"}
        self.stats: dict = {}
        self._baseline: dict = {}
        self._completions: dict[str, list[_Completion]] = {}
        self.registry.register(_StatsCollector(self))
        names = list(self.labels)
        hist, counter = self._histogram, self._counter
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*names, "finished_reason"], registry=self.registry)
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens.", _LATENCY_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds", "Mean time per output token per "
                         "request.", _LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Time waiting before first scheduled.",
                               _LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds", "First scheduled to first token.",
                                 _LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds", "First token to finish.",
                                _LATENCY_BUCKETS)
        self.request_prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                          _TOKEN_BUCKETS)
        self.request_generation_tokens = hist("vllm:request_generation_tokens", "Generated tokens per "
                                              "request.", _TOKEN_BUCKETS)
        self.iteration_tokens = hist("vllm:iteration_tokens_total", "Tokens per engine step.", _TOKEN_BUCKETS)

    def _histogram(self, name: str, doc: str, buckets: tuple) -> Histogram:
        histogram = Histogram(name, doc, list(self.labels), buckets=buckets, registry=self.registry)
        return histogram.labels(**self.labels)

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(name, doc, list(self.labels), registry=self.registry).labels(**self.labels)

    # ---- called by async_engine, for each message from the engine process -------------------------
    def set_baseline(self, stats: dict) -> None:
        """Engine counters after warm-up: the warm-up request is not user traffic."""
        self._baseline = {k: stats.get(k, 0) for k in _ENGINE_COUNTERS}
        self.stats = stats

    def update_stats(self, stats: dict) -> None:
        self.stats = stats

    def forget(self, request_id: str) -> None:
        self._completions.pop(request_id, None)

    def observe_step(self, outputs: list[RequestOutput], now: float | None = None) -> None:
        """`now`: when the step ran. An output may stand for several steps that reached the HTTP process
        together (async_engine joins them): its tokens are timed by the engine's own first and last token
        times, so latencies are those of the steps, not of their arrival together (only the spread of the
        gaps inside a join, and iteration_tokens, which sees the join as one step, are not)."""
        now = time.time() if now is None else now  # engine timestamps are time.time()
        prompt_tokens = generation_tokens = 0  # counters move once per step: this runs for every stream
        for out in outputs:
            states = self._completions.get(out.request_id)
            if states is None:
                states = self._completions[out.request_id] = [_Completion() for _ in out.outputs]
            first = all(s.first_token_time is None for s in states)
            if first and any(c.delta_token_ids for c in out.outputs):  # the prompt is counted once
                prompt_tokens += len(out.prompt_token_ids)
            # This request's latest step (all of its completions sample in the same steps).
            last = out.metrics.last_token_time or now
            for state, completion in zip(states, out.outputs):
                generation_tokens += self._observe_tokens(state, len(completion.delta_token_ids), out, last)
                if completion.finish_reason is not None and not state.done:
                    self._observe_finish(state, completion.finish_reason, out, last)
            if out.finished:
                del self._completions[out.request_id]
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)
        if prompt_tokens + generation_tokens:
            self.iteration_tokens.observe(prompt_tokens + generation_tokens)

    def _observe_tokens(self, state: _Completion, new: int, out: RequestOutput, now: float) -> int:
        """Observes `new` tokens, the last one sampled at `now`. Several came from steps joined into one
        output: the engine's first-token time is exact, the gaps after it are spread evenly up to `now`."""
        if not new:
            return 0
        gaps = new
        if state.first_token_time is None:
            m = out.metrics
            state.first_token_time = state.last_token_time = m.first_token_time or now
            self.ttft.observe(state.first_token_time - m.arrival_time)
            gaps -= 1
        if gaps:
            gap = (now - state.last_token_time) / gaps
            for _ in range(gaps):
                self.itl.observe(gap)
        state.last_token_time = now
        state.num_tokens += new
        return new

    def _observe_finish(self, state: _Completion, reason: str, out: RequestOutput, now: float) -> None:
        state.done = True
        m = out.metrics
        self.success.labels(**self.labels, finished_reason=reason).inc()
        self.e2e.observe(now - m.arrival_time)
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(state.num_tokens)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if state.first_token_time is not None:
            if m.first_scheduled_time is not None:
                self.prefill_time.observe(state.first_token_time - m.first_scheduled_time)
            self.decode_time.observe(now - state.first_token_time)
            if state.num_tokens > 1:
                self.tpot.observe((now - state.first_token_time) / (state.num_tokens - 1))


class _StatsCollector:
    """Exports the latest stats() snapshot at scrape time, so gauges are never stale after an abort."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        m, names, values = self.metrics, list(self.metrics.labels), list(self.metrics.labels.values())
        stats = m.stats
        for key, (name, doc) in _GAUGES.items():
            gauge = GaugeMetricFamily(name, doc, labels=names)
            gauge.add_metric(values, float(stats.get(key, 0)))
            yield gauge
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            counter = CounterMetricFamily(name, doc, labels=names)
            counter.add_metric(values, float(stats.get(key, 0) - m._baseline.get(key, 0)))
            yield counter
