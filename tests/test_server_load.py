"""The server's life under pressure: a KV cache too small for the load (preemption), SIGTERM mid-load,
and start-up failures."""
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from test_server import REPO_ROOT, ServerProcess, greedy_batch, load, make_tiny_model_dir, offline_llm, prompts

SMALL_KV = ["--max-model-len", "256", "--block-size", "16", "--num-kvcache-blocks", "12"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def small_kv_server(tiny_model_dir, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("log") / "kv.log")
    proc = ServerProcess(["--model", tiny_model_dir, *SMALL_KV], log)
    yield proc
    proc.stop_cleanly()


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return offline_llm(tiny_model_dir)


def test_preemption_under_a_small_kv_cache(small_kv_server, llm):
    """16 requests of 4 blocks each on 12 blocks: preempted and recomputed, yet every one finishes with the
    tokens the offline engine (ample cache) gives, and the cache ends empty."""
    batch = prompts(16, seed=11, words=8)
    expected = [o.outputs[0].text for o in greedy_batch(llm, batch, max_tokens=40, ignore_eos=True)]
    client = small_kv_server.async_client(timeout=120)

    async def run():
        kwargs = {"model": "", "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
        return await asyncio.gather(*(client.completions.create(prompt=p, **kwargs) for p in batch))

    responses = asyncio.run(run())
    assert [r.choices[0].finish_reason for r in responses] == ["length"] * 16
    assert [r.usage.completion_tokens for r in responses] == [40] * 16
    assert [r.choices[0].text for r in responses] == expected
    m = small_kv_server.wait_idle()
    assert m["vllm:num_preemptions_total"] > 0
    assert load(m) == (0, 0, 0)


def test_sequence_larger_than_the_whole_cache_ends_cleanly(small_kv_server):
    """12 blocks hold 192 tokens; asking for 240 must end (length) rather than loop or crash."""
    client = small_kv_server.client(timeout=60)
    response = client.completions.create(model="", prompt="the river", max_tokens=240, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    # 192 KV slots, plus the last sampled token, which is never fed back.
    assert response.usage.prompt_tokens + response.usage.completion_tokens <= 193
    assert client.completions.create(model="", prompt="hi", max_tokens=3).usage.completion_tokens >= 1


def test_sigterm_under_load(tmp_path):
    """SIGTERM once 4 short streams have finished, with 12 too long to finish (4000 tokens) in flight:
    no new work is accepted, each stream ends properly (finished, or finish_reason "abort" after the
    1 s drain) with [DONE], and the process exits 0 within a bounded time, with no traceback."""
    model = make_tiny_model_dir(tmp_path, max_position_embeddings=4096)
    proc = ServerProcess(["--model", model, "--max-model-len", "4096", "--kv-cache-memory-gb", "0.25",
                          "--shutdown-timeout", "1"], str(tmp_path / "term.log"))
    body = {"prompt": "the river", "temperature": 0, "stream": True, "ignore_eos": True}

    async def stream(client: httpx.AsyncClient, max_tokens: int) -> tuple[list, bool]:
        reasons, done = [], False
        async with client.stream("POST", f"{proc.url}/v1/completions", json={**body, "max_tokens": max_tokens,
                                                                            "min_tokens": max_tokens}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    choices = json.loads(line[6:])["choices"]
                    reasons += [c["finish_reason"] for c in choices if c["finish_reason"]]
        return reasons, done

    async def run():
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.ensure_future(stream(client, 4000 if i % 4 else 4)) for i in range(16)]
            await asyncio.wait_for(asyncio.gather(*tasks[0::4]), 60)  # the short ones finish first
            proc.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            await asyncio.sleep(0.2)
            try:
                late = (await client.post(f"{proc.url}/v1/completions", json={"prompt": "hi"})).status_code
            except httpx.TransportError:
                late = "refused"
            return await asyncio.gather(*tasks), late, sent

    try:
        results, late, sent = asyncio.run(run())
        rc = proc.proc.wait(timeout=30)
        exited_after = time.monotonic() - sent
    finally:
        proc.stop()  # a no-op once it has exited
    log = proc.log()
    assert rc == 0 and "Traceback" not in log, (rc, log[-4000:])
    assert exited_after < 15
    assert late in (503, "refused")
    assert all(done and len(reasons) == 1 for reasons, done in results), results
    reasons = [r[0] for r, _ in results]
    assert reasons[0::4] == ["length"] * 4
    assert set(reasons) == {"length", "abort"}
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _parent(p) == proc.proc.pid]


def _parent(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_model_that_fails_to_load_exits_nonzero(tiny_model_dir, tmp_path):
    """A server whose model cannot load must exit with an error, not answer 503 forever."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="exited with 1") as e:
        ServerProcess(["--model", str(broken)], str(tmp_path / "broken.log"), ready_timeout=120)
    assert "error: the engine failed" in str(e.value)


def test_a_missing_model_path_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanovllm", "serve", "--model", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


# ---- the engine process ---------------------------------------------------------------------------
def _engine_pid(server_pid: int) -> int:
    """The server's engine process (its other child is multiprocessing's resource tracker)."""
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _parent(pid) == server_pid:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    return int(pid)
    raise AssertionError("the server has no engine process")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_engine_process_death_fails_requests_instead_of_hanging(tmp_path):
    """SIGKILL of the engine process mid-request: a stream ends with a 500 error event and [DONE], a
    non-streamed request gets a 500, /health says 503, and a new request gets a 500 at once."""
    model = make_tiny_model_dir(tmp_path, max_position_embeddings=4096)
    proc = ServerProcess(["--model", model, "--max-model-len", "4096", "--kv-cache-memory-gb", "0.25"],
                         str(tmp_path / "dead.log"))
    url = f"{proc.url}/v1/completions"
    body = {"prompt": "the river", "max_tokens": 4000, "min_tokens": 4000, "ignore_eos": True}

    async def run():
        started = asyncio.Event()

        async def streamed(client: httpx.AsyncClient) -> list[str]:
            events = []
            async with client.stream("POST", url, json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()
            return events

        async with httpx.AsyncClient(timeout=30) as client:
            tasks = [asyncio.ensure_future(streamed(client)), asyncio.ensure_future(client.post(url, json=body))]
            await asyncio.wait_for(started.wait(), 30)
            os.kill(_engine_pid(proc.proc.pid), signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 30)

    try:
        events, response = asyncio.run(run())
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 500, events[-3:]
        assert response.status_code == 500 and response.json()["error"]["code"] == 500
        assert httpx.get(f"{proc.url}/health").status_code == 503
        assert proc.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 500
    finally:
        rc = proc.stop()
    log = proc.log()
    assert rc == 1 and "the engine has failed: the engine process exited" in log, (rc, log[-4000:])
    assert "Traceback" not in log, log[-4000:]


def test_the_engine_process_dies_with_the_server(tiny_model_dir, tmp_path):
    """A server killed outright (SIGKILL: no drain, no clean-up) leaves no engine process behind."""
    proc = ServerProcess(["--model", tiny_model_dir, *SMALL_KV], str(tmp_path / "kill.log"))
    engine_pid = _engine_pid(proc.proc.pid)
    proc.proc.kill()
    proc.stop()
    deadline = time.monotonic() + 5
    while _alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(engine_pid)
