"""Where the GPU time of nano-vllm's workload goes: bench_throughput's run, step by step, with the torch
profiler on a few windows of engine steps (the prefill at the start, full-batch decodes in the middle, the
tail), and the wall time of every step.

Per window: kernel µs per step by kernel name, the GPU's busy time against the wall time (what the host
or a sync leaves idle), and the kind of steps in it. Per step (all of them): wall ms, seqs and tokens, so
the prefill steps' share of the run shows. The engine runs as bench_throughput runs it (async scheduling
by default); the profiler slows the host inside a window, so the windows' wall times are upper bounds.

    python benchmarks/profile_throughput.py [--out-dir benchmarks/results]   # profile_throughput-<card>.json
    python benchmarks/profile_throughput.py --config qwen3-8b --tp 2   # ...-<card>-qwen3-8b-tp2.json (rank 0)
"""
import argparse
import os
import time

import torch
from bench_latency import RESULTS_DIR, card_name, model_dir, short, write_json
from bench_throughput import make_engine, warm_up, workload
from torch.profiler import ProfilerActivity, profile

WINDOWS = {"start": (0, 24), "middle": (400, 440), "late": (800, 840)}  # [first, last) engine steps
TOP = 16


def kernel_table(prof, steps: int) -> dict:
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    by_name: dict[str, float] = {}
    for e in events:
        by_name[short(e.name)] = by_name.get(short(e.name), 0.0) + e.time_range.elapsed_us() / steps
    # busy time: the union of the kernels' intervals (copies included), not their sum
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    busy, end = 0, None
    for s, e in spans:
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:TOP])
    return {"gpu_busy_us_per_step": busy / steps, "kernel_us_per_step": sum(by_name.values()),
            "kernels_per_step": len(events) / steps, "top_us_per_step": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--config", default=None, help="a name in benchmarks/configs (default: Qwen3-0.6B)")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (the profiler sees rank 0)")
    args = parser.parse_args()
    card, tag = card_name()
    if args.config or args.tp > 1:
        tag += f"-{args.config or 'qwen3-0.6b'}-tp{args.tp}"
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{args.config}.json")
    llm = make_engine(model_dir(config) if args.config else model_dir(), tensor_parallel_size=args.tp)
    warm_up(llm)
    engine = llm.engine
    prompts, params = workload()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), p, sp)
    steps, windows, prof, window = [], {}, None, None
    torch.cuda.synchronize()
    t_start = time.perf_counter()
    while engine.has_unfinished_requests():
        i = len(steps)
        for name, (first, _) in WINDOWS.items():
            if i == first:
                window, w0 = name, time.perf_counter()
                prof = profile(activities=[ProfilerActivity.CUDA])
                prof.__enter__()
        running = len(engine.scheduler.running)
        t0 = time.perf_counter()
        engine.step()
        steps.append({"ms": 1e3 * (time.perf_counter() - t0), "running": running,
                      "waiting": len(engine.scheduler.waiting)})
        if window is not None and i + 1 == WINDOWS[window][1]:
            torch.cuda.synchronize()
            wall_us = 1e6 * (time.perf_counter() - w0) / (i + 1 - WINDOWS[window][0])
            prof.__exit__(None, None, None)
            windows[window] = {"wall_us_per_step": wall_us, **kernel_table(prof, i + 1 - WINDOWS[window][0]),
                               "running": running}
            print(window, {k: v for k, v in windows[window].items() if k != "top_us_per_step"}, flush=True)
            for k, v in windows[window]["top_us_per_step"].items():
                print(f"    {v:9.1f} us  {k}", flush=True)
            window = None
    seconds = time.perf_counter() - t_start
    out_tokens = sum(p.max_tokens for p in params)
    slow = sorted(range(len(steps)), key=lambda j: -steps[j]["ms"])[:30]
    prefill_steps = [s["ms"] for s in steps if s["waiting"] > 0]  # steps while prompts still wait to start
    result = {"card": card, "config": args.config, "tp": args.tp, "seconds": seconds,
              "while_prompts_wait_s": sum(prefill_steps) / 1e3, "steps_while_prompts_wait": len(prefill_steps),
              "output_tok_per_s": out_tokens / seconds, "num_steps": len(steps),
              "windows": windows, "slowest_steps": [{"step": j, **steps[j]} for j in slow],
              "ms_per_step": [round(s["ms"], 3) for s in steps]}
    print({k: v for k, v in result.items() if k not in ("windows", "ms_per_step", "slowest_steps")}, flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, f"profile_throughput-{tag}.json"), result)
    llm.close()


if __name__ == "__main__":
    main()
