"""Streaming internals without a server process: output coalescing, SSE framing, the bench client's parser."""
import asyncio
import json
import multiprocessing

from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineRequest, _Channel, _empty_completions, _Stream
from nanovllm.server.bench import _sse_events
from nanovllm.server.protocol import APIError
from nanovllm.server.serving import _event


def _step(delta_text: str, delta_ids: list[int], finished: bool = False, rid: str = "r") -> tuple:
    """One request's part of a step's message from the engine process (engine_core.EngineCore._pack's tuple)."""
    metrics = (1.0, 1.0, 1.0, 1.0, 1.0 if finished else None)
    completion = (delta_text, delta_ids, None, None, "length" if finished else None, None)
    return rid, finished, 0, metrics, None, [completion]


def test_steps_queued_while_the_server_was_busy_arrive_as_one_output():
    async def run():
        engine = AsyncEngine({})  # never started: the test plays the engine process's messages
        engine.ready = True
        gen = engine.generate([EngineRequest("r", [1, 2], SamplingParams(max_tokens=3))])
        first = asyncio.ensure_future(gen.__anext__())
        for _ in range(2):  # the generator's first step, then the end of that event-loop pass
            await asyncio.sleep(0)
        add = engine._commands.get_nowait()
        assert add == [("add", "r", [1, 2], SamplingParams(max_tokens=3), add[0][4])]
        engine._conn, engine_end = multiprocessing.Pipe()
        engine_end.send(("step", 0.0, [_step("a", [5])], [], [], {}))
        engine._on_readable()  # one step: one output, queued for the busy consumer
        for packed in (_step("b", [6]), _step("c", [7], finished=True)):
            engine_end.send(("step", 0.0, [packed], [], [], {}))
        engine._on_readable()  # two steps waiting: joined into one output, merged with the queued one
        _, out = await first
        rest = [o async for o in gen]
        return out, rest

    out, rest = asyncio.run(run())
    assert rest == []  # one output for three steps, and the request is done
    c = out.outputs[0]
    assert (c.text, c.token_ids, c.delta_text, c.delta_token_ids) == ("abc", [5, 6, 7], "abc", [5, 6, 7])
    assert out.finished and c.finish_reason == "length" and out.prompt_token_ids == [1, 2]


def test_sse_events_are_one_line_whatever_the_text():
    text = "a\u2028b\x85c\x1cd\ne"  # str.splitlines() (httpx's aiter_lines) splits at each of these
    event = _event({"text": text})
    assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
    assert json.loads(event[6:])["text"] == text


def test_bench_parser_joins_events_split_across_reads():
    async def reads():
        for i, part in enumerate((b'data: {"a": 1}\n\ndata: {"b"', b': 2}\n\n', b"data: [DONE]\n\n")):
            yield part, float(i)

    async def run():
        return [event async for event in _sse_events(reads())]

    assert asyncio.run(run()) == [({"a": 1}, 0.0), ({"b": 2}, 1.0)]  # an event is timed by its last read


def test_joined_steps_equal_the_steps_one_by_one():
    """Two step messages joined (n=2, logprobs, prompt logprobs in the first only, an abort and a failed add)
    rebuild the same final output as handling them one at a time."""
    from nanovllm.engine.output import Logprob
    from nanovllm.server.async_engine import _join_steps

    lp = lambda t: [{t: Logprob(-0.5, 1, str(t))}]  # noqa: E731
    first = [("r", False, 0, (1.0, 1.0, 1.0, 1.0, None), [None, {2: Logprob(-1.0, 1, "2")}],
              [("a", [5], lp(5), -0.5, None, None), ("x", [8], lp(8), -0.5, None, None)])]
    second = [("r", True, 0, (1.0, 1.0, 1.0, 2.0, 2.0), None,
               [("b", [6], lp(6), -1.0, "length", None), ("", [], [], -0.5, "stop", 2)])]
    steps = [[1.0, first, [], [], {"num_running": 1}], [2.0, second, ["q"], [("e", 400, "bad")], {}]]

    def final(messages: list[list]):
        engine = AsyncEngine({})
        channel = _Channel()
        engine._streams["r"] = _Stream(channel, EngineRequest("r", [1, 2], SamplingParams(n=2, logprobs=1)),
                                       _empty_completions(SamplingParams(n=2, logprobs=1)))
        for message in messages:
            engine._on_step(*message)
        return channel.ready["r"]

    joined, one_by_one = final([_join_steps(steps)]), final(steps)
    whole = lambda c: (c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason, c.stop_reason)  # noqa: E731
    assert [whole(c) for c in joined.outputs] == [whole(c) for c in one_by_one.outputs]
    assert joined.prompt_logprobs == one_by_one.prompt_logprobs
    assert [(c.delta_text, c.delta_token_ids) for c in joined.outputs] == [("ab", [5, 6]), ("x", [8])]
    assert [c.text for c in joined.outputs] == ["ab", "x"] and joined.outputs[1].stop_reason == 2
    assert joined.outputs[0].logprobs == lp(5) + lp(6) and joined.prompt_logprobs[1][2].logprob == -1.0
    assert _join_steps(steps)[2:] == [["q"], [("e", 400, "bad")], {}]


