"""Differential tests of async scheduling: seeded random schedules of add / abort / step events run on an
engine with and without async scheduling must give the same tokens, texts, finish and stop reasons,
logprobs (up to fp32 rounding: a seq may join a batch a step later), streamed deltas and usage, with every
block back at the end and no step left in flight."""
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from factories import create_seqs, make_scheduler, step
from test_async_scheduling import count_overlapped_launches
from tiny_models import make_tiny_model
from tiny_tokenizer import save_tiny_tokenizer

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import PLACEHOLDER, Sequence

SHARED = [list(range(300, 340)), [(i * 53) % 900 + 20 for i in range(23)]]  # prefixes shared by prompts
ENGINES = {  # small caches (preemption), small budgets (chunked prefill), a short max_model_len
    "preempt": dict(num_kvcache_blocks=20, block_size=4, max_num_seqs=6),
    "chunked": dict(max_num_batched_tokens=9, block_size=8, max_num_seqs=5),
    "short": dict(max_model_len=56, block_size=4, num_kvcache_blocks=40, max_num_seqs=8),
    "whole": dict(enable_chunked_prefill=False, enable_prefix_caching=False, max_num_batched_tokens=48,
                  block_size=4, num_kvcache_blocks=26),  # prompts wait until they fit whole
    "budget": dict(max_num_batched_tokens=4, max_num_seqs=8, block_size=4, num_kvcache_blocks=30),
}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """The model folder and what random requests stop on: an extra EOS id, stop ids and stop strings that
    the tiny model's greedy outputs contain often, so they end seqs part-way (which async scheduling cannot
    know ahead)."""
    folder = make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))
    save_tiny_tokenizer(folder)
    llm = LLM(folder, dtype="float32")
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 990) for _ in range(rng.randint(1, 12))] for _ in range(12)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    common = [t for t, _ in Counter(t for o in outs for t in set(o.outputs[0].token_ids)).most_common(12)]
    texts = [o.outputs[0].text for o in outs]
    grams = Counter(g for t in texts for g in dict.fromkeys(t[i:i + n] for n in (1, 2) for i in range(len(t) - n + 1)))
    # Sorted, not in set order: that changes with the process's string hash seed, and so would the workload.
    stop_strs = sorted(g for g, c in grams.items() if 2 <= c <= 5 and g.strip() and "\ufffd" not in g)
    return folder, common[2], common[3:], stop_strs


@dataclass
class Schedule:
    adds: dict[int, list[tuple[str, list[int], SamplingParams, bool]]]  # step -> (id, prompt, params, stream)
    aborts: dict[str, int]  # request id -> abort once its first seq has this many tokens


@dataclass
class Run:
    finals: dict[str, object] = field(default_factory=dict)  # request id -> its final RequestOutput
    streamed: dict[str, list[list[tuple[str, list[int]]]]] = field(default_factory=dict)  # per seq deltas
    aborted: dict[str, list[list[int]]] = field(default_factory=dict)  # request id -> seqs' tokens then
    stats: dict = field(default_factory=dict)


def random_params(rng: random.Random, vocab) -> SamplingParams:
    _, _, tokens, stop_strs = vocab
    kw = dict(max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.3)
    if rng.random() < 0.5:
        kw.update(temperature=0)
    else:  # seeded: the same draws whatever batch the seq is in
        kw.update(temperature=rng.choice([0.7, 1.0, 1.3]), seed=rng.randrange(1000),
                  top_k=rng.choice([-1, 5, 50]), top_p=rng.choice([1.0, 0.9]))
    if rng.random() < 0.3:
        kw.update(n=rng.randint(2, 3))
    if rng.random() < 0.5:
        kw.update(stop=rng.sample(stop_strs, rng.randint(1, 2)), include_stop_str_in_output=rng.random() < 0.3)
    if rng.random() < 0.4:
        kw.update(stop_token_ids=rng.sample(tokens, 2))
    if rng.random() < 0.3:
        kw.update(min_tokens=rng.randint(0, kw["max_tokens"]))
    if rng.random() < 0.3:
        kw.update(logprobs=rng.randint(0, 3))
    if rng.random() < 0.1:
        kw.update(prompt_logprobs=1)
    if rng.random() < 0.08:  # the sampler reads the tokens, the last one from the step in flight
        kw.update(repetition_penalty=1.2)
    return SamplingParams(**kw)


