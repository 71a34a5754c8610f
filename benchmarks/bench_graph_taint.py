"""What makes a decode graph's replays slower for good: eager kernels launched between its replays (1 GPU).

Session 25 found that a kernel launched eagerly right after each of a few replays of the batch-1 decode graph
made every later replay of that graph ~22 µs slower, until the graph was captured again. This times bare
back-to-back replays of the batch-1 greedy graph (Qwen3-0.6B architecture, random bf16 weights, after a
128-token request) before and after each action below, on a freshly captured graph each time:

- replays only, or with a host-to-device copy after each (what the default loop does between steps);
- 5, 10 or 20 replays each followed by one eager kernel (an ATen add), also with the GPU idle before it
  (synchronized) or on a side stream, and 20 such kernels launched before the graph's first replay;
- a request through the full Sampler (top-p with a seed: its kernels run after each replay), or greedy
  with logprobs (the logprobs graph after each replay), and the request's ms per token;
- 20 kernels, then a one-token request (an eager prefill forward) or a greedy 4-token one.

Then the same for two small graphs of 50 plain and 200 PDL-launched Triton kernels, and the PDL-off engine
(NANOVLLM_PDL=0) in a process of its own. Writes graph_taint-<card>.json.

    python benchmarks/bench_graph_taint.py [--out-dir benchmarks/results]
"""
import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl
from bench_latency import RESULTS_DIR, card_name, child_json, model_dir, write_json
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from nanovllm import LLM, SamplingParams

ROUNDS = 20  # replays in an action
REQUEST_MS = []  # ms per token of the last request an action made


@triton.jit
def _pdl_copy_kernel(src_ptr, dst_ptr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    tl.store(dst_ptr + tl.arange(0, 64), tl.load(src_ptr + tl.arange(0, 64)))


def bare_us(graph: torch.cuda.CUDAGraph, replays: int = 200) -> float:
    """µs a replay over back-to-back replays between two events, after 10 untimed ones."""
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return round(start.elapsed_time(end) * 1e3 / replays, 1)


def interleave(graph: torch.cuda.CUDAGraph, rounds: int, *actions) -> None:
    for _ in range(rounds):
        graph.replay()
        for action in actions:
            action()
    torch.cuda.synchronize()


def actions(llm: LLM) -> dict:
    """name -> fn(graph): what runs between the two timings."""
    x, pinned, side = torch.zeros(64, device="cuda"), torch.zeros(64).pin_memory(), torch.cuda.Stream()
    prompt = list(range(300, 428))

    def kernel():
        x.add_(1)  # one ATen elementwise kernel

    def on_side():
        with torch.cuda.stream(side):
            kernel()

    def request(params):
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        REQUEST_MS.append(round((time.perf_counter() - start) * 1e3 / params.max_tokens, 3))

    top_p = SamplingParams(temperature=0.8, top_p=0.9, seed=1, ignore_eos=True, max_tokens=64)
    logprobs = SamplingParams(temperature=0, logprobs=2, ignore_eos=True, max_tokens=64)
    return {
        "replays only": lambda g: interleave(g, ROUNDS),
        "a host-to-device copy after each replay":
            lambda g: interleave(g, ROUNDS, lambda: x.copy_(pinned, non_blocking=True)),
        "a kernel after each of 5 replays": lambda g: interleave(g, 5, kernel),
        "a kernel after each of 10 replays": lambda g: interleave(g, 10, kernel),
        "a kernel after each of 20 replays": lambda g: interleave(g, ROUNDS, kernel),
        "a kernel after each of 20 replays, GPU idle":
            lambda g: interleave(g, ROUNDS, torch.cuda.synchronize, kernel),
        "a kernel after each of 20 replays, side stream": lambda g: interleave(g, ROUNDS, on_side),
        "a top-p request (full Sampler)": lambda g: request(top_p),
        "a greedy request with logprobs": lambda g: request(logprobs),
        "20 kernels, then a 1-token request": lambda g: (
            interleave(g, ROUNDS, kernel), request(SamplingParams(temperature=0, max_tokens=1))),
        "20 kernels, then a greedy 4-token request": lambda g: (
            interleave(g, ROUNDS, kernel), request(SamplingParams(temperature=0, ignore_eos=True, max_tokens=4))),
    }


@torch.inference_mode()
def engine_rows(names: list[str] | None = None) -> list[dict]:
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1, max_model_len=1024)
    for logprobs in (None, 2):  # the second captures the batch-1 logprobs graph before anything is timed
        llm.generate([list(range(100, 228))], SamplingParams(temperature=0, ignore_eos=True, max_tokens=16,
                                                             logprobs=logprobs), use_tqdm=False)
    runner = llm.engine.model_runner
    graphs, rows = runner.graphs, []
    table, scratch = actions(llm), torch.zeros(64, device="cuda")
    for name in names or [*table, "20 kernels before the first replay"]:
        graphs.slot_mapping.fill_(-1)  # the capture's eager forward stores nothing
        graph = graphs.graphs[1, False] = graphs._capture_one(runner.model, 1, False)
        if name == "20 kernels before the first replay":
            for _ in range(ROUNDS):
                scratch.add_(1)
            torch.cuda.synchronize()
            before = None
        else:
            before = bare_us(graph)
            REQUEST_MS.clear()
            table[name](graph)
        rows.append({"graph": "batch-1 decode", "action": name, "before_us": before, "after_us": bare_us(graph),
                     "again_us": bare_us(graph), "request_ms_per_token": REQUEST_MS[-1] if REQUEST_MS else None})
        print(json.dumps(rows[-1]), flush=True)
    llm.close()
    return rows


def small_graph_rows() -> list[dict]:
    src, dst, x = (torch.zeros(64, device="cuda") for _ in range(3))
    rows = []
    for kernels, pdl in ((50, False), (200, True)):
        for _ in range(3):  # compiled and loaded before the capture
            _pdl_copy_kernel[(1,)](src, dst, PDL=pdl, launch_pdl=pdl)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(kernels):
                _pdl_copy_kernel[(1,)](src, dst, PDL=pdl, launch_pdl=pdl)
        before = bare_us(graph)
        interleave(graph, ROUNDS, lambda: x.add_(1))
        rows.append({"graph": f"{kernels} {'PDL ' if pdl else ''}copy kernels",
                     "action": "a kernel after each of 20 replays", "before_us": before, "after_us": bare_us(graph),
                     "again_us": bare_us(graph)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--child", action="store_true", help="only the engine rows, as JSON (PDL-off run)")
    args = parser.parse_args()
    if args.child:
        return print(json.dumps(engine_rows(["replays only", "a kernel after each of 20 replays",
                                             "a top-p request (full Sampler)",
                                             "a greedy request with logprobs"])))
    card, tag = card_name()
    rows = engine_rows() + small_graph_rows()
    no_pdl = child_json(sys.argv[0], "--child", env={**os.environ, "NANOVLLM_PDL": "0"})
    for row in no_pdl:
        row["graph"] += ", NANOVLLM_PDL=0"
    rows += no_pdl
    for row in rows:
        row["slower_us"] = None if row["before_us"] is None else round(row["again_us"] - row["before_us"], 1)
    path = os.path.join(args.out_dir, f"graph_taint-{tag}.json")
    write_json(path, {"card": card, "model": "Qwen3-0.6B architecture, random bf16 weights", "rows": rows})
    print("wrote", path)


if __name__ == "__main__":
    main()
