"""/v1/completions and /v1/chat/completions: prompts -> engine requests -> JSON or an SSE stream.

A request with several prompts and n completions becomes one engine request per prompt; choice
`index` is prompt_index * n + completion index, as in vLLM.
"""
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps of a str, without its overhead

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nanovllm.engine.output import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineRequest
from nanovllm.server.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_PROMPTS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_messages,
    check_logprobs,
    check_request,
    resolve_max_tokens,
    sampling_params,
)

logger = logging.getLogger("nanovllm.server")
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


@dataclass
class Job:
    """One HTTP generation request, ready for the engine."""
    id: str
    chat: bool
    req: CompletionRequest | ChatCompletionRequest
    model: str
    requests: list[EngineRequest] = field(default_factory=list)
    prompt_texts: list[str] = field(default_factory=list)  # for echo
    echo_only: bool = False  # echo with max_tokens 0: the one token generated is dropped
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"


# ---- preparing ----------------------------------------------------------------------------------
# Prompts up to this size (characters of text, plus token ids / 8) are prepared on the event loop, in well
# under a millisecond. A hop to a worker thread costs more than that when requests come in bursts: 256 at
# once queued 256 hops, each taking the GIL from the loop and back (TTFT 0.3-1 s at rate inf).
_INLINE_PROMPT_SIZE = 1024


async def prepare(prepare_job, req: CompletionRequest | ChatCompletionRequest, frontend, model: str) -> Job:
    """prepare_completion or prepare_chat: inline for a small prompt, else in a thread (tokenizing a big
    one would stall every stream)."""
    if _prompt_size(req) <= _INLINE_PROMPT_SIZE:
        return prepare_job(req, frontend, model)
    return await asyncio.to_thread(prepare_job, req, frontend, model)


def _prompt_size(req: CompletionRequest | ChatCompletionRequest) -> int:
    pending = [m.content for m in req.messages] if isinstance(req, ChatCompletionRequest) else [req.prompt]
    size = 0
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            size += len(item)
        elif isinstance(item, dict):  # a chat content part
            pending.append(item.get("text"))
        elif item and isinstance(item[0], int):  # token ids (validated: a list is all ids or none)
            size += len(item) // 8
        elif isinstance(item, list):
            pending += item
    return size

def prepare_completion(req: CompletionRequest, engine, model: str) -> Job:
    check_request(req)
    check_logprobs(req.logprobs, "logprobs")
    prompts = _prompt_list(req.prompt)
    job = Job(f"cmpl-{uuid.uuid4().hex}", False, req, model, echo_only=req.echo and req.max_tokens == 0)
    requested = 1 if job.echo_only else req.max_tokens
    prompt_logprobs = req.logprobs if req.echo else None
    for i, prompt in enumerate(prompts):
        ids = _process_prompt(engine, prompt)
        max_tokens = resolve_max_tokens(requested, DEFAULT_COMPLETION_MAX_TOKENS, len(ids),
                                        engine.config.max_model_len)
        params = sampling_params(req, max_tokens, req.logprobs, prompt_logprobs)
        job.requests.append(EngineRequest(f"{job.id}-{i}", ids, params))
        if req.echo:
            job.prompt_texts.append(prompt if isinstance(prompt, str) else
                                    engine.tokenizer.decode(ids, skip_special_tokens=False))
    return job


def prepare_chat(req: ChatCompletionRequest, engine, model: str) -> Job:
    check_request(req)
    check_logprobs(req.top_logprobs, "top_logprobs")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true.", "top_logprobs")
    messages = chat_messages(req.messages)
    try:
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template that raises on odd messages: the client's mistake
        raise APIError(400, f"The chat template failed on these messages: {e}", "messages") from None
    # The template carries its own special tokens: no second BOS.
    ids = _process_prompt(engine, engine.tokenizer.encode(text, add_special_tokens=False))
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(requested, None, len(ids), engine.config.max_model_len, param)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    job = Job(f"chatcmpl-{uuid.uuid4().hex}", True, req, model)
    job.requests.append(EngineRequest(f"{job.id}-0", ids, sampling_params(req, max_tokens, logprobs, None)))
    return job


