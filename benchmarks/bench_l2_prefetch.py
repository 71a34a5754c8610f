"""Does staging the next projection's weight in the L2, while a kernel waits, shorten a decode step?

    python benchmarks/bench_l2_prefetch.py [--out benchmarks/results/l2_prefetch-<card>.json]

A chain of decoder layers' projections (cuBLAS through F.linear, bf16, distinct weights per layer, so nothing
stays in the L2 from one layer to the next) with a *gap* kernel where the step has a kernel that reads little
from the HBM: the all-reduce after o_proj and down_proj of a TP-2 rank of Qwen3-8B (~8 µs on 2 x H100 at 145
to 256 rows, results/allreduce-h100.json), or every small kernel between Qwen3-0.6B's projections at batch 1.
The gap kernel spins for gap_us; with prefetch it first asks the L2 for the first prefetch_mb of the next
projection's weight (prefetch_l2 below). Each time is the median replay of one CUDA graph of the chain
(bench_allreduce.time_graph), per layer.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from bench_allreduce import time_graph
from bench_latency import card_name, write_json
from triton.language.extra.cuda import globaltimer

CHUNK = 16384  # bytes per prefetch instruction


@triton.jit
def prefetch_l2(addr, nbytes, pid, programs, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Asks the L2 for bytes [addr, addr + nbytes) (an int64 address, 16-byte aligned; nbytes a multiple of
    16), shared among `programs` programs of which this is `pid`: LANES chunks at a time, one per thread, each
    one `cp.async.bulk.prefetch.L2` (sm_90), issued to the copy engine and not awaited."""
    chunks = (nbytes + CHUNK - 1) // CHUNK
    for first in range(pid * LANES, chunks, programs * LANES):
        index = (first + tl.arange(0, LANES)).to(tl.int64)
        size = tl.minimum(nbytes - index * CHUNK, CHUNK).to(tl.int32)  # <= 0 past the end: skipped
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [addr + index * CHUNK, size], dtype=tl.int32, is_pure=False, pack=1)


# (name, rows, per-layer (N, K) of qkv, o, gate_up, down, gaps, layers): gaps = after which projections a gap
# kernel runs (index into the four), each prefetching the following projection's weight
SCENARIOS = [
    ("qwen3-8b-tp2", (64, 145, 256), [(3072, 4096), (4096, 2048), (12288, 4096), (4096, 6144)], (1, 3), 8),
    ("qwen3-0.6b-tp1", (1, 8), [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)], (0, 1, 2, 3), 28),
]


@triton.jit
def _gap_kernel(addr, nbytes, gap_ns, PREFETCH: tl.constexpr, CHUNK: tl.constexpr, LANES: tl.constexpr):
    start = globaltimer()
    if PREFETCH:
        prefetch_l2(addr, nbytes, tl.program_id(0), tl.num_programs(0), CHUNK, LANES)
    now = globaltimer()
    while now - start < gap_ns:
        now = globaltimer()


def gap(weight: torch.Tensor, prefetch_bytes: int, gap_ns: int, programs: int = 8) -> None:
    nbytes = min(prefetch_bytes, weight.numel() * weight.element_size()) // 16 * 16
    _gap_kernel[(programs,)](weight.data_ptr(), nbytes, gap_ns, PREFETCH=nbytes > 0, CHUNK=CHUNK, LANES=128,
                             num_warps=4)


def run_scenario(name, rows_list, shapes, gaps, layers, gap_us_list, prefetch_mb_list) -> list[dict]:
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes]
               for _ in range(layers)]
    flat = [w for layer in weights for w in layer]  # the chain's projections in order
    results = []
    for rows in rows_list:
        inputs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]

        def chain(gap_ns, prefetch_bytes):
            for i, w in enumerate(flat):
                F.linear(inputs[i % 4], w)
                if gap_ns and i % 4 in gaps:
                    gap(flat[(i + 1) % len(flat)], prefetch_bytes, gap_ns)

        gemms_us = time_graph(lambda: chain(0, 0), repeat=1) / layers
        for gap_us in gap_us_list:
            row = {"scenario": name, "rows": rows, "gap_us": gap_us, "gemms_only_us_per_layer": round(gemms_us, 2)}
            for mb in prefetch_mb_list:
                us = time_graph(lambda: chain(int(gap_us * 1e3), int(mb * 2**20)), repeat=1) / layers  # noqa: B023
                row[f"prefetch_{mb}mb_us_per_layer"] = round(us, 2)
            base = row[f"prefetch_{prefetch_mb_list[0]}mb_us_per_layer"]
            best = min(v for k, v in row.items() if k.startswith("prefetch"))
            row["best_saving_us_per_layer"] = round(base - best, 2)
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    card, tag = card_name()
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"l2_prefetch-{tag}.json")
    rows = []
    rows += run_scenario(*SCENARIOS[0], gap_us_list=(8,), prefetch_mb_list=(0, 4, 8, 16, 24, 32))
    rows += run_scenario(*SCENARIOS[1], gap_us_list=(2, 4), prefetch_mb_list=(0, 2, 4, 8, 12))
    write_json(out, {"card": card, "chunk_bytes": CHUNK, "rows": rows})
    print("wrote", out)


if __name__ == "__main__":
    main()
