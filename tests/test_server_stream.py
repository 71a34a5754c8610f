"""Streaming internals without a server process: output coalescing, SSE framing, the bench client's parser."""
import asyncio
import json
import multiprocessing

from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineRequest
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