def _prompt_list(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "The prompt is empty.", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise APIError(400, f"At most {MAX_PROMPTS} prompts per request, got {len(prompt)}.", "prompt")
    return list(prompt)


def _process_prompt(engine, prompt: str | list[int]) -> list[int]:
    try:
        return engine.process_prompt(prompt, _ANY_PARAMS)
    except ValueError as e:
        message = str(e)
        raise APIError(400, message, "input_tokens" if "context length" in message else "prompt") from None


# ---- running ------------------------------------------------------------------------------------
async def respond(job: Job, engine: AsyncEngine, request: Request, tokenizer) -> Response:
    engine.check_accepting(len(job.requests))  # before the 200 of a stream goes out
    if job.req.stream:
        return StreamingResponse(_sse(job, engine, tokenizer), media_type="text/event-stream")
    outputs = await _until_disconnect(request, _collect(job, engine))
    if outputs is None:
        return Response(status_code=499)  # nobody is listening; the engine requests were aborted
    return JSONResponse(_full_response(job, outputs, tokenizer))


async def _collect(job: Job, engine: AsyncEngine) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(job.requests)
    async with aclosing(engine.generate(job.requests)) as outputs:
        async for i, output in outputs:
            finals[i] = output
    return finals


async def _until_disconnect(request: Request, work) -> list[RequestOutput] | None:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result() if not task.cancelled() else None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(job: Job, engine: AsyncEngine, tokenizer) -> AsyncIterator[str]:
    stream = _StreamState()
    plain = _PlainEvents(job) if _is_plain(job) else None
    try:
        if job.chat:  # the role comes first, before any token: clients can show the turn at once
            yield _event(_chunk(job, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None} for i in range(job.req.n)]))
        async with aclosing(engine.generate(job.requests)) as outputs:
            async for i, output in outputs:
                stream.finals[i] = output
                if plain is not None:
                    event = plain.event(i, output, stream.done)
                else:
                    choices = [choice for c in output.outputs
                               if (choice := _delta_choice(job, stream, i, output, c, tokenizer)) is not None]
                    event = _event(_chunk(job, choices)) if choices else None
                if event is not None:
                    yield event
        if job.req.include_usage:
            yield _event(_chunk(job, [], usage=_usage(job, list(stream.finals.values()))))
    except APIError as e:
        yield _event(e.body())  # the status line went out as 200 already
    except Exception:
        logger.exception("error while streaming %s", job.id)
        yield _event(APIError(500, "Internal error while streaming.").body())
    yield "data: [DONE]\n\n"


@dataclass
class _StreamState:
    finals: dict[int, RequestOutput] = field(default_factory=dict)  # prompt index -> latest output
    offsets: dict[int, int] = field(default_factory=dict)  # choice index -> text_offset of its next token
    done: set[int] = field(default_factory=set)  # choices whose finish_reason went out


def _delta_choice(job: Job, stream: _StreamState, i: int, output: RequestOutput, c: CompletionOutput,
                  tokenizer) -> dict | None:
    """The chunk choice for what is new in completion `c` of prompt `i`, or None if nothing is to send:
    tokens whose text is held back (a partial character, a possible stop string) wait, unless their
    logprobs are wanted or the echoed prompt goes first."""
    index = i * job.req.n + c.index
    first = index not in stream.offsets
    wants_logprobs = bool(job.req.logprobs) if job.chat else job.req.logprobs is not None
    new_tokens = c.delta_token_ids and (wants_logprobs or (first and getattr(job.req, "echo", False)))
    if index in stream.done or not (c.delta_text or c.finish_reason or new_tokens):
        return None
    offset = stream.offsets.get(index, 0)
    choice = _choice(job, output, c, index, tokenizer, delta=True, first=first, offset=offset)
    # Offsets count token strings, as in the non-streamed response (vLLM does the same).
    logprobs = choice.get("logprobs") if not job.chat else None
    stream.offsets[index] = offset + (sum(map(len, logprobs["tokens"])) if logprobs else 0)
    if c.finish_reason is not None:
        stream.done.add(index)
    return choice


def _is_plain(job: Job) -> bool:
    """Chunks with text only: no logprobs and no echoed prompt (what nearly every stream asks for)."""
    if job.chat:
        return not job.req.logprobs
    return job.req.logprobs is None and not job.req.echo


class _PlainEvents:
    """The SSE events of a plain stream, from a template of the chunk: only the index, the text and, at the
    end, the finish reason change. json.dumps of the whole chunk, per token and stream, was the largest
    cost per streamed token in the HTTP process. The bytes are those _event(_chunk(...)) gives (tested)."""

    def __init__(self, job: Job):
        empty = json.dumps(_chunk(job, []))  # {"id": ..., "model": ..., "choices": []}
        self.head, self.tail = f"data: {empty[:-3]}[", "]}\n\n"
        body = '"delta": {"content": %s}' if job.chat else '"text": %s'
        self.choice = '{"index": %d, ' + body + ', "logprobs": null, "finish_reason": %s, "stop_reason": %s}'
        self.n = job.req.n

    def event(self, i: int, output: RequestOutput, done: set[int]) -> str | None:
        """The event for what is new in the output of prompt `i`, or None if nothing is new to send."""
        choices = []
        for c in output.outputs:
            index = i * self.n + c.index
            if index in done or not (c.delta_text or c.finish_reason):
                continue
            if c.finish_reason is not None:
                done.add(index)
            choices.append(self.choice % (index, _json_str(c.delta_text), _json(c.finish_reason),
                                          _json(c.stop_reason)))
        return f"{self.head}{', '.join(choices)}{self.tail}" if choices else None


