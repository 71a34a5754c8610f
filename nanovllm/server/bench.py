"""`nanovllm bench serve`: a seeded random workload against a running server, measured as
`vllm bench serve` measures it.

TTFT: send -> first chunk with choices. ITL: gaps between later chunks. TPOT: (e2e - TTFT) / (output - 1)
per request. E2E: send -> end of stream. Output lengths come from the final usage chunk.
"""
import asyncio
import json
import multiprocessing
import os
import platform
import random
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import numpy as np

_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the of and to in is was for on that with as by at from his her an which are this be or had not but "
    "were they all one have has been their more when who will would there about into time than can river "
    "mountain engine garden window history number language music light water city paper system question "
    "morning market winter forest letter summer island bridge signal memory"
).split()


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # seconds since the benchmark started
    error: str = ""


def run_benchmark(args) -> dict:
    result = _run(_benchmark(args))
    _print_summary(result)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"results written to {args.output_json}")
    return result


def _run(coroutine):
    """On uvloop where installed: the client's event loop must cost less per event than the server's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def _benchmark(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    # Streams go out on a connection each (_post_stream); httpx only sends the few requests before the run.
    tls = _tls(url)
    timeout = httpx.Timeout(None, connect=10.0)
    async with httpx.AsyncClient(headers=headers, verify=tls or True, timeout=timeout) as client:
        model = args.model or (await _get_json(client, f"{url}/v1/models"))["data"][0]["id"]
        prompts = await _make_prompts(client, url, model, args.num_prompts, args.input_len, args.seed)
        if args.backend == "chat":  # chat takes text; the chat template then adds a few tokens
            detokenize = f"{url}/detokenize"
            prompts = [(await _post_json(client, detokenize, {"model": model, "tokens": p}))["prompt"]
                       for p in prompts]
        endpoint = f"{url}/v1/chat/completions" if args.backend == "chat" else f"{url}/v1/completions"
        payload = lambda p, n: _payload(args.backend, model, p, n)
        test = await _send(endpoint, headers, payload(prompts[0], 4), time.perf_counter(), tls)
        if not test.ok:
            raise RuntimeError(f"The test request failed: {test.error}")
        rng = random.Random(args.seed)
        delays, t = [], 0.0  # seconds after the start
        for _ in prompts:
            delays.append(t)
            t += 0.0 if args.request_rate == float("inf") else rng.expovariate(args.request_rate)
        payloads = [payload(p, args.output_len) for p in prompts]
        server_cpu0 = _server_cpu(args.server_pid)
        started_at = time.time()
        if args.num_clients > 1:
            t0, results, client_cpu, end = _fire_in_processes(args.num_clients, endpoint, headers, payloads,
                                                              delays, args.max_concurrency)
        else:
            t0 = time.perf_counter()
            results, client_cpu, end = await _fire(endpoint, headers, payloads, delays, t0, args.max_concurrency)
        ended_at, server_cpu1 = time.time(), _server_cpu(args.server_pid)
    result = _summarize(args, model, results, end - t0)
    # The client's own CPU seconds in the timed run (is the client, not the server, the bottleneck?), the
    # server's processes' (with --server-pid), and the run's wall-clock bounds.
    result.update(client_cpu_s=client_cpu, started_at=started_at, ended_at=ended_at)
    if server_cpu0:
        result["server_cpu_s"] = {name: server_cpu1[name] - cpu for name, cpu in server_cpu0.items()}
    return result


async def _fire(endpoint: str, headers: dict, payloads: list[dict], delays: list[float], t0: float,
                max_concurrency: int | None) -> tuple[list[RequestResult], float, float]:
    """Sends each payload at t0 + its delay (perf_counter seconds); returns the results, this process's CPU
    seconds meanwhile, and when the last stream ended."""
    tls = _tls(endpoint)
    limit = asyncio.Semaphore(max_concurrency or len(payloads))
    cpu0 = time.process_time()

    async def one(payload: dict, delay: float) -> RequestResult:
        await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
        async with limit:
            return await _send(endpoint, headers, payload, t0, tls)

    results = await asyncio.gather(*(one(p, d) for p, d in zip(payloads, delays)))
    return list(results), time.process_time() - cpu0, time.perf_counter()


def _fire_in_processes(num: int, endpoint: str, headers: dict, payloads: list[dict], delays: list[float],
                       max_concurrency: int | None) -> tuple[float, list[RequestResult], float, float]:
    """_fire split over `num` processes (request i in process i % num, at its own time), so that one Python
    process parsing every stream does not set the pace. They start together: perf_counter is one clock for
    every process (CLOCK_MONOTONIC). Returns the start, the results in order, the CPU seconds of all, and the
    end. --max-concurrency is shared out evenly."""
    context = multiprocessing.get_context("spawn")
    share = -(-max_concurrency // num) if max_concurrency else None
    workers = []
    for i in range(num):
        conn, child = context.Pipe()
        process = context.Process(target=_client_process, daemon=True,
                                  args=(child, endpoint, headers, payloads[i::num], delays[i::num], share))
        process.start()
        workers.append((process, conn))
    for _, conn in workers:  # each has imported and is waiting for the start
        conn.recv()
    t0 = time.perf_counter()
    for _, conn in workers:
        conn.send(t0)
    parts = [conn.recv() for _, conn in workers]
    for process, _ in workers:
        process.join()
    results: list = [None] * len(payloads)
    for i, (part, _, _) in enumerate(parts):
        results[i::num] = part
    return t0, results, sum(cpu for _, cpu, _ in parts), max(end for _, _, end in parts)


def _client_process(conn, endpoint: str, headers: dict, payloads: list[dict], delays: list[float],
                    max_concurrency: int | None) -> None:
    conn.send("ready")
    t0 = conn.recv()
    conn.send(_run(_fire(endpoint, headers, payloads, delays, t0, max_concurrency)))


def _server_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds (user + system) so far of process `pid` ("http": the server's HTTP process) and of all its
    children together ("children": the engine process, and multiprocessing's idle resource tracker), read
    from /proc: the server must run on this machine."""
    if pid is None:
        return {}
    tick, out = os.sysconf("SC_CLK_TCK"), {"http": 0.0, "children": 0.0}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
        except OSError:  # gone meanwhile
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            out["http" if int(entry) == pid else "children"] += (int(fields[11]) + int(fields[12])) / tick
    return out


