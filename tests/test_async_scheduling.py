"""Async scheduling (step n+1 scheduled and launched before step n's ids are back) gives what the plain
engine gives: the same tokens, text, finish reasons and logprobs, with every block back at the end."""
import argparse
import gc

import pytest
import torch
from tiny_models import FixedLogits, make_tiny_model
from tiny_tokenizer import save_tiny_tokenizer

from nanovllm import LLM, SamplingParams

PROMPTS = [[5, 17, 300, 42, 9], list(range(100, 117)), [7] * 3, [(i * 37) % 990 + 3 for i in range(33)]]
SHARED = list(range(200, 240))  # 2 full blocks of 16 shared by the prefix-hit prompts
ENGINES = {
    "eager": {},
    "graphs": {"graphs": True},  # the CUDA-graph code path, uncaptured on CPU
    "preemption": {"num_kvcache_blocks": 24, "block_size": 4, "max_num_seqs": 6},
    "chunked": {"max_num_batched_tokens": 7},
}
# A fixed KV cache, not 90 % of the device's memory: on a GPU, a test's two engines live side by side.
BLOCKS = 128


def greedy(max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3"))
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    """Greedy tokens and text of PROMPTS[0], from which the stop token, stop string and EOS are picked so
    that they really stop a seq part-way (which async scheduling cannot know ahead)."""
    llm = LLM(folder, dtype="float32", num_kvcache_blocks=BLOCKS)
    out = llm.generate([PROMPTS[0]], greedy(24, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    return out.token_ids, llm.tokenizer


def workload(reference) -> tuple[list, list[SamplingParams], int]:
    tokens, tokenizer = reference
    eos = tokens[9]  # made an EOS id of both engines
    stop_str = next(s for s in (tokenizer.decode([t]) for t in tokens[4:]) if s.strip())
    seeded = dict(temperature=1.0, top_p=0.9, ignore_eos=True)
    requests = [
        (PROMPTS[0], greedy(20, ignore_eos=True, logprobs=2)),
        (PROMPTS[1], SamplingParams(seed=11, max_tokens=20, logprobs=1, **seeded)),
        (PROMPTS[2], greedy(1)),
        (PROMPTS[3], greedy(2)),
        (PROMPTS[1], SamplingParams(n=3, seed=5, max_tokens=14, **seeded)),
        (PROMPTS[0], greedy(20, ignore_eos=True, stop_token_ids=[tokens[6]])),
        (PROMPTS[0], greedy(20, ignore_eos=True, stop=[stop_str])),
        (PROMPTS[0], greedy(20)),  # ends at the EOS
        (PROMPTS[0], greedy(20, min_tokens=12)),  # the EOS is masked until 12 tokens
        (SHARED + [5, 6], greedy(12, ignore_eos=True)),
        (SHARED + [8], greedy(12, ignore_eos=True)),
        (PROMPTS[3], greedy(10, ignore_eos=True, repetition_penalty=1.3)),  # its last id from the device
        (PROMPTS[3], greedy(3, ignore_eos=True, prompt_logprobs=2)),
        (PROMPTS[2], SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True)),  # unseeded: length only
    ]
    return [p for p, _ in requests], [s for _, s in requests], eos


def make_llm(folder, eos: int, async_scheduling: bool, monkeypatch, graphs: bool = False,
             prefill_graphs: bool = False, **engine_args) -> LLM:
    monkeypatch.setenv("NANOVLLM_UNCAPTURED_GRAPHS", "1" if graphs else "0")
    monkeypatch.setenv("NANOVLLM_PREFILL_GRAPHS", "1" if prefill_graphs else "0")
    # float32 on a GPU too: bf16 ties could flip a greedy token when a batch holds other rows.
    engine_args.setdefault("num_kvcache_blocks", BLOCKS)
    llm = LLM(folder, async_scheduling=async_scheduling, dtype="float32", **engine_args)
    llm.engine.eos_token_ids.add(eos)
    llm.engine.model_runner.eos_token_ids.append(eos)
    return llm


def count_overlapped_launches(llm: LLM) -> list[int]:
    """Counts the steps launched while the previous one was still in flight, and (second) those of them
    that hold a prefill chunk of more than one token."""
    runner, count = llm.engine.model_runner, [0, 0]
    launch = runner.launch

    def counted(batch, prev=None):
        count[0] += prev is not None
        count[1] += prev is not None and max(batch.num_new_tokens) > 1
        return launch(batch, prev)
    runner.launch = counted
    return count


def summary(outputs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def assert_same_logprobs(a, b) -> None:
    """Sample logprobs and prompt logprobs, equal up to fp32 rounding (a batch of other rows may round a
    row's matmul differently)."""
    for x, y in zip(a, b, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert (cx.logprobs is None) == (cy.logprobs is None)
            for dx, dy in zip(cx.logprobs or [], cy.logprobs or [], strict=True):
                assert_close_entries(dx, dy)
        for px, py in zip(x.prompt_logprobs or [], y.prompt_logprobs or [], strict=True):
            assert (px is None) == (py is None)
            if px is not None:
                assert_close_entries(px, py)


def assert_close_entries(x: dict, y: dict) -> None:
    assert x.keys() == y.keys() and [v.rank for v in x.values()] == [v.rank for v in y.values()]
    torch.testing.assert_close([v.logprob for v in x.values()], [v.logprob for v in y.values()], atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("engine", ENGINES.values(), ids=ENGINES.keys())
def test_async_scheduling_gives_the_same_outputs(folder, reference, engine, monkeypatch):
    prompts, params, eos = workload(reference)
    results = {}
    for async_scheduling in (False, True):
        llm = make_llm(folder, eos, async_scheduling, monkeypatch, **engine)
        overlapped = count_overlapped_launches(llm)
        first = llm.generate(prompts, params, use_tqdm=False)
        again = llm.generate(prompts[9:11], params[9:11], use_tqdm=False)  # prefix hits on the same engine
        stats = llm.engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"], "blocks leaked"
        if "num_kvcache_blocks" not in engine:  # else the tiny cache may have evicted them
            assert all(o.num_cached_tokens == 32 for o in again)
        assert overlapped[0] > (10 if async_scheduling else -1)
        if async_scheduling and "max_num_batched_tokens" in engine:  # the later chunks of prompts, ahead too
            assert overlapped[1] > 0
        results[async_scheduling] = first + again, stats
    (sync, sync_stats), (overlap, async_stats) = results[False], results[True]
    unseeded = len(prompts) - 1
    assert [len(o.outputs[0].token_ids) for o in (sync[unseeded], overlap[unseeded])] == [9, 9]
    sync, overlap = sync[:unseeded] + sync[unseeded + 1:], overlap[:unseeded] + overlap[unseeded + 1:]
    assert summary(overlap) == summary(sync)
    assert_same_logprobs(overlap, sync)
    finish = {c.finish_reason for o in sync for c in o.outputs}
    stop_reasons = {type(c.stop_reason) for o in sync for c in o.outputs}
    assert finish == {"stop", "length"} and stop_reasons == {type(None), int, str}
    assert [len(c.token_ids) for c in sync[2].outputs + sync[3].outputs] == [1, 2]
    if "num_kvcache_blocks" in engine:
        assert sync_stats["num_preemptions"] > 0 and async_stats["num_preemptions"] > 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefill_graphs_give_the_same_outputs(folder, reference, monkeypatch, async_scheduling):
    """Steps with prompt tokens through the prefill graphs' code path (uncaptured on CPU: tokens padded to
    the bucket, seqs to max_num_seqs, placeholders filled in the static ids) give what eager steps give:
    chunked prompts, prefix hits, decodes riding along, prompt logprobs (which stay eager) included."""
    prompts, params, eos = workload(reference)
    results = []
    for on in (False, True):
        llm = make_llm(folder, eos, async_scheduling, monkeypatch, graphs=True, prefill_graphs=on,
                       max_num_batched_tokens=24, max_num_seqs=4)
        graphs = llm.engine.model_runner.prefill_graphs
        assert (graphs is not None) == on
        buckets = []
        if on:
            run = graphs.run
            monkeypatch.setattr(graphs, "run", lambda bucket: buckets.append(bucket) or run(bucket))
        outputs = llm.generate(prompts, params, use_tqdm=False)
        outputs += llm.generate(prompts[9:11], params[9:11], use_tqdm=False)  # prefix hits
        assert all(o.num_cached_tokens == 32 for o in outputs[-2:])
        assert not on or (len(buckets) >= 5 and set(buckets) == {24})
        results.append(outputs)
    unseeded = len(prompts) - 1
    eager, graphed = (r[:unseeded] + r[unseeded + 1:] for r in results)
    assert summary(graphed) == summary(eager)
    assert_same_logprobs(graphed, eager)


def test_prefill_graph_buckets():
    from nanovllm.engine.prefill_graphs import token_buckets
    assert token_buckets(8192) == [256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 8192]
    assert token_buckets(3000) == [256, 512, 1024, 2048, 3000]
    assert token_buckets(512) == [256, 512] and token_buckets(24) == [24]


def test_steps_past_the_largest_prefill_graph_run_eagerly():
    from nanovllm.engine.prefill_graphs import MAX_TOKENS, PrefillGraphs
    graphs = PrefillGraphs(None, 4 * MAX_TOKENS, 8, 4, 16, torch.device("cpu"), capture=False)
    assert graphs.buckets[-1] == MAX_TOKENS and graphs.input_ids.numel() == MAX_TOKENS
    assert graphs.fits(MAX_TOKENS, 8, 2) and not graphs.fits(MAX_TOKENS + 1, 8, 2)
    assert not graphs.fits(100, 9, 2) and not graphs.fits(8, 8, 1)  # too many seqs; decodes only


def record_replays(graphs, monkeypatch) -> list[tuple]:
    """Every replay of graphs from now on (uncaptured on CPU): (bucket, mode, the temperatures and the
    filters it reads from its input buffers)."""
    seen, replay = [], graphs._replay

    def spy(bs, mode, gather_logits=False, short=False):
        seen.append((bs, mode, graphs.temperatures[:bs].tolist(), graphs.filters[:, :bs].tolist()))
        return replay(bs, mode, gather_logits, short)
    monkeypatch.setattr(graphs, "_replay", spy)
    return seen


def test_sampling_graphs_read_each_rows_temperature(folder, reference, monkeypatch):
    # What a sampling graph reads from its input buffers (uncaptured on CPU here) at each decode step of a
    # batch: a greedy row's temperature 0 and a hot row's own, not zeros nor another step's.
    from nanovllm.engine.cuda_graph import SAMPLE
    llm = make_llm(folder, reference[0][9], True, monkeypatch, graphs=True)
    seen = record_replays(llm.engine.model_runner.graphs, monkeypatch)
    params = [greedy(6, ignore_eos=True), SamplingParams(temperature=0.5, max_tokens=6, ignore_eos=True)]
    llm.generate([PROMPTS[0], PROMPTS[1]], params, use_tqdm=False)
    assert [step[:3] for step in seen] == [(2, SAMPLE, [0.0, 0.5])] * 5  # the first token: the prefill step


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_top_k_top_p_min_p_sample_in_the_filter_graph(folder, reference, monkeypatch, async_scheduling):
    """Unseeded top-k, top-p and min-p steps take the bucket's FILTER graph (uncaptured on CPU here), with
    each row's settings; top-k 1 and a tiny top-p give the greedy tokens. A seeded row filters there too,
    drawing by its own key: its tokens are those it gets alone, beside another row."""
    from nanovllm.engine.cuda_graph import FILTER
    llm = make_llm(folder, reference[0][9], async_scheduling, monkeypatch, graphs=True)
    graphs = llm.engine.model_runner.graphs
    seen = record_replays(graphs, monkeypatch)

    def filtered():
        return [(bs, temps, filters) for bs, mode, temps, filters in seen if mode == FILTER]
    hot = dict(max_tokens=8, ignore_eos=True)
    params = [greedy(8, ignore_eos=True), SamplingParams(temperature=0.8, top_k=1, **hot),
              SamplingParams(temperature=1.5, top_p=1e-6, **hot), SamplingParams(top_k=3, min_p=0.5, **hot)]
    outs = [o.outputs[0].token_ids for o in llm.generate([PROMPTS[0]] * 4, params, use_tqdm=False)]
    assert outs[0] == outs[1] == outs[2] == reference[0][:8]
    assert len(outs[3]) == 8
    V = graphs.vocab_size
    expected = torch.tensor([0.0, 0.8, 1.5, 1.0]).tolist(), torch.tensor(
        [[V, 1, V, 3], [1.0, 1.0, 1e-6, 1.0], [0.0, 0.0, 0.0, 0.5]]).tolist()  # as float32 buffers hold them
    assert len(filtered()) == 7 and all(step == (4, *expected) for step in filtered())  # the first: prefill
    seen.clear()
    seeded = SamplingParams(temperature=1.5, top_p=0.5, seed=3, **hot)
    alone = llm.generate([PROMPTS[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    expected = [1.5], torch.tensor([[V], [0.5], [0.0]]).tolist()
    assert len(filtered()) == 7 and all(step == (1, torch.tensor(expected[0]).tolist(), expected[1])
                                        for step in filtered())
    seen.clear()
    both = [o.outputs[0].token_ids for o in llm.generate([PROMPTS[0]] * 2, [params[1], seeded], use_tqdm=False)]
    assert both == [reference[0][:8], alone]
    expected = [0.8, 1.5], torch.tensor([[1, V], [1.0, 0.5], [0.0, 0.0]]).tolist()
    assert len(filtered()) == 7 and all(step == (2, torch.tensor(expected[0]).tolist(), expected[1])
                                        for step in filtered())


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_logprobs_rows_stay_in_the_graphs(folder, reference, monkeypatch, async_scheduling):
    """A row that needed the Sampler only for its logprobs samples in the graph (uncaptured on CPU here) and
    takes them from the bucket's logprobs step, at the most logprobs such rows ask; a seeded row with more
    logprobs stays there too, and a repetition-penalty row takes the Sampler, on its row alone, and brings
    its own. Tokens and logprobs are the eager engine's."""
    hot = dict(max_tokens=8, ignore_eos=True)
    params = [greedy(8, ignore_eos=True, logprobs=2), SamplingParams(temperature=0.8, top_k=1, logprobs=0, **hot),
              SamplingParams(temperature=1.0, seed=4, logprobs=7, **hot),
              SamplingParams(temperature=1.0, seed=5, repetition_penalty=1.2, logprobs=9, **hot)]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    eager = make_llm(folder, reference[0][9], async_scheduling, monkeypatch).generate(prompts, params,
                                                                                     use_tqdm=False)
    llm = make_llm(folder, reference[0][9], async_scheduling, monkeypatch, graphs=True)
    runner = llm.engine.model_runner
    asked, sampled = [], []
    logprobs, sample = runner.graphs.logprobs, runner._sample_on_device
    monkeypatch.setattr(runner.graphs, "logprobs", lambda ring, k: asked.append((ring.n, k)) or logprobs(ring, k))
    monkeypatch.setattr(runner, "_sample_on_device", lambda seqs, *args: sampled.append(len(seqs)) or sample(
        seqs, *args))
    graphed = llm.generate(prompts, params, use_tqdm=False)
    assert summary(graphed) == summary(eager)
    assert graphed[0].outputs[0].token_ids == graphed[1].outputs[0].token_ids == reference[0][:8]
    assert_same_logprobs(graphed, eager)
    assert asked == [(4, 7)] * 7 and sampled == [4] + [1] * 7  # the first token: the prefill step, eager


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_penalties_take_the_id_in_flight_on_the_device(folder, reference, monkeypatch, graphs):
    """Steps of seqs with penalties overlap too: the Sampler takes the last id, still in flight, from the
    step before on the device, each seq from its own row there (rows shift as a shorter seq ends). Every
    history the Sampler got holds the ids the seq really has; a repetition penalty of 1e4 never lets a seen
    token win; tokens are the synchronous engine's."""
    from nanovllm.layers.sampler import SamplingBatch
    params = [greedy(5, ignore_eos=True), greedy(12, ignore_eos=True, repetition_penalty=1e4),
              greedy(12, ignore_eos=True),
              greedy(12, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=1.1)]
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[3]]
    outs, overlapped, seen = [], None, []
    build = SamplingBatch.build

    def spy(seqs, *args):  # (seq, its ids the Sampler got, the same from the seq's final ids)
        batch = build(seqs, *args)
        for i, seq in enumerate(seqs):
            n, m, p = seq.num_tokens, seq.num_completion_tokens, seq.sampling_params
            if p.repetition_penalty != 1:
                seen.append((seq, batch.seen_ids[i, :n].tolist(), lambda seq=seq, n=n: seq.token_ids[:n]))
            if p.frequency_penalty or p.presence_penalty:
                seen.append((seq, batch.output_ids[i, :m].tolist(),
                             lambda seq=seq, m=m: seq.completion_token_ids[:m]))
        return batch
    monkeypatch.setattr(SamplingBatch, "build", spy)
    for async_scheduling in (False, True):
        llm = make_llm(folder, reference[0][9], async_scheduling, monkeypatch, graphs=graphs)
        overlapped = count_overlapped_launches(llm)
        seen.clear()
        outs.append(summary(llm.generate(prompts, params, use_tqdm=False)))
    assert outs[0] == outs[1] and overlapped[0] >= 10 and len(seen) == 3 * 12
    assert all(ids == final() for _, ids, final in seen)
    tokens = outs[1][1][0][0]
    assert all(t not in PROMPTS[0] + tokens[:i] for i, t in enumerate(tokens))


def test_filter_max_bs_bounds_the_filter_graphs(folder, reference, monkeypatch):
    """NANOVLLM_FILTER_MAX_BS=2: a 2-seq top-k step replays its FILTER graph, a 4-seq one (bucket 4) takes
    the eager Sampler after the greedy graph; both give the greedy tokens at top-k 1."""
    from nanovllm.engine.cuda_graph import FILTER, filter_max_bs
    monkeypatch.setenv("NANOVLLM_FILTER_MAX_BS", "two")
    with pytest.raises(ValueError, match="NANOVLLM_FILTER_MAX_BS"):
        filter_max_bs(8)
    monkeypatch.setenv("NANOVLLM_FILTER_MAX_BS", "2")
    llm = make_llm(folder, reference[0][9], True, monkeypatch, graphs=True)
    graphs = llm.engine.model_runner.graphs
    assert [bs for bs in graphs.batch_sizes if graphs.can_filter(bs)] == [1, 2]
    seen = record_replays(graphs, monkeypatch)
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=6, ignore_eos=True)
    for n in (2, 4):
        seen.clear()
        outs = [o.outputs[0].token_ids for o in llm.generate([PROMPTS[0]] * n, top1, use_tqdm=False)]
        assert all(out == reference[0][:6] for out in outs)
        assert len(seen) == 5 and all(bs == n for bs, *_ in seen)  # the first token: prefill
        assert all((mode == FILTER) == (n == 2) for _, mode, *_ in seen)


def test_streams_and_aborts_in_flight(folder, reference, monkeypatch):
    """Aborting requests whose step is in flight: the others' outputs are unchanged, the aborted ones get
    nothing more, and every block comes back. Streamed deltas join to the final output."""
    prompts, params, eos = workload(reference)
    aborted = ("1", "9")
    finals = {}
    for async_scheduling in (False, True):
        engine = make_llm(folder, eos, async_scheduling, monkeypatch).engine
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, sp)
        deltas, final, steps, gone = {}, {}, 0, ()
        while engine.has_unfinished_requests():
            for output in engine.step():
                assert output.request_id not in gone
                c = output.outputs[0]
                deltas[output.request_id] = deltas.get(output.request_id, []) + c.delta_token_ids
                if output.finished:
                    final[output.request_id] = c.token_ids
            steps += 1
            # Mid-run: once request 11 is done, abort others.
            if not gone and "11" in final and (engine._inflight or not async_scheduling):
                if async_scheduling:  # aborted while their step runs
                    assert {s.request_id for s in engine._inflight.batch.seqs} >= set(aborted)
                assert not any(r in final for r in aborted)
                for request_id in aborted:
                    engine.abort_request(request_id)
                gone = aborted
        assert all(deltas[r] == final[r] for r in final)
        stats = engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"] and stats["num_running"] == 0
        assert len(final.pop(str(len(prompts) - 1))) == 9  # unseeded: its tokens depend on the batches
        finals[async_scheduling] = final
    assert finals[True] == finals[False] and len(finals[True]) == len(prompts) - len(aborted) - 1



@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="TP 2 on a machine with one GPU")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_async_scheduling_under_tensor_parallelism(folder, reference, graphs, monkeypatch):
    """TP 2 with async scheduling (rank 0 sends step n+1's commands, whose input ids are gathered on its
    device, before it reads step n's ids; the worker follows) gives what TP 1 gives in the sync loop. A small
    token budget chunks the prompts, so prefill chunks are launched ahead too."""
    prompts, params, eos = workload(reference)
    budget = dict(max_num_batched_tokens=16)
    sync = make_llm(folder, eos, False, monkeypatch, **budget).generate(prompts, params, use_tqdm=False)
    with make_llm(folder, eos, True, monkeypatch, graphs=graphs, tensor_parallel_size=2, **budget) as llm:
        assert llm.engine.async_scheduling and (llm.engine.model_runner.graphs is not None) == graphs
        overlapped = count_overlapped_launches(llm)
        overlap = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.stats()
    assert overlapped[0] > 5 and overlapped[1] > 0 and stats["num_free_blocks"] == stats["num_blocks"]
    unseeded = len(prompts) - 1  # its tokens depend on the batches
    assert len(overlap[unseeded].outputs[0].token_ids) == 9
    sync, overlap = sync[:unseeded], overlap[:unseeded]
    assert summary(overlap) == summary(sync)
    assert_same_logprobs(overlap, sync)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_async_scheduling_on_cuda_graphs(tmp_path):
    """The GPU path (captured graphs, pinned read-back, bf16 Qwen3-0.6B with random weights): each step's
    batch is the same with and without async scheduling here (no stop that is not known ahead), so the
    tokens and logprobs must be identical, not merely close."""
    import os
    import shutil
    config = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "configs", "qwen3-0.6b.json")
    shutil.copy(config, tmp_path / "config.json")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 10000, (int(n),), generator=gen).tolist() for n in (5, 40, 130, 300, 17, 90, 64)]
    params = [SamplingParams(temperature=0, max_tokens=16 + 9 * i, ignore_eos=True) for i in range(4)]
    params += [SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=30, ignore_eos=True, logprobs=2),
               SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=30,
                              ignore_eos=True),  # its last id from the step in flight
               SamplingParams(temperature=0.6, max_tokens=40, ignore_eos=True)]  # the sampling graph
    results = []
    for async_scheduling in (False, True):
        llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, max_model_len=512,
                  max_num_seqs=16, num_kvcache_blocks=256, async_scheduling=async_scheduling)
        overlapped = count_overlapped_launches(llm)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.stats()
        assert stats["num_free_blocks"] == stats["num_blocks"]
        assert overlapped[0] > (30 if async_scheduling else -1)
        results.append(outputs)
        llm.close()
        del llm
        gc.collect()  # the engine's KV cache goes before the next one sizes its own
        torch.cuda.empty_cache()
    sync, overlap = results
    assert [len(o.outputs[0].token_ids) for o in overlap] == [p.max_tokens for p in params]
    assert summary(overlap[:-1]) == summary(sync[:-1])
    for x, y in zip(overlap[4].outputs, sync[4].outputs):
        assert [d.keys() for d in x.logprobs] == [d.keys() for d in y.logprobs]
        assert [[v.logprob for v in d.values()] for d in x.logprobs] == \
            [[v.logprob for v in d.values()] for d in y.logprobs]


