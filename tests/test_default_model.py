"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32) against transformers
loading the same file, through the `LLM` API and the `nanovllm` command."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import default_gguf

from nanovllm import LLM, SamplingParams

PROMPTS = ["The three primary colors are", "def fibonacci(n):", "Once upon a time, in a small village,"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(default_gguf())


def test_answers_the_capital_of_france(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop" and out.text == "The capital of France is Paris."


def test_greedy_tokens_equal_transformers(llm, hf_smollm):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        ids = llm.tokenizer.encode(prompt)
        assert ids == output.prompt_token_ids
        with torch.no_grad():
            ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
        assert output.outputs[0].token_ids == ref[0, len(ids):].tolist()
        assert output.outputs[0].text == llm.tokenizer.decode(ref[0, len(ids):].tolist())


def test_stop_strings_cut_exactly(llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0].outputs[0].text
    stop = full[17:23]  # a piece that spans tokens, somewhere in the middle
    assert stop.strip() and full.index(stop) == 17
    for include in (False, True):
        p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop, "never appears"],
                           include_stop_str_in_output=include)
        out = llm.generate([PROMPTS[2]], p, use_tqdm=False)[0].outputs[0]
        assert out.text == full[:17] + (stop if include else "")
        assert out.finish_reason == "stop" and out.stop_reason == stop
    streamed = "".join(o.outputs[0].delta_text for o in llm.stream([PROMPTS[2]], SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])))
    assert streamed == full[:17]


def test_chat_streams_multibyte_text_and_penalties_change_it(llm):
    messages = [{"role": "user", "content": "Write the word 'café' and a smiley emoji."}]
    prompt = llm.apply_chat_template(messages)
    params = SamplingParams(temperature=0, max_tokens=24)
    deltas = [o.outputs[0].delta_text for o in llm.stream([prompt], params)]
    final = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    assert "".join(deltas) == final and "\ufffd" not in final
    penalized = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5, frequency_penalty=1.0)
    assert llm.generate([prompt], penalized, use_tqdm=False)[0].outputs[0].text != final


def test_truncated_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    with open(default_gguf(), "rb") as f:
        bad.write_bytes(f.read(5_000_000))
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(str(bad))


def _cli(*args, input=None, timeout=240):
    exe = shutil.which("nanovllm") or sys.executable
    cmd = [exe, *args] if exe.endswith("nanovllm") else [exe, "-m", "nanovllm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout,
                          env={**os.environ, "TQDM_DISABLE": "1"})


def test_cli_generate_and_chat():
    out = _cli("generate", "--chat", "What is the capital of France?", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    out = _cli("chat", "--max-tokens", "16", input="What is the capital of France?\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_help_and_errors():
    out = _cli("generate", "--help")
    assert out.returncode == 0 and "--top-p" in out.stdout and "--model" in out.stdout
    out = _cli("generate", "hi", "--temperature", "-1")
    assert out.returncode == 2 and "temperature" in out.stderr and "Traceback" not in out.stderr
    out = _cli("generate", "hi", "--model", "/no/such/model")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_top_k_top_p_kernels_on_the_real_models_logits(hf_smollm, hf_smollm_tokenizer):
    """The FILTER graphs' thresholds (kernels/top_k_top_p.py) on the real model's logits at every position of a
    text, rounded to bf16: they keep exactly what filter_logits keeps, and where transformers' warpers keep
    something else it is only ties of the last kept value, which they split and we keep together."""
    from transformers.generation import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from nanovllm.kernels import top_k_top_p
    from nanovllm.kernels.sample import Keep
    from nanovllm.layers.sampler import filter_logits
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = hf_smollm_tokenizer(PROMPTS[2] + " there lived an old clockmaker who", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = hf_smollm(ids).logits[0].to(device=device, dtype=torch.bfloat16)  # (T, V)
    T, V = logits.shape
    ties = 0
    for temperature, k, p, min_p in [(0.6, 20, 0.95, 0.0), (0.8, V, 0.9, 0.0), (1.0, 50, 1.0, 0.05)]:
        settings = [torch.full((T,), float(v), device=device) for v in (temperature, k, p, min_p)]
        ws = top_k_top_p.FilterWorkspace.make(T, V, device)
        top_k_top_p.thresholds(logits, *settings[:3], ws)
        kept = Keep(ws.keep, ws.row_max, settings[3], ws.hist).mask_ref(logits, settings[0])
        assert torch.equal(kept, filter_logits(logits, *settings).isfinite())
        warpers = [TemperatureLogitsWarper(temperature), TopKLogitsWarper(k) if k < V else None,
                   TopPLogitsWarper(p) if p < 1 else None, MinPLogitsWarper(min_p) if min_p else None]
        scores = logits.float().cpu()
        for warper in filter(None, warpers):
            scores = warper(ids, scores)
        hf = scores.isfinite().to(device)
        lowest_kept = logits.float().masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)
        assert not (hf & ~kept).any() and (logits.float() == lowest_kept)[kept & ~hf].all()
        ties += int((kept != hf).any(dim=-1).sum())
    assert ties < T  # ties at the boundary are the exception