async def _get_json(client: httpx.AsyncClient, url: str) -> dict:
    response = await client.get(url)
    response.raise_for_status()
    return response.json()


async def _post_json(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    response = await client.post(url, json=body)
    response.raise_for_status()
    return response.json()


async def _make_prompts(client, url: str, model: str, num: int, input_len: int, seed: int) -> list[list[int]]:
    """Random-word prompts cut to exactly `input_len` tokens by the server's own tokenizer."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        ids: list[int] = []
        while len(ids) < input_len:
            text = " ".join(rng.choice(_WORDS) for _ in range(input_len))
            body = {"model": model, "prompt": text, "add_special_tokens": not ids}
            ids += (await _post_json(client, f"{url}/tokenize", body))["tokens"]
        prompts.append(ids[:input_len])
    return prompts


def _payload(backend: str, model: str, prompt: list[int] | str, max_tokens: int) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if backend == "chat":
        return {**body, "messages": [{"role": "user", "content": prompt}]}
    return {**body, "prompt": prompt}


def _tls(url: str) -> ssl.SSLContext | None:
    """One TLS context for every connection to an https URL (building one loads the CA store: ~40 ms)."""
    return ssl.create_default_context() if url.startswith("https:") else None


async def _send(url: str, headers: dict, payload: dict, t0: float, tls: ssl.SSLContext | None) -> RequestResult:
    result = RequestResult(prompt_len=len(payload.get("prompt", [])))
    body = json.dumps(payload).encode()
    start = last = time.perf_counter()
    try:
        async for chunk, now in _sse_events(_post_stream(url, headers, body, tls)):
            if "error" in chunk:
                result.error = chunk["error"].get("message", "error")
                return result
            if chunk.get("choices") and _chunk_text(chunk):
                if not result.chunk_times:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                result.chunk_times.append(now - t0)
            if chunk.get("usage"):
                result.output_len = chunk["usage"]["completion_tokens"]
                result.prompt_len = chunk["usage"]["prompt_tokens"]
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e = time.perf_counter() - start
    result.ok = bool(result.chunk_times)
    if not result.ok:
        result.error = f"the stream ended without text ({result.output_len} tokens)"
    return result


async def _post_stream(url: str, headers: dict, body: bytes, tls: ssl.SSLContext | None
                       ) -> AsyncIterator[tuple[bytes, float]]:
    """POSTs `body` on a connection of its own; yields (response body bytes, arrival time) per read.

    A minimal HTTP/1.1 client on asyncio streams: httpx cost ~165 us of CPU per read of a stream (its
    transport stack and h11), more than the server spent per event, so the client, not the server, set the
    pace at a few thousand events per second. Here a read costs a few us: find the chunk sizes, join."""
    u = urllib.parse.urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    reader, writer = await asyncio.open_connection(u.hostname, port, ssl=tls)
    try:
        lines = [f"POST {u.path} HTTP/1.1", f"Host: {u.netloc}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}", "Accept: text/event-stream", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        status, *fields = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        code = int(status.split()[1])
        chunked = any(f.lower().startswith("transfer-encoding:") and "chunked" in f.lower() for f in fields)
        if code != 200:
            raise ValueError(f"HTTP {code}: {(await reader.read(200))!r}")
        if not chunked:  # the whole body, up to the close
            yield await reader.read(), time.perf_counter()
            return
        buffer = b""
        while data := await reader.read(1 << 16):
            now = time.perf_counter()
            buffer += data
            parts, pos = [], 0
            while (end := buffer.find(b"\r\n", pos)) >= 0:
                size = int(buffer[pos:end].split(b";")[0], 16)
                if size == 0:  # the last chunk
                    yield b"".join(parts), now
                    return
                if len(buffer) < end + size + 4:  # this chunk is not all here yet
                    break
                parts.append(buffer[end + 2:end + 2 + size])
                pos = end + size + 4
            buffer = buffer[pos:]
            if parts:
                yield b"".join(parts), now
        raise ValueError("the stream ended before its last chunk")
    finally:
        writer.close()


async def _sse_events(reads: AsyncIterator[tuple[bytes, float]]) -> AsyncIterator[tuple[dict, float]]:
    """(JSON payload, arrival time) of each `data:` event, from (bytes, arrival time) reads of the body."""
    buffer = b""
    async for data, now in reads:
        *events, buffer = (buffer + data).split(b"\n\n")
        for event in events:
            for line in event.splitlines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    yield json.loads(line[6:]), now


def _chunk_text(chunk: dict) -> str:
    choice = chunk["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _summarize(args, model: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    per_second = np.bincount(np.array([int(t) for r in ok for t in r.chunk_times], dtype=np.int64))
    return {
        "backend": args.backend, "url": args.url, "model": model, "num_prompts": args.num_prompts,
        "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "max_concurrency": args.max_concurrency, "num_clients": args.num_clients, "input_len": args.input_len,
        "output_len": args.output_len, "seed": args.seed, "label": args.label, "client_hardware": _hardware(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "peak_output_throughput": int(per_second.max()) if per_second.size else 0,
        "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([x for r in ok for x in r.itl]), "e2e_ms": _stats([r.e2e for r in ok]),
    }


def _stats(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.array(seconds) * 1000
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "std": float(ms.std()),
            "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99))}


def _hardware() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


def _print_summary(r: dict) -> None:
    print(f"{'=' * 16} Serving benchmark ({r['backend']}, {r['model']}) {'=' * 16}")
    print(f"requests: {r['completed']} ok, {r['failed']} failed, in {r['duration_s']:.2f} s "
          f"(rate {r['request_rate']}/s)")
    print(f"throughput: {r['request_throughput']:.2f} req/s, {r['output_throughput']:.1f} output tok/s, "
          f"{r['total_token_throughput']:.1f} total tok/s, peak {r['peak_output_throughput']} output tok/s")
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = r[f"{name}_ms"]
        if s:
            print(f"{name.upper():>5} ms: mean {s['mean']:9.2f}  p50 {s['p50']:9.2f}  p99 {s['p99']:9.2f}")
    for error in r["errors"]:
        print(f"error: {error}")
