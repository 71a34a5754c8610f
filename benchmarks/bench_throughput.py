"""Offline throughput on nano-vllm's benchmark workload, beside transformers and the bandwidth roofline.

Workload (nano-vllm's bench.py, same random calls): 256 requests of random token ids, input and output
lengths uniform in [100, 1024] (random.seed(0)), temperature 0.6, ignore EOS, max_model_len 4096; the
Qwen3-0.6B architecture with random bf16 weights, CUDA graphs on. Throughput = requested output tokens /
wall time of one LLM.generate over all of them (after a warm-up generate), as nano-vllm reports it; the
median of --repeats such runs (default 3), each with the token ids shifted so that no run hits the prefix
cache of the one before.

transformers: `generate` (eager, sampling at temperature 0.6) on the first HF_REQUESTS requests as one
left-padded batch, each output capped at HF_MAX_TOKENS; its rate is useful tokens (each request's own
capped length) over wall time. The cap shortens contexts and padding waste, so it flatters transformers.

Roofline: every decode step must read the weights once and each running seq's KV cache once; with all
256 seqs decoding from the start (they fit in memory), the sum over steps of those bytes over the
measured device-copy bandwidth is the least time the workload's decoding can take (prefill not counted).

The engine runs as it does by default on CUDA: async scheduling on (each decode step is scheduled and
launched before the previous one's ids are back; the breakdown shows the host time spent launching steps
and waiting for their ids). --no-async-scheduling (or NANOVLLM_ASYNC_SCHEDULING=0) runs the plain
synchronous loop instead and writes throughput-<card>-sync.json. --filters samples with top-k 20 and top-p
0.95 as well (Qwen3's recommended settings) and writes throughput-<card>-filters.json: every decode step
filters in its bucket's FILTER graph, unless NANOVLLM_FILTER_MAX_BS=n sends steps of more than n seqs to the
eager Sampler. --seeded-every K gives every K-th request a seed: those rows draw in the graphs too, by their
own Philox keys (before session 32 they took the eager Sampler). --logprobs K asks K logprobs of every
request (the decode graphs' logprobs step, kernels/logprobs.py). --penalized-every K gives every K-th
request a presence penalty of 0.5 (its rows take the eager Sampler, which reads the id still in flight on
the device).

    python benchmarks/bench_throughput.py [--out-dir benchmarks/results] [--skip-hf] [--no-async-scheduling]
        [--filters] [--seeded-every K] [--logprobs K] [--penalized-every K]
"""
import argparse
import gc
import json
import os
import random
import time

import torch
from bench_latency import (
    RESULTS_DIR,
    card_name,
    copy_bandwidth_gbps,
    kv_bytes_per_token,
    model_dir,
    weight_bytes,
    write_json,
)

from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_runner import PendingStep

NUM_SEQS, MAX_INPUT_LEN, MAX_OUTPUT_LEN = 256, 1024, 1024
HF_REQUESTS, HF_MAX_TOKENS = 16, 128


FILTERS = {"top_k": 20, "top_p": 0.95}  # --filters: Qwen3's recommended sampling (with temperature 0.6)