def random_schedule(seed: int, vocab, num_requests: int = 12) -> Schedule:
    rng = random.Random(seed)
    adds: dict[int, list] = {}
    aborts = {}
    for i in range(num_requests):
        rid = f"r{i}"
        suffix = [rng.randrange(3, 990) for _ in range(rng.randint(1, 12))]
        prompt = rng.choice(SHARED)[:rng.choice([8, 16, 23])] + suffix if rng.random() < 0.6 else suffix
        step = 0 if rng.random() < 0.5 else rng.randint(1, 40)
        adds.setdefault(step, []).append((rid, prompt, random_params(rng, vocab), rng.random() < 0.7))
        if rng.random() < 0.2:
            aborts[rid] = rng.randint(0, 12)
    return Schedule(adds, aborts)


def make_llm(vocab, async_scheduling: bool, graphs: bool | str, monkeypatch, **engine_args) -> LLM:
    """graphs: the CUDA-graph code paths, uncaptured on CPU: True the decode graphs, "prefill" also the
    prefill graphs."""
    folder, eos, _, _ = vocab
    monkeypatch.setenv("NANOVLLM_UNCAPTURED_GRAPHS", "1" if graphs else "0")
    monkeypatch.setenv("NANOVLLM_PREFILL_GRAPHS", "1" if graphs == "prefill" else "0")
    llm = LLM(folder, dtype="float32", async_scheduling=async_scheduling, **engine_args)
    llm.engine.eos_token_ids.add(eos)  # a token the model really makes, so EOS ends seqs part-way
    llm.engine.model_runner.eos_token_ids.append(eos)
    return llm


def play(llm: LLM, schedule: Schedule) -> Run:
    """Runs the schedule's events step by step; checks every output on the way."""
    engine, run = llm.engine, Run()
    last_add, step = max(schedule.adds), 0
    while step <= last_add or engine.has_unfinished_requests():
        for rid, prompt, params, stream in schedule.adds.get(step, []):
            engine.add_request(rid, prompt, params, stream=stream)
            run.streamed[rid] = [[] for _ in range(params.n)]
        for rid, k in schedule.aborts.items():
            request = engine.requests.get(rid)
            if request is not None and request.seqs[0].num_completion_tokens >= k:
                run.aborted[rid] = [s.completion_token_ids for s in request.seqs]
                engine.abort_request(rid)
        for output in engine.step():
            rid = output.request_id
            assert rid not in run.aborted and rid not in run.finals, f"output for {rid} after its end"
            for c in output.outputs:
                assert PLACEHOLDER not in c.token_ids and PLACEHOLDER not in c.delta_token_ids
                assert c.delta_token_ids == c.token_ids[len(c.token_ids) - len(c.delta_token_ids):]
                run.streamed[rid][c.index].append((c.delta_text, c.delta_token_ids))
            if output.finished:
                run.finals[rid] = output
        step += 1
        assert step < 1000, "the engine does not finish"
    run.stats = engine.stats()
    assert engine._inflight is None, "a step is left in flight with nothing to run"
    assert run.stats["num_free_blocks"] == run.stats["num_blocks"], "blocks leaked"
    assert run.stats["num_running"] == run.stats["num_waiting"] == 0
    return run


def check_streams(run: Run, schedule: Schedule) -> None:
    """Streamed deltas join to the final text and tokens; a stream=False request gets one output only."""
    streams = {rid: s for adds in schedule.adds.values() for rid, _, _, s in adds}
    for rid, output in run.finals.items():
        for c in output.outputs:
            deltas = run.streamed[rid][c.index]
            assert "".join(t for t, _ in deltas) == c.text
            assert [i for _, ids in deltas for i in ids] == c.token_ids
            if not streams[rid]:
                assert len(deltas) == 1


def check_usage(run: Run, schedule: Schedule) -> None:
    """The engine's counters equal what its outputs show (aborted requests up to their abort)."""
    params = {rid: (p, sp) for adds in schedule.adds.values() for rid, p, sp, _ in adds}
    generated = sum(len(c.token_ids) for o in run.finals.values() for c in o.outputs)
    generated += sum(len(t) for seqs in run.aborted.values() for t in seqs)
    assert run.stats["generation_tokens"] == generated
    prompts = sum(len(params[rid][0]) for rid in run.finals)
    prompts += sum(len(params[rid][0]) for rid, seqs in run.aborted.items() if any(seqs))
    assert run.stats["prompt_tokens"] == prompts


