"""`nanovllm serve` end to end: the real `openai` client against a live server process on 127.0.0.1.

The server runs a tiny random Llama (tests/tiny_models.py) with a small byte-level BPE tokenizer written
here; the oracle is the offline `LLM` on the same folder. The harness (ServerProcess, tiny_model_dir) is
shared with tests/test_server_*.py.
"""
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tiny_tokenizer import save_tiny_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "test-key"
TINY_ARGS = ["--max-model-len", "256", "--max-num-seqs", "256", "--kv-cache-memory-gb", "0.25"]
_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the of and to in is was for on that with as by at from his her an which are this be or had not but "
    "were they all one have has been river mountain engine garden window history number language music "
    "light water city paper system question morning market winter forest hello world"
).split()


# ---- harness ------------------------------------------------------------------------------------
def write_tiny_tokenizer(path: str) -> int:
    """A byte-level BPE (any text encodes), ChatML specials, </s> = 2 as EOS; returns its vocab size."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(50)) for _ in range(200)]
    return save_tiny_tokenizer(path, vocab_size=600, corpus=corpus, bos="<s>", eos="</s>",
                               specials=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"])


def make_tiny_model_dir(tmp_dir, **overrides) -> str:
    from tiny_models import make_tiny_model
    vocab_dir = os.path.join(str(tmp_dir), "tokenizer")
    vocab_size = write_tiny_tokenizer(vocab_dir)
    path = make_tiny_model("llama", tmp_dir, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2,
                           **overrides)
    for name in os.listdir(vocab_dir):
        os.replace(os.path.join(vocab_dir, name), os.path.join(path, name))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`nanovllm serve` in a subprocess on a free loopback port, logging to a file (a full pipe blocks)."""

    def __init__(self, args: list[str], log_path: str, api_key: str | None = None, ready_timeout: float = 240,
                 env: dict | None = None):
        self.port, self.api_key, self.log_path = free_port(), api_key, log_path
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "nanovllm", "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(log_path, "w")  # noqa: SIM115 - open for the life of the process
        # One torch thread: on a small shared CI box, two contended OpenMP threads make a tiny model's
        # step ~50x slower (measured: 250 ms vs 3.5 ms at 16 sequences).
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        self.loading_errors: list[dict] = []  # what /v1/completions answered while /health said 503
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()  # never leave a server behind
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=2).status_code
                if status == 503:
                    r = self.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})
                    if r.status_code != 200:  # else it became ready in between
                        self.loading_errors.append({"status": r.status_code, **r.json()["error"]})
            except httpx.HTTPError:
                status = None
            if status == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0,
                             **kwargs)

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0,
                                  **kwargs)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        if isinstance(body, (bytes, str)):
            return httpx.post(self.url + path, content=body, headers=headers, timeout=60, **kwargs)
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Samples by name, plus `name{label=value}` for labels other than model_name and engine."""
        out = {}
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k not in ("model_name", "engine")}
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
                                if labels else "")
                out[key] = s.value
        return out

    def wait_idle(self, timeout: float = 10) -> dict[str, float]:
        """Polls until no request runs or waits and no KV block is in use; returns the last metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if load(m) == (0, 0, 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop_cleanly(self) -> None:
        """Stops the server and checks it exited as SIGTERM asks: status 0, no traceback in its log."""
        rc = self.stop()
        log = self.log()
        assert rc == 0 and "Traceback" not in log, (rc, log[-4000:])

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def load(metrics: dict[str, float]) -> tuple[float, float, float]:
    """(running, waiting, KV-cache usage): all zero once every request is done and its blocks freed."""
    return (metrics["vllm:num_requests_running"], metrics["vllm:num_requests_waiting"],
            metrics["vllm:kv_cache_usage_perc"])


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    proc = ServerProcess(["--model", tiny_model_dir, "--served-model-name", "tiny", *TINY_ARGS],
                         str(tmp_path_factory.mktemp("log") / "server.log"), api_key=API_KEY)
    yield proc
    proc.stop_cleanly()


def offline_llm(model_dir: str):
    """The offline engine the tiny servers are compared with (their max_model_len and KV budget)."""
    from nanovllm import LLM
    return LLM(model_dir, max_model_len=256, kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return offline_llm(tiny_model_dir)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def prompts(n: int, seed: int = 0, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, words))) for _ in range(n)]