_HISTOGRAMS = ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
               "request_time_per_output_token_seconds", "request_queue_time_seconds",
               "request_prefill_time_seconds", "request_decode_time_seconds", "request_prompt_tokens",
               "request_generation_tokens")


def _observed(messages: list[list], streams: dict[str, int]) -> dict[str, float]:
    """Every histogram's sum and count, and the success count, after handling `messages` as they come."""
    from nanovllm.server.metrics import ServerMetrics
    metrics = ServerMetrics("m")
    engine = AsyncEngine({}, metrics)
    for rid, num_prompt in streams.items():
        engine._streams[rid] = _Stream(_Channel(), EngineRequest(rid, list(range(num_prompt)), SamplingParams()),
                                       _empty_completions(SamplingParams()))
    for message in messages:
        engine._on_step(*message)
    value = lambda name, **labels: metrics.registry.get_sample_value(  # noqa: E731
        f"vllm:{name}", {**metrics.labels, **labels}) or 0.0
    return {"success": value("request_success_total", finished_reason="length"),
            **{f"{h}{s}": round(value(h + s), 9) for h in _HISTOGRAMS for s in ("_sum", "_count")}}


def test_metrics_of_joined_steps_equal_the_steps_one_by_one():
    """The server fell behind and got three steps at once: latencies are those of the steps, not of the
    moment they arrived. "r" (arrived at 100, scheduled at 100.5) samples at 101, 102 and 104; "s" samples
    once at 101 and finishes."""
    from nanovllm.server.async_engine import _join_steps

    def packed(rid: str, first: float, last: float, ids: list[int], finished: bool) -> tuple:
        metrics = (100.0, 100.5, first, last, last if finished else None)
        return rid, finished, 0, metrics, None, [("t", ids, None, None, "length" if finished else None, None)]

    steps = [[101.0, [packed("r", 101.0, 101.0, [5], False), packed("s", 101.0, 101.0, [9], True)], [], [], {}],
             [102.0, [packed("r", 101.0, 102.0, [6], False)], [], [], {}],
             [104.0, [packed("r", 101.0, 104.0, [7], True)], [], [], {}]]
    one_by_one = _observed(steps, {"r": 3, "s": 2})
    assert one_by_one["time_to_first_token_seconds_sum"] == 2.0  # 1 s each
    assert one_by_one["inter_token_latency_seconds_sum"] == 3.0  # 101 -> 104 in 2 gaps
    assert one_by_one["e2e_request_latency_seconds_sum"] == 5.0  # r 4 s, s 1 s
    assert _observed([_join_steps(steps)], {"r": 3, "s": 2}) == one_by_one
    assert _observed([steps[0], _join_steps(steps[1:])], {"r": 3, "s": 2}) == one_by_one


