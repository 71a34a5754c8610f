"""Streaming internals without a server process: output coalescing, SSE framing, the bench client's parser."""
import asyncio
import json

from nanovllm.engine.output import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineRequest
from nanovllm.server.bench import _sse_events
from nanovllm.server.serving import _event


def _output(text: str, ids: list[int], delta_text: str, delta_ids: list[int], finished: bool = False):
    c = CompletionOutput(index=0, text=text, token_ids=ids, finish_reason="length" if finished else None,
                         delta_text=delta_text, delta_token_ids=delta_ids)
    return RequestOutput("r", None, [1, 2], None, [c], finished)


def test_outputs_queued_while_the_consumer_was_busy_arrive_as_one():
    async def run():
        engine = AsyncEngine(lambda: None)  # no engine thread: the test plays it through the command queue
        engine.ready = True
        gen = engine.generate([EngineRequest("r", [1, 2], SamplingParams(max_tokens=3))])
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        stream = engine._commands.get_nowait().queue
        stream.put_nowait(("r", _output("a", [5], "a", [5])))
        stream.put_nowait(("r", _output("ab", [5, 6], "b", [6])))
        stream.put_nowait(("r", _output("abc", [5, 6, 7], "c", [7], finished=True)))
        _, out = await first
        rest = [o async for o in gen]
        return out, rest

    out, rest = asyncio.run(run())
    assert rest == []  # one output for three steps, and the request is done
    c = out.outputs[0]
    assert (c.text, c.token_ids, c.delta_text, c.delta_token_ids) == ("abc", [5, 6, 7], "abc", [5, 6, 7])
    assert out.finished and c.finish_reason == "length"


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
