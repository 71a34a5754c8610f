"""Tensor parallelism on 2 GPUs: the same model at tensor_parallel_size 1 and 2, agreement and speed.

Random weights (`load_format="dummy"` draws one checkpoint that every TP size slices, so every engine of
an architecture runs the same model). Engines, one after another:
  qwen3-8b bf16   tp1        CUDA graphs: agreement, decode steps at batch 1/64/256, throughput
                  tp1_async  the same with async scheduling (the CUDA default; runs without "async" pin the
                             synchronous loop)
                  tp1_eager  enforce_eager: agreement only (the bf16 noise baseline: same weights and
                             TP size, other kernels and reduction orders)
                  tp2        symmetric-memory all-reduce: agreement, decode steps, throughput
                  tp2_async  the same with async scheduling (tp2_async_speedup: against tp1_async)
                  tp2_nccl   NANOVLLM_SYMM_MEM=0, NCCL all-reduce: agreement, decode steps, throughput
  qwen3-4b fp32   fp32_tp1, fp32_tp2 (NCCL): agreement only (in fp32 the near-ties of bf16 should resolve
                             the same way at both TP sizes, which shows the bf16 disagreement is rounding)
Agreement: 8 prompts x 64 greedy tokens with the top-20 logprobs of each step; one engine's tokens against
another's (rate, first divergence, and the reference's logprob gap there), and "logits close": both score
the reference's text (teacher-forced prompt logprobs), largest and mean absolute logprob difference.
Throughput: nano-vllm's workload, as benchmarks/bench_throughput.py runs it (256 requests, in/out uniform
in [100, 1024], temperature 0.6): the median of 3 runs after a warm-up, all of them in repeats_seconds.
Decode steps, measured after it: median engine step with `batch` seqs decoding (prompt 128).
Each engine runs in a process of its own (this script again, with --child), so that none inherits an
earlier engine's process state (allocator pools, threads, symmetric-memory rendezvous); the runs so far
pass between the processes in a JSON state file next to the results. Writes
benchmarks/results/tp-<card>.json after every engine, before it closes (a hang at close keeps what was
measured); its top-level keys are the 8B figures.

    python benchmarks/bench_tp.py [--out-dir benchmarks/results] [--runs tp1 tp2 ...]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch
from bench_latency import RESULTS_DIR, card_name, cuda_kernels, model_dir, short, timed_steps, write_json
from bench_throughput import timed_repeats, warm_up, workload

from nanovllm import LLM, SamplingParams
from nanovllm.distributed.parallel_state import all_reduce_backend

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
NUM_PROMPTS, PROMPT_LEN, STEPS, TOP = 8, 64, 64, 20
DECODE_BATCHES, DECODE_PROMPT, DECODE_WARMUP, DECODE_STEPS = (1, 64, 256), 128, 8, 64
PROFILE_BATCHES, PROFILE_STEPS, PROFILE_TOP = (1, 256), 8, 12  # rank 0's kernels over a few steps, by name
THROUGHPUT_REPEATS = 3  # the median of 3 workload runs, as bench_throughput reports

# Agreement-only engines: 8 seqs, so start-up tunes and captures only what 8 x 64-token prompts need.
SMALL = dict(max_num_seqs=NUM_PROMPTS, max_num_batched_tokens=NUM_PROMPTS * PROMPT_LEN)
# name: (architecture, engine arguments, NANOVLLM_SYMM_MEM, speed runs, whose tokens make the scored text)
RUNS = {
    "tp1": ("qwen3-8b", dict(tensor_parallel_size=1), "1", True, None),
    "tp1_async": ("qwen3-8b", dict(tensor_parallel_size=1, async_scheduling=True), "1", True, "tp1"),
    "tp1_eager": ("qwen3-8b", dict(tensor_parallel_size=1, enforce_eager=True), "1", False, "tp1"),
    "tp2": ("qwen3-8b", dict(tensor_parallel_size=2), "1", True, "tp1"),
    # NCCL (NANOVLLM_SYMM_MEM=0) with async scheduling, beside tp2_async_symm.
    "tp2_async": ("qwen3-8b", dict(tensor_parallel_size=2, async_scheduling=True), "0", True, "tp1"),
    "tp2_nccl": ("qwen3-8b", dict(tensor_parallel_size=2), "0", True, "tp1"),
    # Async with the symmetric-memory all-reduce: the process's first (and only) symmetric-memory group.
    "tp2_async_symm": ("qwen3-8b", dict(tensor_parallel_size=2, async_scheduling=True), "1", True, "tp1"),
    "fp32_tp1": ("qwen3-4b", dict(tensor_parallel_size=1, dtype="float32", **SMALL), "1", False, None),
    # NCCL: at 2 ranks both all-reduces round a + b once (nccl_vs_symm_mem checks it).
    "fp32_tp2": ("qwen3-4b", dict(tensor_parallel_size=2, dtype="float32", **SMALL), "0", False, "fp32_tp1"),
}
# comparison: (reference run, other run)
COMPARISONS = {
    "tp2_vs_tp1": ("tp1", "tp2"),  # bf16, what the issue measures
    "tp2_async_vs_tp1": ("tp1", "tp2_async"),  # async scheduling under TP changes no token
    "tp2_async_symm_vs_nccl": ("tp2_async", "tp2_async_symm"),  # two ranks: a + b rounds the same either way
    "eager_vs_graphs": ("tp1", "tp1_eager"),  # bf16 noise of one TP size
    "nccl_vs_symm_mem": ("tp2", "tp2_nccl"),  # two ranks: a + b rounds the same either way
    "fp32_tp2_vs_tp1": ("fp32_tp1", "fp32_tp2"),
}


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, 900) for _ in range(PROMPT_LEN)] for _ in range(NUM_PROMPTS)]


def greedy_run(llm: LLM) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=TOP)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    lps = [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]
    return tokens, lps


def scored(llm: LLM, texts: list[list[int]]) -> list[list[float]]:
    """Each text's prompt logprobs (the logprob of token j given tokens < j), j >= 1."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(texts, params, use_tqdm=False)
    return [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] for o in outs]