def test_async_scheduling_default_follows_the_device(folder):
    """None (the default) means on for CUDA at any tensor parallel size, off on the CPU; the CLI has both flags."""
    from nanovllm.utils.args import add_engine_args
    llm = LLM(folder, dtype="float32", num_kvcache_blocks=BLOCKS)
    assert llm.engine.async_scheduling is (llm.engine.model_runner.device.type == "cuda")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args([]).async_scheduling is None
    assert parser.parse_args(["--no-async-scheduling"]).async_scheduling is False
    assert parser.parse_args(["--async-scheduling"]).async_scheduling is True


def test_a_prompt_chunked_over_steps_that_sample_nothing(folder, reference, monkeypatch):
    """One long prompt under a small token budget: its chunks before the last sample nothing, and are
    launched ahead all the same (a step whose ids the next one does not need); the tokens are the sync
    loop's."""
    _, _, eos = workload(reference)
    prompt, params = [(i * 29) % 900 + 40 for i in range(45)], greedy(6, ignore_eos=True)
    outputs, launched = [], []
    for async_scheduling in (False, True):
        llm = make_llm(folder, eos, async_scheduling, monkeypatch, max_num_batched_tokens=8)
        runner = llm.engine.model_runner
        launch = runner.launch

        def recorded(batch, prev=None):
            pending = launch(batch, prev)
            launched.append((prev is not None, len(pending.seqs)))
            return pending
        runner.launch = recorded
        outputs.append(llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6
    assert launched.count((True, 0)) == 4  # chunks 2-5 of 6, ahead of the one before; chunk 6 samples


@torch.inference_mode()
def test_a_replays_ids_come_from_its_ring_row_until_the_row_is_reused():
    """A graph replay's ids, and its logprobs where the step asks, reach pinned memory in a ring of RING rows,
    each replay the next row (here the graphs' code path uncaptured on CPU, which copies where the CUDA
    kernels write). A read after RING later replays took the row is an error, not another step's results."""
    from nanovllm.engine.cuda_graph import RING, DecodeGraphs
    from nanovllm.engine.sequence import Sequence
    logits = torch.zeros(20)
    graphs = DecodeGraphs(FixedLogits(logits), 4, 1, 16, 20, torch.float32, torch.device("cpu"), capture=False)
    seqs = [Sequence([1], SamplingParams()) for _ in range(3)]
    for seq in seqs:
        seq.block_table = [0]
    rings, expected = [], []
    for i, k in zip(range(RING + 1), (0, 20, 5, 3, 1)):
        logits.copy_(torch.randn(20, generator=torch.Generator().manual_seed(i)))[i] = 9.0  # replay i picks i
        rings.append(graphs.replay(seqs))
        expected.append(graphs.logprobs(rings[-1], k))  # widths 0, 20, 5, 5, 5
    assert [ring.slot for ring in rings] == [i % RING for i in range(RING + 1)]
    for i, ring in enumerate(rings[1:], start=1):
        assert ring.ids().tolist() == [i] * 3
        got = ring.logprobs()
        assert got[2].shape == (3, (0, 20, 5, 5, 5)[i]) and got[1].dtype == got[2].dtype == torch.int64
        assert all(torch.equal(a, b) for a, b in zip(got, expected[i]))
        assert (got[1] == 1).all() and (got[2][:, :1] == i).all()  # token i: rank 1, first in the top list
    with pytest.raises(RuntimeError, match="reused"):
        rings[0].ids()
    with pytest.raises(RuntimeError, match="reused"):
        rings[0].logprobs()