def assert_close_logprobs(x: list | None, y: list | None) -> None:
    assert (x is None) == (y is None)
    for dx, dy in zip(x or [], y or [], strict=True):
        assert (dx is None) == (dy is None)
        if dx is not None:
            assert dx.keys() == dy.keys()
            torch.testing.assert_close([v.logprob for v in dx.values()], [v.logprob for v in dy.values()],
                                       atol=1e-4, rtol=0)


def assert_same_runs(sync: Run, overlap: Run) -> None:
    assert sync.finals.keys() | sync.aborted.keys() == overlap.finals.keys() | overlap.aborted.keys()
    for rid in sync.finals.keys() & overlap.finals.keys():
        s, o = sync.finals[rid], overlap.finals[rid]
        assert [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] == \
            [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in s.outputs], rid
        for co, cs in zip(o.outputs, s.outputs):
            assert_close_logprobs(co.logprobs, cs.logprobs)
        assert_close_logprobs(o.prompt_logprobs, s.prompt_logprobs)
    # Aborted once the first seq had k tokens. With n = 1 that is the same step in both runs. With n > 1 the
    # siblings, preempted or admitted at other steps, may be further along in one run: there the others may
    # have finished before the first reached k. Either way both runs made prefixes of the same tokens.
    for rid in sync.aborted.keys() | overlap.aborted.keys():
        runs = [r.aborted.get(rid) or [c.token_ids for c in r.finals[rid].outputs] for r in (sync, overlap)]
        if len(runs[0]) == 1 or rid in sync.aborted.keys() & overlap.aborted.keys():
            assert len(runs[0][0]) == len(runs[1][0]), rid
        for a, b in zip(*runs, strict=True):
            n = min(len(a), len(b))
            assert a[:n] == b[:n], rid


@pytest.mark.parametrize("graphs", [False, True, "prefill"], ids=["eager", "graphs", "prefill-graphs"])
@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("seed", [0, 1])
def test_random_schedules_give_the_same_outputs(vocab, engine, graphs, seed, monkeypatch):
    schedule = random_schedule(seed * 10 + len(engine) + (graphs is True) + 2 * (graphs == "prefill"), vocab)
    runs = {}
    for async_scheduling in (False, True):
        llm = make_llm(vocab, async_scheduling, graphs, monkeypatch, **engine)
        overlapped = count_overlapped_launches(llm)
        runs[async_scheduling] = run = play(llm, schedule)
        check_streams(run, schedule)
        check_usage(run, schedule)
        assert (overlapped[0] > 0) == async_scheduling
    assert_same_runs(runs[False], runs[True])