def greedy(llm, prompt, **kwargs):
    return greedy_batch(llm, [prompt], **kwargs)[0]


def greedy_batch(llm, batch: list, **kwargs) -> list:
    from nanovllm import SamplingParams
    with one_thread():
        return llm.generate(batch, SamplingParams(temperature=0.0, **kwargs), use_tqdm=False)


@contextlib.contextmanager
def one_thread():
    """The offline oracle on one torch thread, as the test servers run (see ServerProcess)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE body, "[DONE]" kept as a string."""
    events = []
    for block in response.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- the API against the offline engine ---------------------------------------------------------
def test_models_health_and_readiness(server):
    assert httpx.get(f"{server.url}/health").status_code == 200  # open without the key
    card = server.client().models.list().data[0]
    assert (card.id, card.object, card.model_extra["max_model_len"]) == ("tiny", "model", 256)


def test_completions_greedy_match_offline(client, llm):
    batch = prompts(5, seed=1)
    response = client.completions.create(model="tiny", prompt=batch, max_tokens=12,
                                         temperature=0)
    assert [c.index for c in response.choices] == list(range(5))
    expected = greedy_batch(llm, batch, max_tokens=12)
    assert [c.text for c in response.choices] == [e.outputs[0].text for e in expected]
    assert [c.finish_reason for c in response.choices] == [e.outputs[0].finish_reason for e in expected]
    assert response.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert response.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_token_id_prompts_and_default_max_tokens(client, llm):
    ids = llm.tokenizer.encode("hello world river")
    response = client.completions.create(model="", prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16  # the documented default for /v1/completions
    assert response.choices[0].text == greedy(llm, ids, max_tokens=16, ignore_eos=True).outputs[0].text


def test_chat_greedy_matches_offline(client, llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    response = client.chat.completions.create(model="", messages=messages, max_tokens=10, temperature=0)
    with one_thread():
        expected = llm.chat(messages, _params(max_tokens=10), use_tqdm=False)[0]
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)


def _params(**kwargs):
    from nanovllm import SamplingParams
    return SamplingParams(temperature=0.0, **kwargs)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 7, "n": 2},
                                      {"temperature": 0, "echo": True, "logprobs": 2}])
def test_streamed_text_equals_non_streamed(client, sampling):
    prompt = prompts(1, seed=2)[0]
    full = client.completions.create(model="", prompt=prompt, max_tokens=20, **sampling)
    stream = client.completions.create(model="", prompt=prompt, max_tokens=20, stream=True,
                                       stream_options={"include_usage": True}, **sampling)
    texts, reasons, tokens, usage = {}, {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
            if c.logprobs is not None:
                lp = c.logprobs
                tokens.setdefault(c.index, []).extend(zip(lp.tokens, lp.token_logprobs, lp.text_offset))
    assert texts == {c.index: c.text for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    if "logprobs" in sampling:
        assert full.choices[0].text.startswith(prompt)
        lp = full.choices[0].logprobs
        assert tokens == {0: list(zip(lp.tokens, lp.token_logprobs, lp.text_offset))}
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens == full.usage.completion_tokens


def test_chat_stream_shape(server):
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    response = server.post("/v1/chat/completions", body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] <= 6
    finishes = [c["finish_reason"] for e in events[1:-2] for c in e["choices"]]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) <= {None}
    full = server.post("/v1/chat/completions", {**body, "stream": False, "stream_options": None}).json()
    text = "".join(c["delta"].get("content", "") for e in events[1:-2] for c in e["choices"])
    assert text == full["choices"][0]["message"]["content"]


def test_stop_string_and_stop_reason(client, llm):
    prompt = prompts(1, seed=3)[0]
    text = greedy(llm, prompt, max_tokens=30, ignore_eos=True).outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    response = client.completions.create(model="", prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop
    assert choice.text == text[:text.index(stop)]


def test_logprobs_completions_and_chat(client):
    response = client.completions.create(model="", prompt="hello world", max_tokens=5, temperature=0,
                                         logprobs=3)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == response.choices[0].text
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        # Up to 3 + the sampled token; byte tokens may share a string ("\ufffd"), so maybe fewer keys.
        assert logprob <= 0 and 1 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the top token
    chat = client.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    assert all(bytes(t.bytes).decode("utf-8", "replace") for t in content)


def test_echo_prompt_logprobs_match_offline(server, llm):
    """lm-eval's local-completions loglikelihood: echo + logprobs + max_tokens 1 (and 0)."""
    from nanovllm import SamplingParams
    prompt = "the river and the mountain were in the city"
    with one_thread():
        offline = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1,
                                                        logprobs=1), use_tqdm=False)[0]
    ids = offline.prompt_token_ids
    for max_tokens in (1, 0):
        body = {"prompt": prompt, "max_tokens": max_tokens, "logprobs": 1, "echo": True, "temperature": 0}
        choice = server.post("/v1/completions", body).json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for pos in range(1, len(ids)):
            assert lp["token_logprobs"][pos] == pytest.approx(offline.prompt_logprobs[pos][ids[pos]].logprob,
                                                              abs=1e-4)
            top = offline.prompt_logprobs[pos]
            best = min(top.values(), key=lambda x: x.rank)
            assert lp["top_logprobs"][pos][best.decoded_token] == pytest.approx(best.logprob, abs=1e-4)
        assert choice["text"].startswith(prompt)
        if max_tokens == 0:
            assert choice["text"] == prompt
        else:
            assert choice["text"] == prompt + offline.outputs[0].text


