"""What stalls a timed run of nano-vllm's workload: Triton compiles, garbage collections and the slowest
steps, per run.

bench_throughput's engine and warm-up, then `--runs` timed runs of the workload (each with shifted ids, as
bench_throughput's repeats: `shifted`). For each run: its seconds, the Triton kernels compiled during it (name, ms and
the specialization key: a kernel compiled mid-run stalls every request in flight), the collector's pauses
(count, total, longest) and the slowest engine steps with their running and waiting seqs. A healthy engine
compiles nothing after the warm-up and pauses a few ms at most.

    python benchmarks/stalls.py [--out-dir benchmarks/results] [--runs 4]   # stalls-<card>.json
"""
import argparse
import gc
import os
import time

import bench_throughput as bt
from bench_latency import RESULTS_DIR, card_name, model_dir, write_json
from triton.runtime.jit import JITFunction

from nanovllm import LLM

COMPILES: list[dict] = []  # the Triton compiles of the current run: kernel, ms, specialization key
PAUSES: list[float] = []  # the collector's pauses in the current run, ms


def _watch_compiles() -> None:
    compile_ = JITFunction._do_compile  # every new specialization goes through it (Triton 3.x)

    def timed(self, key, *args, **kwargs):
        t0 = time.perf_counter()
        out = compile_(self, key, *args, **kwargs)
        COMPILES.append({"kernel": self.fn.__name__, "ms": (time.perf_counter() - t0) * 1e3, "key": str(key)})
        return out
    JITFunction._do_compile = timed


def _watch_gc() -> None:
    start = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            PAUSES.append((time.perf_counter() - start[0]) * 1e3)
    gc.callbacks.append(callback)


def timed_run(llm: LLM, prompts, params) -> dict:
    engine, steps = llm.engine, []
    step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        out = step()
        steps.append(((time.perf_counter() - t0) * 1e3, len(engine.scheduler.running),
                      len(engine.scheduler.waiting)))
        return out
    COMPILES.clear()
    PAUSES.clear()
    engine.step = timed_step
    try:
        seconds = bt.timed_generate(llm, prompts, params)["seconds"]
    finally:
        del engine.step
    slowest = sorted(range(len(steps)), key=lambda i: -steps[i][0])[:8]
    return {"seconds": seconds, "steps": len(steps),
            "median_step_ms": sorted(s[0] for s in steps)[len(steps) // 2],
            "compiles": list(COMPILES), "gc_pauses": len(PAUSES), "gc_ms": sum(PAUSES),
            "gc_max_ms": max(PAUSES, default=0.0),
            "slowest_steps": [{"step": i, "ms": steps[i][0], "running": steps[i][1], "waiting": steps[i][2]}
                              for i in slowest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    _watch_compiles()
    _watch_gc()
    card, tag = card_name()
    prompts, params = bt.workload()
    llm = bt.make_engine(model_dir())
    bt.warm_up(llm)
    runs = []
    for r in range(args.runs):
        runs.append(timed_run(llm, bt.shifted(prompts, r), params))
        run = runs[-1]
        print(f"run {r}: {run['seconds']:.3f} s, {len(run['compiles'])} compiles "
              f"({sum(c['ms'] for c in run['compiles']):.0f} ms), gc {run['gc_ms']:.0f} ms "
              f"(longest {run['gc_max_ms']:.0f}), slowest step {run['slowest_steps'][0]['ms']:.0f} ms", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, f"stalls-{tag}.json"), {"card": card, "runs": runs})


if __name__ == "__main__":
    main()