def test_no_step_is_left_in_flight_once_every_request_has_ended(vocab, monkeypatch):
    """A seq that stops (a stop id) at step n is in step n+1 already, and an aborted one in the step in
    flight: once no request is left, no step may be left running either (it would delay the next request)."""
    llm = make_llm(vocab, True, False, monkeypatch)
    engine, prompt = llm.engine, [5, 17, 300, 42, 9]
    tokens = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop = tokens[6]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop])
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (tokens[:tokens.index(stop) + 1], "stop")
    assert engine._inflight is None
    engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    while engine._inflight is None or not engine.requests["a"].seqs[0].num_completion_tokens:
        engine.step()
    engine.abort_request("a")
    assert engine._inflight is None and not engine.has_unfinished_requests()
    assert engine.stats()["num_free_blocks"] == engine.stats()["num_blocks"]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_engine_is_usable_after_a_step_raises(vocab, async_scheduling, monkeypatch):
    """An exception in a step (here the 5th launch or run) reaches generate(), which aborts its requests;
    the next generate() gives what a fresh engine gives, and every block comes back."""
    prompts = [[5, 17, 300, 42, 9], [7] * 3, list(range(100, 117))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = make_llm(vocab, async_scheduling, False, monkeypatch).generate(prompts, params, use_tqdm=False)
    llm = make_llm(vocab, async_scheduling, False, monkeypatch)
    runner = llm.engine.model_runner
    name = "launch" if async_scheduling else "run"
    original, calls = getattr(runner, name), [0]

    def failing(*args):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("injected")
        return original(*args)
    monkeypatch.setattr(runner, name, failing)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(prompts, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    stats = llm.engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and llm.engine._inflight is None


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_blocks_filled_by_decodes_are_shared_as_in_sync(vocab, graphs, monkeypatch):
    """Under async scheduling a decode block fills with a placeholder and is hashed once the real id is
    back. A prompt that repeats a running seq's prompt and output must hit exactly the blocks it hits
    without async scheduling, and make the same tokens."""
    prompt = [5, 17, 300, 42, 9]
    results = []
    for async_scheduling in (False, True):
        engine = make_llm(vocab, async_scheduling, graphs, monkeypatch, block_size=4,
                          num_kvcache_blocks=64).engine
        engine.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        engine.add_request("b", prompt, SamplingParams(n=2, temperature=0.9, seed=4, max_tokens=40,
                                                       ignore_eos=True))
        finals, step = {}, 0
        while engine.has_unfinished_requests():
            if step == 25:  # a's first 17 tokens end a block at prompt + 15; b's second seq's 19 mid-block
                for rid, seq, n in (("c", engine.requests["a"].seqs[0], 17), ("d", engine.requests["b"].seqs[1], 19)):
                    engine.add_request(rid, prompt + seq.completion_token_ids[:n],
                                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
            finals.update((o.request_id, o) for o in engine.step() if o.finished)
            step += 1
        results.append({rid: (o.num_cached_tokens, [c.token_ids for c in o.outputs]) for rid, o in finals.items()})
    sync, overlap = results
    assert overlap == sync and sync["c"][0] == sync["d"][0] == 20


def test_overlapped_steps_admit_prompts_and_a_waiting_seq_without_room_does_not_stop_the_pipeline():
    """Step n+1 is scheduled while step n runs as a normal step would pick it: a prompt that fits joins it as
    a prefill. Under load the queue is rarely empty: a head that cannot be admitted (no blocks) must not
    drain the pipeline (it once did: no step overlapped while a prompt waited for memory)."""
    s = make_scheduler(num_blocks=5, block_size=4, max_num_seqs=8)
    running = create_seqs(num=2, prompt_len=5)  # 2 blocks each, placeholders included: 1 block left
    for seq in running:
        s.add(seq)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in running):
        step(s)
    batch = s.schedule()
    assert s.can_overlap(batch)
    s.advance(batch)
    (fits,) = create_seqs(prompt_len=3, seed=1)
    s.add(fits)
    overlapped = s.schedule_overlapped()
    assert overlapped.seqs == running + [fits] and overlapped.num_new_tokens == [1, 1, 3]
    s.resolve(batch, {seq.seq_id: 8 for seq in running})  # step n's ids are back
    s.advance(overlapped)
    (too_big,) = create_seqs(prompt_len=6, seed=2)  # needs 2 blocks, and none is left
    s.add(too_big)
    overlapped = s.schedule_overlapped()
    assert overlapped is not None and overlapped.seqs == running + [fits] and list(s.waiting) == [too_big]


def test_overlapped_steps_hold_prefill_chunks_but_not_seqs_whose_tokens_the_host_needs():
    """A chunked prompt's chunks follow one another without a drain; a prompt that asks for prompt logprobs
    (which the synchronous run computes) is admitted only by a synchronous step, and no prompt behind it
    overtakes it."""
    s = make_scheduler(block_size=4, max_num_batched_tokens=6)
    (long,) = create_seqs(prompt_len=10)
    s.add(long)
    first = s.schedule()
    assert first.num_new_tokens == [6] and s.can_overlap(first)
    s.advance(first)  # no placeholder: the chunk ends mid-prompt
    second = s.schedule_overlapped()
    assert second.seqs == [long] and second.num_new_tokens == [4]
    s.resolve(first, {})  # nothing was sampled there
    s.advance(second)  # the prompt is done: its first token is a placeholder
    (plain,) = create_seqs(prompt_len=3, seed=1)
    logprobs = Sequence([5, 6, 7], SamplingParams(prompt_logprobs=1), request_id="plp")
    for seq in (plain, logprobs):
        s.add(seq)
    third = s.schedule_overlapped()  # the decode and the plain prompt; not the prompt behind it
    assert third.seqs == [long, plain] and third.num_new_tokens == [1, 3] and list(s.waiting) == [logprobs]
    s.resolve(second, {long.seq_id: 9})
    s.advance(third)
    assert s.schedule_overlapped() is None  # the head needs the host and fits: drain
    s.resolve(third, {long.seq_id: 9, plain.seq_id: 9})
    batch = s.schedule()
    assert batch.seqs == [long, plain, logprobs] and not s.can_overlap(batch)  # a synchronous step