def test_tokenize_detokenize(server, llm):
    tok = server.post("/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    assert tok["tokens"] == llm.tokenizer.encode("hello world")
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 256
    assert server.post("/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": "hello world"}


# ---- bad input: status + error JSON, and the server keeps serving ---------------------------------
LONG = " ".join(["river"] * 300)
BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "hi", ', 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "body.max_tokens"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400, None),
    ("/v1/completions", {"prompt": "hi", "temperature": 3.0}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "n": 100000}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "temperature": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": LONG}, 400, "input_tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["hi"] * 1025}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, 501, "logit_bias"),
    ("/v1/chat/completions", {"messages": []}, 400, "body.messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "input_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 501, None),
    ("/detokenize", {"tokens": [-3]}, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS,
                         ids=[f"{i}-{s}" for i, (_, _, s, _) in enumerate(BAD_REQUESTS)])
def test_bad_request(server, path, body, status, param):
    headers = {"Content-Type": "application/json"}
    response = server.post(path, body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert "/" not in error["message"]  # no file paths leak
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_typed_errors_through_the_openai_client(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="", prompt="hi", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_auth_content_type_and_size_guards(server):
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # scrapers need no key
    assert server.post("/v1/completions", "prompt=hi",
                       headers={"Content-Type": "text/plain"}).status_code == 415
    huge = b'{"prompt": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    response = server.post("/v1/completions", huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_request_head_is_bounded(server):
    """A header of 1 MiB gets a 400 and a closed connection once 16 KiB have come (h11's bound; httptools,
    where installed, has none of its own); 8 KiB of headers are served; so is the next request."""
    def status_line(head: bytes, chunk: int = 4096) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            try:
                for i in range(0, len(head), chunk):
                    s.sendall(head[i:i + chunk])
            except OSError:  # the server closed the connection while the head still came
                pass
            return s.recv(4096).split(b"\r\n", 1)[0]

    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: %s\r\n\r\n"
    assert status_line(request % (b"a" * (1 << 20))) == b"HTTP/1.1 400 Bad Request"
    assert status_line(request % (b"a" * 8192)) == b"HTTP/1.1 200 OK"


# ---- metrics ------------------------------------------------------------------------------------
def test_metrics_exact_counts(server, client):
    """vLLM's test: 10 requests of max_tokens 10 add 10 TTFTs, 90 inter-token gaps, 10 x prompt tokens."""
    prompt_ids = list(range(10, 17))
    before = server.wait_idle()
    for _ in range(10):
        client.completions.create(model="", prompt=prompt_ids, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = server.wait_idle()
    delta = lambda name: after.get(name, 0) - before.get(name, 0)
    assert delta("vllm:time_to_first_token_seconds_count") == 10
    assert delta("vllm:inter_token_latency_seconds_count") == 90
    assert delta("vllm:e2e_request_latency_seconds_count") == 10
    assert delta("vllm:request_time_per_output_token_seconds_count") == 10
    assert delta("vllm:prompt_tokens_total") == 10 * len(prompt_ids)
    assert delta("vllm:generation_tokens_total") == 100
    assert delta("vllm:request_success_total{finished_reason=length}") == 10
    assert delta("vllm:request_generation_tokens_sum") == 100
    assert delta("vllm:prefix_cache_queries_total") > 0  # the same prompt ten times
    assert (after["vllm:num_requests_running"], after["vllm:num_requests_waiting"]) == (0, 0)


# ---- nanovllm bench serve ------------------------------------------------------------------------
@pytest.mark.parametrize("backend,num_clients", [("completions", 1), ("chat", 1), ("completions", 2)])
def test_bench_serve(server, tmp_path, backend, num_clients):
    """Also with two client processes, whose results are merged, and the server's CPU seconds read. /proc
    counts CPU time in 10 ms ticks, and 6 prompts cost the HTTP process 10-20 ms: sometimes no tick at all.
    24 prompts make it several."""
    from nanovllm.cli import main
    out, num = tmp_path / "bench.json", 24
    argv = ["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--backend", backend,
            "--num-prompts", str(num), "--request-rate", "20", "--input-len", "24", "--output-len", "5",
            "--num-clients", str(num_clients), "--server-pid", str(server.proc.pid), "--output-json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["client_cpu_s"] > 0 and r["server_cpu_s"]["http"] > 0 and r["server_cpu_s"]["children"] > 0
    assert (r["completed"], r["failed"], r["model"]) == (num, 0, "tiny")
    assert r["total_output_tokens"] == num * 5  # from the usage chunks: EOS is ignored
    if backend == "completions":
        assert r["total_input_tokens"] == num * 24
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < r[name]["p50"] <= r[name]["p99"]
    assert r["ttft_ms"]["mean"] < r["e2e_ms"]["mean"]
    assert r["output_throughput"] == pytest.approx(num * 5 / r["duration_s"])


# ---- load: 200 streams, half the clients leave ---------------------------------------------------
def test_disconnect_storm_frees_everything(server, llm):
    """200 concurrent requests; the odd ones disconnect after 0.5 s (max_tokens = min_tokens = 200, so
    they cannot finish first; half of them streaming, half not). The others finish with the offline
    text; then nothing runs, waits or holds a KV block, and a new request is served within 5 s."""
    batch = prompts(4, seed=5)
    expected = [o.outputs[0].text for o in greedy_batch(llm, batch, max_tokens=8, ignore_eos=True)]
    client = server.async_client(timeout=120)

    async def one(i: int):
        long = i % 2 == 1
        extra = {"ignore_eos": True, "min_tokens": 200 if long else 0}
        kwargs = {"model": "", "prompt": batch[i % 4], "max_tokens": 200 if long else 8, "temperature": 0,
                  "extra_body": extra}
        if i % 4 == 3:  # a quarter of the leavers wait for a whole (non-streamed) response
            return (await client.completions.create(**kwargs)).choices[0].text
        stream = await client.completions.create(**kwargs, stream=True)
        text = ""
        async with stream:
            async for chunk in stream:
                text += "".join(c.text for c in chunk.choices)
        return text

    async def run():
        tasks = [asyncio.ensure_future(asyncio.wait_for(one(i), 0.5 if i % 2 else 120)) for i in range(200)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    before = server.wait_idle()
    results = asyncio.run(run())
    finished = results[0::2]
    assert all(isinstance(r, asyncio.TimeoutError) for r in results[1::2]), \
        [r for r in results[1::2] if not isinstance(r, asyncio.TimeoutError)][:3]
    assert finished == [expected[i % 4] for i in range(0, 200, 2)]
    m = server.wait_idle(timeout=10)
    assert load(m) == (0, 0, 0)
    # Idle because the leavers were aborted, not because they ran to the end: only the stayers finished.
    success = "vllm:request_success_total{finished_reason=length}"
    assert m[success] - before.get(success, 0) == 100
    generated = m["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    # Fewer tokens than if the leavers had run to the end (how many fewer depends on how loaded the machine
    # is when the disconnects reach the engine; on a quiet one about half).
    assert generated < 100 * 8 + 100 * 200
    start = time.monotonic()
    assert server.client().completions.create(model="", prompt="hi", max_tokens=2).choices[0].text is not None
    assert time.monotonic() - start < 5