def decode_step_ms(llm: LLM, batch: int) -> dict:
    """Median wall time of an engine step, and of the model runner inside it, with `batch` seqs decoding."""
    engine = llm.engine
    rng = random.Random(batch)
    params = SamplingParams(temperature=0, ignore_eos=True,
                            max_tokens=DECODE_WARMUP + DECODE_STEPS + PROFILE_STEPS + 2)
    for i in range(batch):  # distinct prompts: no prefix-cache hits
        engine.add_request(f"d{batch}-{i}", [rng.randrange(100, 900) for _ in range(DECODE_PROMPT)], params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()  # prefill
    for _ in range(DECODE_WARMUP):
        engine.step()
    step_times, runner_times, launch_times = timed_launches(engine, DECODE_STEPS)
    # Async scheduling launches decode steps (runner.launch) and never calls runner.run: then only the
    # launch time (rank 0's host work to start a step, commands to the workers included) is known.
    result = {"batch": batch, "ms_per_step": median_ms(step_times), "runner_ms_per_step": median_ms(runner_times),
              "launch_ms_per_step": median_ms(launch_times)}
    if batch in PROFILE_BATCHES:
        result["rank0_kernels"] = kernel_profile(engine)
    while engine.has_unfinished_requests():
        engine.step()
    return result


def kernel_profile(engine) -> dict:
    """Rank 0's GPU time per step by kernel (µs, the top PROFILE_TOP), and their total, over PROFILE_STEPS
    engine steps. Under TP a collective's time includes waiting for the other rank to arrive."""
    def steps() -> None:
        for _ in range(PROFILE_STEPS):
            engine.step()
    t0 = time.perf_counter()
    kernels = cuda_kernels(steps)
    wall_ms = 1e3 * (time.perf_counter() - t0) / PROFILE_STEPS
    by_name: dict[str, float] = {}
    for name, us in kernels:
        by_name[short(name)] = by_name.get(short(name), 0.0) + us / PROFILE_STEPS
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:PROFILE_TOP])
    return {"kernel_us_per_step": sum(by_name.values()), "kernels_per_step": len(kernels) / PROFILE_STEPS,
            "profiled_wall_ms_per_step": wall_ms, "top_us_per_step": top}


def timed_launches(engine, steps: int) -> tuple[list[float], list[float], list[float]]:
    """timed_steps, and the wall seconds of each runner.launch inside the steps (async scheduling)."""
    runner, launch_times = engine.model_runner, []
    launch = runner.launch

    def timed_launch(*args):
        t0 = time.perf_counter()
        pending = launch(*args)
        launch_times.append(time.perf_counter() - t0)
        return pending
    runner.launch = timed_launch
    try:
        return (*timed_steps(engine, steps), launch_times)
    finally:
        runner.launch = launch


