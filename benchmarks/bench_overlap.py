"""Can a prefill chunk's all-reduce run under its own projection? Row-parallel projection + all-reduce + add +
RMSNorm of a TP-2 rank of Qwen3-8B (o_proj: K 2048, down_proj: K 6144, N 4096, bf16) at prefill sizes.

    torchrun --nproc-per-node 2 benchmarks/bench_overlap.py [--out overlap.json]

serial: the engine today: the cuBLAS projection into the slot, then the pull kernel (kernels/all_reduce.py)
sums, adds and normalizes. chunked_k*_p*: the rows in k chunks; chunk j's all-reduce runs on a second, high-
priority stream while chunk j + 1 is projected, the kernel limited to p programs of r rows at a time, so the
projection keeps most SMs. gemm_us / ar_us: each alone (ar_p*_r*: the kernel limited so); chunked_same_bits:
chunks of 4 store the serial path's bits. µs per call, eager (as prefill runs), the mean of ITERS calls after
a barrier, rank 0's clock; *_graph_us: the same captured in a CUDA graph (no launch costs).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

from nanovllm.distributed.all_reduce import SymmMemAllReduce
from nanovllm.kernels.all_reduce import one_shot_all_reduce_add_rmsnorm

HIDDEN, EPS, ITERS = 4096, 1e-6, 20
PROJECTIONS = {"o_proj": 2048, "down_proj": 6144}  # K per rank
ROWS = (2048, 8192)
CHUNKED = [(4, 128, 1), (2, 32, 4), (4, 32, 4), (4, 32, 8), (4, 64, 4), (8, 32, 4)]  # (chunks, programs, block_rows)
ALONE = [(32, 4), (64, 4)]  # (programs, block_rows) of the all-reduce alone


def timed(fn) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(ITERS):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / ITERS


def timed_graph(fn) -> float:
    """The same, fn(0) and fn(1) captured in one CUDA graph (no launch costs), replayed ITERS times."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(0)
        fn(1)
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(ITERS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / ITERS / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="overlap.json")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    comm = SymmMemAllReduce(dist.group.WORLD.group_name, device, world)
    side = torch.cuda.Stream(priority=-1)
    weight_norm = torch.ones(HIDDEN, device=device)
    rows_out = []
    for name, k in PROJECTIONS.items():
        w = torch.randn(HIDDEN, k, device=device, dtype=torch.bfloat16) * 0.02
        for rows in ROWS:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            residual = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16)
            stream_out, normed_out = torch.empty_like(residual), torch.empty_like(residual)
            plain = torch.empty_like(residual)

            def ar(slot, res, out, programs=128, block_rows=1):
                return one_shot_all_reduce_add_rmsnorm(slot, res, weight_norm, EPS, comm.signal, comm.offsets,
                                                       rank, world, max_programs=programs, out=out,
                                                       block_rows=block_rows)

            def serial(i=0):
                slot = comm.slot(i % 2, (rows, HIDDEN), torch.bfloat16)
                torch.mm(x, w.t(), out=slot)
                ar(slot, residual, (stream_out, normed_out))

            def chunked(chunks, programs, block_rows, i=0):
                slot = comm.slot(i % 2, (rows, HIDDEN), torch.bfloat16)
                size, main_stream = rows // chunks, torch.cuda.current_stream()  # the capture's, in a graph
                for j in range(chunks):
                    part = slice(j * size, (j + 1) * size)
                    torch.mm(x[part], w.t(), out=slot[part])
                    side.wait_stream(main_stream)
                    with torch.cuda.stream(side):
                        ar(slot[part], residual[part], (stream_out[part], normed_out[part]), programs, block_rows)
                main_stream.wait_stream(side)

            row = {"projection": name, "rows": rows,
                   "gemm_us": timed(lambda i=0: torch.mm(x, w.t(), out=plain)),
                   "ar_us": timed(lambda i=0: ar(comm.slot(i % 2, (rows, HIDDEN), torch.bfloat16), residual,
                                                 (stream_out, normed_out))),
                   "serial_us": timed(serial), "serial_graph_us": timed_graph(serial)}
            for programs, block_rows in ALONE:
                row[f"ar_p{programs}_r{block_rows}_us"] = timed(
                    lambda i=0: ar(comm.slot(i % 2, (rows, HIDDEN), torch.bfloat16), residual,  # noqa: B023
                                   (stream_out, normed_out), programs, block_rows))  # noqa: B023
            for chunks, programs, block_rows in CHUNKED:
                run = lambda i=0: chunked(chunks, programs, block_rows, i)  # noqa: B023, E731
                row[f"chunked_k{chunks}_p{programs}_r{block_rows}_us"] = timed(run)
                row[f"chunked_k{chunks}_p{programs}_r{block_rows}_graph_us"] = timed_graph(run)
            serial()
            expected = stream_out.clone(), normed_out.clone()
            chunked(4, 32, 8)
            row["chunked_same_bits"] = torch.equal(stream_out, expected[0]) and torch.equal(normed_out, expected[1])
            row = {key: round(v, 1) if isinstance(v, float) else v for key, v in row.items()}
            if rank == 0:
                print(json.dumps(row), flush=True)
            rows_out.append(row)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "world_size": world, "rows": rows_out}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