def _json(value) -> str:
    return "null" if value is None else json.dumps(value)


def _event(payload: dict) -> str:
    # ASCII JSON: line-splitting clients (httpx's aiter_lines uses str.splitlines) would cut an event at a raw
    # U+2028, U+0085 or \x1c in the text.
    return f"data: {json.dumps(payload)}\n\n"


# ---- formatting ---------------------------------------------------------------------------------
def _full_response(job: Job, outputs: list[RequestOutput], tokenizer) -> dict:
    choices = [_choice(job, out, c, i * job.req.n + c.index, tokenizer, delta=False, first=True)
               for i, out in enumerate(outputs) for c in out.outputs]
    return {"id": job.id, "object": job.object, "created": job.created, "model": job.model,
            "choices": choices, "usage": _usage(job, outputs)}


def _chunk(job: Job, choices: list[dict], usage: dict | None = None) -> dict:
    chunk = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
             "created": job.created, "model": job.model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _usage(job: Job, outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(r.prompt_token_ids) for r in job.requests)
    completion = 0 if job.echo_only else sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


def _choice(job: Job, output: RequestOutput, c: CompletionOutput, index: int, tokenizer, *, delta: bool,
            first: bool, offset: int = 0) -> dict:
    """One choice of a response (delta=False) or of a stream chunk (delta=True)."""
    text, ids, entries = _generated(job, c, delta)
    reason = {"finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if job.chat:
        logprobs = (_chat_logprobs(ids, entries, job.req.top_logprobs or 0, tokenizer)
                    if job.req.logprobs else None)
        body = {"delta": {"content": text}} if delta else {"message": {"role": "assistant", "content": text}}
        return {"index": index, **body, "logprobs": logprobs, **reason}
    if job.req.echo and first:
        prompt_ids = output.prompt_token_ids
        text = job.prompt_texts[index // job.req.n] + text
        entries = (output.prompt_logprobs or [None] * len(prompt_ids)) + entries
        ids = prompt_ids + ids
    logprobs = _completion_logprobs(ids, entries, offset, tokenizer) if job.req.logprobs is not None else None
    return {"index": index, "text": text, "logprobs": logprobs, **reason}


def _generated(job: Job, c: CompletionOutput, delta: bool) -> tuple[str, list[int], list]:
    """The generated text, ids and logprob entries to show (all, or only what is new)."""
    if job.echo_only:
        return "", [], []
    ids = c.delta_token_ids if delta else c.token_ids
    if c.logprobs is None:
        return (c.delta_text if delta else c.text), list(ids), [None] * len(ids)
    return (c.delta_text if delta else c.text), list(ids), list(c.logprobs[len(c.logprobs) - len(ids):])


def _completion_logprobs(ids: list[int], entries: list[TokenLogprobs | None], offset: int, tokenizer) -> dict:
    """The legacy completions format: parallel lists, with top_logprobs as {token string: logprob}."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(ids, entries):
        token = _token_str(token_id, entry, tokenizer)
        tokens.append(token)
        text_offset.append(offset)
        offset += len(token)
        if entry is None or token_id not in entry:  # the first prompt token has no context
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_clamp(entry[token_id].logprob))
        top: dict[str, float] = {}
        for lp in sorted(entry.values(), key=lambda lp: lp.rank):
            top.setdefault(lp.decoded_token, _clamp(lp.logprob))  # equal strings: keep the likelier
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def _chat_logprobs(ids: list[int], entries: list[TokenLogprobs | None], k: int, tokenizer) -> dict:
    content = []
    for token_id, entry in zip(ids, entries):
        entry = entry or {}
        top = sorted((item for item in entry.items() if item[1].rank <= k), key=lambda item: item[1].rank)[:k]
        sampled = entry.get(token_id)
        content.append({**_chat_token(token_id, sampled, tokenizer),
                        "top_logprobs": [_chat_token(i, lp, tokenizer) for i, lp in top]})
    return {"content": content}


def _chat_token(token_id: int, lp: Logprob | None, tokenizer) -> dict:
    return {"token": _token_str(token_id, {token_id: lp} if lp else None, tokenizer),
            "logprob": _clamp(lp.logprob) if lp else _MIN_LOGPROB,
            "bytes": list(tokenizer.token_bytes(token_id))}


def _token_str(token_id: int, entry: TokenLogprobs | None, tokenizer) -> str:
    if entry and token_id in entry and entry[token_id].decoded_token is not None:
        return entry[token_id].decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


_ANY_PARAMS = SamplingParams()