def median_ms(seconds: list[float]) -> float | None:
    """None when nothing was timed (e.g. runner.run under async scheduling: steps are launched)."""
    return 1e3 * sorted(seconds)[len(seconds) // 2] if seconds else None


def measure_speed(llm: LLM, result: dict) -> None:
    """Throughput first, as bench_throughput measures it on an engine that has run only its warm-up (and here
    the short agreement runs), then the decode steps, whose batches and kernel profiles come after it."""
    name = result["name"]
    measure_throughput(llm, result)
    print(f"{name}: {result['output_tok_per_s']:.0f} output tok/s", flush=True)
    result["decode"] = [decode_step_ms(llm, batch) for batch in DECODE_BATCHES]
    result["ms_per_token_bs1"] = result["decode"][0]["ms_per_step"]
    print(f"{name}: decode steps " + ", ".join(f"bs{d['batch']} {d['ms_per_step']:.3f} ms"
                                              for d in result["decode"]), flush=True)


def measure_throughput(llm: LLM, result: dict) -> None:
    """The workload's median of THROUGHPUT_REPEATS runs after a warm-up, into result."""
    warm_up(llm)
    reqs, params = workload()
    spent, runs = timed_repeats(llm, reqs, params, THROUGHPUT_REPEATS)
    result["output_tokens"] = sum(p.max_tokens for p in params)
    result["throughput"], result["repeats_seconds"] = spent, [run["seconds"] for run in runs]
    result["output_tok_per_s"] = result["output_tokens"] / spent["seconds"]


def make_engine(folder: str, **engine_args) -> LLM:
    """A bench engine (random weights, 4096-token context), in the synchronous loop unless engine_args ask for
    async scheduling, so tp1 and tp2 compare like with like."""
    return LLM(folder, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
               **{"async_scheduling": False, **engine_args})


def run_engine(name: str, folders: dict[str, str], runs: dict[str, dict], before_close) -> None:
    """Runs one engine of RUNS into runs[name]; `before_close()` runs before the engine closes."""
    arch, engine_args, symm_mem, speed, reference = RUNS[name]
    os.environ["NANOVLLM_SYMM_MEM"] = symm_mem  # read at group init; the workers inherit it
    t0 = time.perf_counter()
    llm = make_engine(folders[arch], **engine_args)
    result = runs[name] = {"name": name, "arch": arch, **engine_args, "all_reduce": all_reduce_backend(),
                           "startup_s": time.perf_counter() - t0,
                           "num_kvcache_blocks": llm.engine.stats()["num_blocks"]}
    print(f"{name}: engine ready in {result['startup_s']:.0f} s, all-reduce: {result['all_reduce']}", flush=True)
    try:
        result["tokens"], result["logprobs"] = greedy_run(llm)
        ref_tokens = runs[reference]["tokens"] if reference in runs else result["tokens"]
        result["scored"] = scored(llm, [p + t for p, t in zip(prompts(), ref_tokens)])
        if speed:
            measure_speed(llm, result)
        before_close()
    finally:  # also after a failure: its workers stop with it (the process, one engine's, ends next)
        t0 = time.perf_counter()
        llm.close()
        print(f"{name}: closed in {time.perf_counter() - t0:.1f} s", flush=True)


def compare(one: dict, two: dict) -> dict:
    """`two` against the reference `one`: greedy agreement (with one's logprob gap at each first divergence)
    and the logprob differences on the same teacher-forced text."""
    equal = total = 0
    firsts, gaps = [], []
    for a, b, lps in zip(two["tokens"], one["tokens"], one["logprobs"]):
        equal += sum(x == y for x, y in zip(a, b))
        total += len(b)
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        firsts.append(first)
        if first is not None:
            step = lps[first]
            gaps.append(step[b[first]] - step[a[first]] if a[first] in step else None)
    diffs = [abs(x - y) for sa, sb in zip(one["scored"], two["scored"]) for x, y in zip(sa, sb)]
    return {"greedy_agreement": equal / total, "first_divergence": firsts, "gaps_at_divergence": gaps,
            "max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs)}


def summary(runs: dict[str, dict], card: str, cards: list[str]) -> dict:
    """The JSON: each run's figures, each comparison whose two runs are done, and the headline keys."""
    detail_keys = ("arch", "tensor_parallel_size", "dtype", "enforce_eager", "all_reduce", "startup_s",
                   "num_kvcache_blocks", "decode", "ms_per_token_bs1", "output_tokens", "throughput",
                   "repeats_seconds", "output_tok_per_s")
    result = {"card": card, "cards": cards,
              "workload": "nano-vllm bench.py: 256 reqs, in/out uniform [100, 1024], seed 0, temperature 0.6; "
                          "random weights (bf16 unless a run says dtype float32)",
              "runs": {name: {k: r[k] for k in detail_keys if k in r} for name, r in runs.items()},
              "comparisons": {name: compare(runs[a], runs[b]) for name, (a, b) in COMPARISONS.items()
                              if "scored" in runs.get(a, {}) and "scored" in runs.get(b, {})}}
    headline = {"tp2_nccl_output_tok_per_s": ("tp2_nccl", "output_tok_per_s"),
                "tp1_async_output_tok_per_s": ("tp1_async", "output_tok_per_s"),
                "tp2_async_output_tok_per_s": ("tp2_async", "output_tok_per_s"),
                "tp2_async_symm_output_tok_per_s": ("tp2_async_symm", "output_tok_per_s"),
                "tp2_nccl_ms_per_token_bs1": ("tp2_nccl", "ms_per_token_bs1")}
    # The tp1_/tp2_ keys: from the synchronous runs, or without them from the async ones (the
    # engine's default).
    for tp, names in ((1, ("tp1", "tp1_async")), (2, ("tp2", "tp2_async_symm", "tp2_async"))):
        name = next((n for n in names if "output_tok_per_s" in runs.get(n, {})), None)
        for field in ("output_tok_per_s", "ms_per_token_bs1") if name else ():
            headline[f"tp{tp}_{field}"] = (name, field)
        if name:
            result[f"tp{tp}_headline_run"] = name
    for key, (run, field) in headline.items():
        if field in runs.get(run, {}):
            result[key] = runs[run][field]
    for tp2 in ("tp2", "tp2_nccl"):
        if f"{tp2}_output_tok_per_s" in result and "tp1_output_tok_per_s" in result:
            result[f"{tp2}_speedup"] = result[f"{tp2}_output_tok_per_s"] / result["tp1_output_tok_per_s"]
    for tp2 in ("tp2_async", "tp2_async_symm"):
        if f"{tp2}_output_tok_per_s" in result and "tp1_async_output_tok_per_s" in result:
            result[f"{tp2}_speedup"] = result[f"{tp2}_output_tok_per_s"] / result["tp1_async_output_tok_per_s"]
    for name, row in result["comparisons"].items():
        result[f"{name}_greedy_agreement"] = row["greedy_agreement"]
    return result


def load_runs(path: str) -> dict[str, dict]:
    """The state file's runs, each step's logprobs keyed by token id again (JSON keys are strings)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        runs = json.load(f)
    for run in runs.values():
        if "logprobs" in run:
            run["logprobs"] = [[{int(t): lp for t, lp in step.items()} for step in seq] for seq in run["logprobs"]]
    return runs


def child(name: str, state: str) -> None:
    """One engine of RUNS, in this process: the earlier runs from the state file (the reference's tokens),
    this run's result added to it before the engine closes."""
    runs = load_runs(state)
    arch = RUNS[name][0]
    run_engine(name, {arch: model_dir(os.path.join(CONFIGS, f"{arch}.json"))}, runs, lambda: write_json(state, runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.state)
    card, tag = card_name()
    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"tp-{tag}.json")
    state = os.path.join(args.out_dir, f".tp-{tag}-state.json")
    if os.path.exists(state):
        os.remove(state)
    runs: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def write() -> None:
        result = {**summary(runs, card, cards), "errors": errors}
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}, indent=1), flush=True)
        write_json(path, result)
    for name in args.runs:  # keep going after a failure: the other runs and comparisons still tell something
        code = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--state", state]).returncode
        runs = load_runs(state)
        if code != 0 or name not in runs:
            errors[name] = f"its process exited with {code}" + ("" if name in runs else " before its result")
            print(f"{name}: failed: {errors[name]}", flush=True)
        write()
    if os.path.exists(state):
        os.remove(state)
    print(json.dumps(summary(runs, card, cards)["comparisons"]), flush=True)


if __name__ == "__main__":
    main()