def test_a_request_that_finishes_as_its_client_leaves_still_counts():
    """The client left while the step that finishes its request ran: the request ran to its end, so it counts
    (as when the engine ran in the server's process); one aborted before finishing does not."""
    from nanovllm.server.metrics import ServerMetrics

    async def run():
        metrics = ServerMetrics("m")
        engine = AsyncEngine({}, metrics)
        engine.ready = True
        gens = {rid: engine.generate([EngineRequest(rid, [1, 2], SamplingParams(max_tokens=2))]) for rid in "ab"}
        firsts = [asyncio.ensure_future(g.__anext__()) for g in gens.values()]
        await asyncio.sleep(0)
        engine._on_step(1.0, [_step("x", [5], rid="a"), _step("x", [5], rid="b")], [], [], {})
        await asyncio.gather(*firsts)
        for g in gens.values():  # both clients leave
            await g.aclose()
        engine._flush_outbox()  # as at the end of this event-loop pass
        commands = [c for _ in range(engine._commands.qsize()) for c in engine._commands.get_nowait()]
        assert [c for c in commands if c[0] == "abort"] == [("abort", "a"), ("abort", "b")]
        # One message: "a" finished in the step already running, "b" was aborted.
        engine._on_step(2.0, [_step("y", [6], finished=True, rid="a")], ["b"], [], {})
        value = lambda name, **labels: metrics.registry.get_sample_value(  # noqa: E731
            f"vllm:{name}", {**metrics.labels, **labels}) or 0.0
        return (value("request_success_total", finished_reason="length"),
                value("e2e_request_latency_seconds_count"), value("generation_tokens_total"),
                engine._streams, metrics._completions, engine.num_pending)

    assert asyncio.run(run()) == (1.0, 1.0, 3.0, {}, {}, 0)


def test_plain_events_are_the_bytes_of_the_generic_path():
    """The templated events of text-only streams equal json.dumps of the chunk, whatever the text, index and
    finish: chat and completions, n=2, non-ASCII and line-breaking text, stop strings and stop token ids."""
    from nanovllm.engine.output import CompletionOutput, RequestOutput
    from nanovllm.server.protocol import ChatCompletionRequest, CompletionRequest
    from nanovllm.server.serving import Job, _chunk, _delta_choice, _is_plain, _PlainEvents, _StreamState

    steps = [[("é\u2028\"\\", None, None), ("", None, None)],
             [("b", "stop", "\n"), ("\x00c", None, None)],
             [("", None, None), ("", "stop", 2)],
             [("late", "length", None), ("", "length", None)]]  # both already finished: nothing goes out
    for chat in (False, True):
        req = (ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], n=2, stream=True) if chat
               else CompletionRequest(prompt="x", n=2, stream=True))
        job = Job("cmpl-1", chat, req, "m\u00e9")
        assert _is_plain(job)
        plain, generic, fast, slow = _PlainEvents(job), _StreamState(), set(), []
        events = []
        for prompt in (0, 1):
            for step in steps:
                output = RequestOutput("r", None, [1], None, [
                    CompletionOutput(k, "", [], finish_reason=reason, stop_reason=stop, delta_text=text,
                                     delta_token_ids=[7] if text else [])
                    for k, (text, reason, stop) in enumerate(step)], False)
                choices = [ch for c in output.outputs
                           if (ch := _delta_choice(job, generic, prompt, output, c, None)) is not None]
                slow.append(_event(_chunk(job, choices)) if choices else None)
                events.append(plain.event(prompt, output, fast))
        assert events == slow and sum(e is not None for e in events) == 6
        assert json.loads(events[0][6:])["choices"][0]["index"] == 0


def test_an_abort_or_an_error_after_an_untaken_output():
    """The server aborts a request (shutdown) whose last step's output its client has not taken yet: one
    final output, with that step's text and finish_reason "abort". An error ends the stream with the error."""
    async def run(end):
        engine = AsyncEngine({})
        engine.ready = True
        gen = engine.generate([EngineRequest("r", [1, 2], SamplingParams(max_tokens=9))])
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        engine._on_step(0.0, [_step("a", [5])], [], [], {})
        _, out = await first
        engine._on_step(0.0, [_step("b", [6])], [], [], {})  # not taken before the end comes
        engine._on_step(0.0, [], *end, {})
        try:
            return [o async for _, o in gen]
        except Exception as e:  # noqa: BLE001 - the test looks at what was raised
            return e

    [out] = asyncio.run(run((["r"], [])))
    c = out.outputs[0]
    assert out.finished and (c.text, c.delta_text, c.delta_token_ids, c.finish_reason) == ("ab", "b", [6], "abort")
    error = asyncio.run(run(([], [("r", 400, "bad")])))
    assert isinstance(error, APIError) and (error.status, error.message) == (400, "bad")