def workload(filters: bool = False, seeded_every: int = 0, logprobs: int | None = None,
             penalized_every: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """nano-vllm's requests; with filters, FILTERS on each; with seeded_every k, every k-th request has a seed
    (so its rows take the eager Sampler); each asks `logprobs` logprobs; with penalized_every k, every k-th
    request has a presence penalty of 0.5."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, MAX_INPUT_LEN))]
               for _ in range(NUM_SEQS)]
    extra = FILTERS if filters else {}
    seeds = [i if seeded_every and i % seeded_every == 0 else None for i in range(NUM_SEQS)]
    penalties = [0.5 if penalized_every and i % penalized_every == 0 else 0.0 for i in range(NUM_SEQS)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, MAX_OUTPUT_LEN),
                             seed=seed, logprobs=logprobs, presence_penalty=penalty, **extra)
              for seed, penalty in zip(seeds, penalties)]
    return prompts, params


def roofline_seconds(in_lens: list[int], out_lens: list[int], wbytes: int, kv_tok: int, bw_gbps: float) -> float:
    """Sum over decode steps t of (weights + KV of the seqs still running at t) / bandwidth."""
    seconds = 0.0
    for t in range(max(out_lens)):
        kv_tokens = sum(i + t for i, o in zip(in_lens, out_lens) if o > t)
        seconds += (wbytes + kv_tokens * kv_tok) / (bw_gbps * 1e9)
    return seconds


def make_engine(folder: str, **kwargs) -> LLM:
    """The engine every throughput script times: random weights, CUDA graphs, 4096-token context."""
    return LLM(folder, load_format="dummy", skip_tokenizer_init=True, enforce_eager=False, max_model_len=4096,
               **kwargs)


def warm_up(llm: LLM, filters: bool = False, seeded: bool = False) -> None:
    """Compiles what the timed run meets: prefill batches of several sizes, mixed steps, sampled decodes
    (with seeded: every third request seeded, whose first tokens the eager steps draw by the kernels)."""
    rng = random.Random(1)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, MAX_INPUT_LEN))] for _ in range(24)]
    extra = FILTERS if filters else {}
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=24, seed=i if seeded and i % 3 == 0 else None,
                             **extra) for i in range(len(prompts))]
    llm.generate(prompts, params, use_tqdm=False)
    llm.generate(prompts[:1], SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=4, **extra),
                 use_tqdm=False)


def timed_generate(llm: LLM, prompts, params) -> dict:
    """Wall time of llm.generate, and how much of it the model runner and the scheduler took. With async
    scheduling, runner_s also counts launches (launch_s) and the waits for a step's ids (wait_s). prefill_s:
    the time until the first step with no prompt left to prefill (every seq decoding), which the roofline
    leaves out and which runs eagerly, so it shows how fast the host launches (NOTES-gpu.md, session 29)."""
    engine = llm.engine
    runner, scheduler = engine.model_runner, engine.scheduler
    spent = {"runner_s": 0.0, "schedule_s": 0.0, "steps": 0, "graph_steps": 0, "overlapped_steps": 0,
             "launch_s": 0.0, "wait_s": 0.0, "prefill_s": None}
    run, launch, result = runner.run, runner.launch, PendingStep.result

    def add(t0: float, *keys: str) -> None:
        for key in keys:
            spent[key] += time.perf_counter() - t0

    def timed_run(batch):
        t0 = time.perf_counter()
        spent["graph_steps"] += runner._graph_ready(batch)
        spent["steps"] += 1
        out = run(batch)
        add(t0, "runner_s")
        return out

    def timed_launch(batch, prev=None):
        t0 = time.perf_counter()
        spent["graph_steps"] += runner._graph_ready(batch)
        spent["steps"] += 1
        spent["overlapped_steps"] += prev is not None
        out = launch(batch, prev)
        add(t0, "runner_s", "launch_s")
        return out

    def timed_result(pending):
        t0 = time.perf_counter()
        out = result(pending)
        add(t0, "runner_s", "wait_s")
        return out

    def timed_schedule(schedule):
        def wrapper():
            t0 = time.perf_counter()
            batch = schedule()
            add(t0, "schedule_s")
            if (spent["prefill_s"] is None and batch is not None and batch.seqs and not scheduler.waiting
                    and all(seq.num_computed_tokens >= seq.num_prompt_tokens for seq in batch.seqs)):
                spent["prefill_s"] = t0 - start
            return batch
        return wrapper
    runner.run, runner.launch, PendingStep.result = timed_run, timed_launch, timed_result
    scheduler.schedule = timed_schedule(scheduler.schedule)
    scheduler.schedule_overlapped = timed_schedule(scheduler.schedule_overlapped)
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        spent["seconds"] = time.perf_counter() - start
    finally:  # instance attributes shadowed the methods
        del runner.run, runner.launch, scheduler.schedule, scheduler.schedule_overlapped
        PendingStep.result = result
    assert [len(o.outputs[0].token_ids) for o in outputs] == [p.max_tokens for p in params]
    spent["other_s"] = spent["seconds"] - spent["runner_s"] - spent["schedule_s"]
    return spent


@torch.inference_mode()
def hf_throughput(folder: str, prompts, params, filters: dict | None = None) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(folder)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    sub = prompts[:HF_REQUESTS]
    outs = [min(p.max_tokens, HF_MAX_TOKENS) for p in params[:HF_REQUESTS]]
    width = max(map(len, sub))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in sub], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in sub], device="cuda")
    kwargs = {"do_sample": True, "temperature": 0.6, "top_k": 0, "top_p": 1.0, "pad_token_id": 0,
              "eos_token_id": None, **(filters or {})}
    hf.generate(input_ids=ids[:, -32:], attention_mask=mask[:, -32:], max_new_tokens=8, **kwargs)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs), **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del hf
    return {"requests": HF_REQUESTS, "max_tokens_cap": HF_MAX_TOKENS, "useful_tokens": sum(outs),
            "seconds": seconds, "output_tok_per_s": sum(outs) / seconds}


def shifted(prompts: list[list[int]], run: int) -> list[list[int]]:
    """The prompts of timed run `run` (0: as given): the same lengths with every id shifted, so that no
    run hits the prefix cache of an earlier one."""
    return [[(t + 7919 * run) % 10001 for t in p] for p in prompts]


def timed_repeats(llm: LLM, prompts, params, repeats: int) -> tuple[dict, list[dict]]:
    """(the median run, every run) of `repeats` timed runs of the workload, each with `shifted` prompts."""
    runs = [timed_generate(llm, shifted(prompts, r), params) for r in range(repeats)]
    return sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2], runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--skip-hf", action="store_true", help="leave out the transformers comparison")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=os.environ.get("NANOVLLM_ASYNC_SCHEDULING") != "0",
                        help="schedule each decode step while the previous one runs (engine arg "
                             "async_scheduling, on by default on CUDA); --no-async-scheduling writes "
                             "throughput-<card>-sync.json")
    parser.add_argument("--filters", action="store_true",
                        help=f"sample with {FILTERS} too; writes throughput-<card>-filters.json")
    parser.add_argument("--seeded-every", type=int, default=0, metavar="K",
                        help="give every K-th request a seed; writes throughput-<card>[-filters]-seeded<K>.json")
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="ask K logprobs of every request; writes throughput-<card>[...]-logprobs<K>.json")
    parser.add_argument("--penalized-every", type=int, default=0, metavar="K",
                        help="give every K-th request a presence penalty; writes ...-penalized<K>.json")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of the workload; the median one is reported, all in repeats_seconds")
    args = parser.parse_args()
    card, tag = card_name()
    bw = copy_bandwidth_gbps()
    folder = model_dir()
    prompts, params = workload(args.filters, args.seeded_every, args.logprobs, args.penalized_every)
    t0 = time.perf_counter()
    llm = make_engine(folder, async_scheduling=args.async_scheduling)
    startup = time.perf_counter() - t0
    warm_up(llm, args.filters, args.seeded_every > 0)
    spent, runs = timed_repeats(llm, prompts, params, args.repeats)
    runner = llm.engine.model_runner
    cfg = runner.model_config
    wbytes, kv_tok = weight_bytes(runner.model, cfg.tie_word_embeddings), kv_bytes_per_token(cfg)
    stats = llm.engine.stats()
    filter_max_bs = runner.graphs.filter_max_bs if runner.graphs else None
    prefill_graphs = runner.prefill_graphs is not None  # on unless NANOVLLM_PREFILL_GRAPHS=0 (engine/prefill_graphs.py)
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    output_tokens = sum(p.max_tokens for p in params)
    roofline = output_tokens / roofline_seconds(list(map(len, prompts)), [p.max_tokens for p in params],
                                                wbytes, kv_tok, bw)
    hf = None if args.skip_hf else hf_throughput(folder, prompts, params, FILTERS if args.filters else None)
    result = {"card": card, "model": "Qwen3-0.6B architecture, random bf16 weights",
              "workload": "nano-vllm bench.py: 256 reqs, in/out uniform [100, 1024], seed 0, temperature 0.6",
              "async_scheduling": args.async_scheduling, "prefill_graphs": prefill_graphs,
              "filters": FILTERS if args.filters else None, "filter_max_bs": filter_max_bs,
              "seeded_every": args.seeded_every, "logprobs": args.logprobs, "penalized_every": args.penalized_every,
              "output_tokens": output_tokens, "seconds": spent["seconds"],
              "output_tok_per_s": output_tokens / spent["seconds"],
              "hf_output_tok_per_s": hf["output_tok_per_s"] if hf else None,
              "roofline_output_tok_per_s": roofline,
              "fraction_of_roofline": output_tokens / spent["seconds"] / roofline,
              "copy_bw_gbps": bw, "weight_bytes": wbytes, "kv_bytes_per_token": kv_tok,
              "repeats_seconds": [run["seconds"] for run in runs],
              "startup_s": startup, "breakdown": spent, "num_kvcache_blocks": stats["num_blocks"],
              "num_preemptions": stats["num_preemptions"], "hf": hf}
    os.makedirs(args.out_dir, exist_ok=True)
    suffix = (("" if args.async_scheduling else "-sync") + ("-filters" if args.filters else "")
              + (f"-seeded{args.seeded_every}" if args.seeded_every else "")
              + (f"-logprobs{args.logprobs}" if args.logprobs is not None else "")
              + (f"-penalized{args.penalized_every}" if args.penalized_every else ""))
    write_json(os.path.join(args.out_dir, f"throughput-{tag}{suffix}.json"), result)
    print(json.dumps(result, indent=1))
    print(f"{card}: {result['output_tok_per_s']:.0f} output tok/s ({output_tokens} tokens in "
          f"{spent['seconds']:.2f} s), {100 * result['fraction_of_roofline']:.0f}% of the {roofline:.0f} tok/s "
          f"roofline; transformers {result['hf_output_tok_per_s'] or float('nan'):.0f} tok/s; prompts all "
          f"prefilled after {spent['prefill_s'] or float('nan'):.2f} s")


if __name__ == "__main__":
    main()
