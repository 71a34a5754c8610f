"""Streaming internals without a server process: output coalescing, SSE framing, the bench client's parser."""
import asyncio
import json
import multiprocessing

from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineRequest, _empty_completions, _Stream
from nanovllm.server.bench import _sse_events
from nanovllm.server.serving import _event


def _step(delta_text: str, delta_ids: list[int], finished: bool = False) -> tuple:
    """One step's message from the engine process for request "r" (engine_core.EngineCore._pack's tuple)."""
    metrics = (1.0, 1.0, 1.0, 1.0, 1.0 if finished else None)
    completion = (delta_text, delta_ids, None, None, "length" if finished else None, None)
    return "r", finished, 0, metrics, None, [completion]


def test_steps_queued_while_the_server_was_busy_arrive_as_one_output():
    async def run():
        engine = AsyncEngine({})  # never started: the test plays the engine process's messages
        engine.ready = True
        gen = engine.generate([EngineRequest("r", [1, 2], SamplingParams(max_tokens=3))])
        first = asyncio.ensure_future(gen.__anext__())
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
    class Response:
        async def aiter_bytes(self):
            for part in (b'data: {"a": 1}\n\ndata: {"b"', b': 2}\n\n', b"data: [DONE]\n\n"):
                yield part

    async def run():
        return [chunk async for chunk, _ in _sse_events(Response())]

    assert asyncio.run(run()) == [{"a": 1}, {"b": 2}]


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
        engine._streams["r"] = _Stream(asyncio.Queue(), EngineRequest("r", [1, 2], SamplingParams(n=2, logprobs=1)),
                                       _empty_completions(SamplingParams(n=2, logprobs=1)))
        queue = engine._streams["r"].queue
        for message in messages:
            engine._on_step(*message)
        return [queue.get_nowait()[1] for _ in range(queue.qsize())][-1]

    joined, one_by_one = final([_join_steps(steps)]), final(steps)
    whole = lambda c: (c.text, c.token_ids, c.logprobs, c.cumulative_logprob, c.finish_reason, c.stop_reason)  # noqa: E731
    assert [whole(c) for c in joined.outputs] == [whole(c) for c in one_by_one.outputs]
    assert joined.prompt_logprobs == one_by_one.prompt_logprobs
    assert [(c.delta_text, c.delta_token_ids) for c in joined.outputs] == [("ab", [5, 6]), ("x", [8])]
    assert [c.text for c in joined.outputs] == ["ab", "x"] and joined.outputs[1].stop_reason == 2
    assert joined.outputs[0].logprobs == lp(5) + lp(6) and joined.prompt_logprobs[1][2].logprob == -1.0
    assert _join_steps(steps)[2:] == [["q"], [("e", 400, "bad")], {}]
