"""End to end on tiny random checkpoints: nanovllm's greedy tokens and logprobs against transformers'."""
import gc
import weakref

import pytest
import torch
from tiny_models import make_tiny_hf_model, make_tiny_model
from tiny_tokenizer import save_tiny_tokenizer

from nanovllm import LLM, SamplingParams

ARCHS = [("qwen3", {}), ("qwen2", {}), ("llama", {"tie_word_embeddings": True}), ("llama3", {})]
NEW_TOKENS = 32
PROMPTS = [[5, 17, 300, 42, 9], list(range(100, 117)), [7] * 3, [(i * 37) % 990 + 3 for i in range(33)]]


def greedy(max_tokens=NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module", params=ARCHS, ids=[a for a, _ in ARCHS])
def tiny(request, tmp_path_factory):
    """Every architecture: (folder, HF model, HF greedy tokens and per-step logprobs for each prompt)."""
    return build_tiny(*request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """One architecture, for the tests of scheduling and sampling that do not depend on it."""
    return build_tiny("qwen3", {}, tmp_path_factory)


def build_tiny(arch: str, overrides: dict, tmp_path_factory):
    folder = make_tiny_model(arch, tmp_path_factory.mktemp(arch), **overrides)
    save_tiny_tokenizer(folder)
    hf = make_tiny_hf_model(arch, **overrides)
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, output_logits=True, return_dict_in_generate=True,
                              pad_token_id=0, eos_token_id=None)
            tokens = out.sequences[0, len(prompt):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
            expected.append((tokens, logprobs))
    return folder, hf, expected


def test_greedy_tokens_and_logprobs_match_transformers(tiny):
    folder, _, expected = tiny
    llm = LLM(folder)
    outputs = llm.generate(PROMPTS, greedy(logprobs=2), use_tqdm=False)
    for output, (tokens, logprobs) in zip(outputs, expected):
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        ours = [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(logprobs), atol=1e-4, rtol=0)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("engine_args", [
    dict(num_kvcache_blocks=10, max_num_seqs=4),  # 160 slots for 4 seqs of up to 65 tokens: preemption
    dict(max_num_batched_tokens=7),  # chunked prefill, mixed with decodes
    dict(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=64),
    dict(block_size=4, max_num_seqs=1),  # one at a time
], ids=["preemption", "chunked", "plain", "one-by-one"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_same_greedy_tokens_under_scheduling_pressure(qwen3, engine_args, async_scheduling):
    folder, _, expected = qwen3
    llm = LLM(folder, async_scheduling=async_scheduling, **engine_args)
    outputs = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [tokens for tokens, _ in expected]
    stats = llm.engine.stats()
    if "num_kvcache_blocks" in engine_args:
        assert stats["num_preemptions"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]  # nothing leaked


def test_each_request_alone_equals_the_batch(qwen3):
    folder, _, expected = qwen3
    llm = LLM(folder)
    for prompt, (tokens, _) in zip(PROMPTS, expected):
        assert llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0].token_ids == tokens


def test_prefix_cache_hits_give_the_same_tokens(tiny):
    folder, hf, _ = tiny
    shared = list(range(200, 240))  # 40 tokens: 2 full blocks of 16 shared
    prompts = [shared + [5, 6], shared + [7], shared + [8, 9, 10]]
    llm = LLM(folder)
    first = llm.generate(prompts[:1], greedy(), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert all(o.num_cached_tokens == 32 for o in outputs)
    assert llm.engine.stats()["prefix_hits"] >= 3 * 32
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
            assert output.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_prompt_logprobs_match_transformers(tiny):
    folder, hf, _ = tiny
    prompt = PROMPTS[3]
    llm = LLM(folder, max_num_batched_tokens=10)  # the prompt is prefilled in 4 chunks
    out = llm.generate([prompt], greedy(max_tokens=1, prompt_logprobs=3), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)  # (L, V)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        top = ref[pos - 1].topk(3).indices.tolist()
        assert all(t in entry for t in top)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_seeded_sampling_reproduces_whatever_the_batch(qwen3, async_scheduling):
    folder, _, _ = qwen3
    llm = LLM(folder, async_scheduling=async_scheduling)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate(PROMPTS[1:3] + [PROMPTS[0]], [others, others, params], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_seeded_sampling_is_the_same_in_graph_and_eager_steps_and_after_preemption(qwen3, monkeypatch):
    """A seeded row draws by its seed and position, not a generator's state: its tokens are the same whether
    the decode graphs' code (uncaptured on CPU) or the Sampler draws them, and after a preemption recomputes
    it, with every filter and both paths (a repetition penalty takes the Sampler in every step)."""
    folder, _, _ = qwen3
    params = [SamplingParams(n=2, temperature=1.0, top_k=40, top_p=0.9, min_p=0.02, seed=5, max_tokens=24,
                             ignore_eos=True),
              SamplingParams(temperature=0.8, seed=6, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=1.2, repetition_penalty=1.3, seed=7, max_tokens=24, ignore_eos=True)]
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    runs = []
    for graphs, engine in [("0", {}), ("1", {}), ("1", dict(num_kvcache_blocks=14, block_size=4, max_num_seqs=8))]:
        monkeypatch.setenv("NANOVLLM_UNCAPTURED_GRAPHS", graphs)
        llm = LLM(folder, **engine)
        outs = llm.generate(PROMPTS[:3] + PROMPTS[:3], params + [others] * 3, use_tqdm=False)[:3]
        runs.append([c.token_ids for o in outs for c in o.outputs])
        assert (llm.engine.stats()["num_preemptions"] > 0) == bool(engine)
        assert (llm.engine.model_runner.graphs is not None) == (graphs == "1")
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(t) for t in runs[0]}) == 4


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_n_completions_abort_and_streaming(qwen3, async_scheduling):
    folder, _, expected = qwen3
    llm = LLM(folder, async_scheduling=async_scheduling)
    out = llm.generate([PROMPTS[0]], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8,
                                                    ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # seed + index differ
    deltas: dict[str, list[int]] = {}
    final = {}
    for output in llm.stream(PROMPTS[:2], greedy()):
        deltas.setdefault(output.request_id, []).extend(output.outputs[0].delta_token_ids)
        if output.finished:
            final[output.request_id] = output.outputs[0].token_ids
    assert list(final.values()) == [tokens for tokens, _ in expected[:2]]
    assert all(deltas[r] == final[r] for r in final)
    engine = llm.engine
    engine.add_request("a", PROMPTS[0], greedy())
    engine.add_request("b", PROMPTS[1], greedy())
    engine.step()
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == "b"
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"]


def test_bad_requests_fail_alone(qwen3):
    folder, _, expected = qwen3
    llm = LLM(folder, max_model_len=64)
    engine = llm.engine
    engine.add_request("good", PROMPTS[0], greedy())
    for bad in ("", [], [5, -1], [5, 10**6], [1] * 64, 3.5):
        with pytest.raises(ValueError):
            engine.add_request("bad", bad, greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", PROMPTS[1], greedy())
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outputs] == ["good"]
    assert outputs[0].outputs[0].token_ids == expected[0][0]
    with pytest.raises(ValueError, match="Prompt 1"):
        llm.generate([PROMPTS[0], ""], greedy(), use_tqdm=False)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_stop_token_ids_max_tokens_and_context_limit(qwen3, async_scheduling):
    folder, _, expected = qwen3
    tokens = expected[0][0]
    llm = LLM(folder, max_model_len=len(PROMPTS[0]) + 10, async_scheduling=async_scheduling)
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    out = llm.generate([PROMPTS[0]], greedy(stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    out = llm.generate([PROMPTS[0]], greedy(max_tokens=None), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:10] and out.finish_reason == "length"  # stopped by max_model_len


def test_engine_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="Unknown engine argument"):
        LLM(str(tmp_path), max_num_seq=3)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(str(tmp_path), max_num_seqs=0)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_text_is_the_same_streamed_or_not(qwen3, async_scheduling):
    """generate() detokenizes a finished seq at once, stream() token by token: the same text either way, the
    decode of the output ids (less the stop token id that ended the seq)."""
    folder, _, expected = qwen3
    llm = LLM(folder, async_scheduling=async_scheduling)
    stop_at = expected[0][0][7]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[3]]
    params = [greedy(), greedy(stop_token_ids=[stop_at], skip_special_tokens=False),
              SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=40, ignore_eos=True)]
    final = llm.generate(prompts, params, use_tqdm=False)
    streamed: dict[tuple[str, int], str] = {}
    last = {}
    for output in llm.stream(prompts, params):
        for c in output.outputs:
            streamed[output.request_id, c.index] = streamed.get((output.request_id, c.index), "") + c.delta_text
        last[output.request_id] = output
    assert final[1].outputs[0].finish_reason == "stop" and final[1].outputs[0].token_ids[-1] == stop_at
    for out, (request_id, stream_out) in zip(final, last.items()):
        for c, s in zip(out.outputs, stream_out.outputs, strict=True):
            ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
            assert c.token_ids == s.token_ids and c.finish_reason == s.finish_reason
            assert c.text == s.text == streamed[request_id, c.index] == llm.tokenizer.decode(ids)


def test_engine_freezes_its_heap_and_is_still_freed(qwen3):
    # After start the engine's objects are frozen (model_runner._allocate_kv_cache), so a full collection
    # while serving does not walk them; with the collector off, refcounting alone still frees the engine
    # and its model once the LLM is dropped, so freezing leaks nothing.
    llm = LLM(qwen3[0])
    model = llm.engine.model_runner.model
    assert not any(obj is model for obj in gc.get_objects())  # frozen objects are not among the tracked
    assert llm.generate([PROMPTS[0]], greedy(4), use_tqdm=False)[0].outputs[0].token_ids
    refs = weakref.ref(model), weakref.ref(llm.engine)
    gc.disable()
    try:
        del llm, model
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()
