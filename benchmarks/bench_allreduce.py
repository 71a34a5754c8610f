"""All-reduce latency on the GPUs of one host: NCCL against torch symmetric memory (one-shot and two-shot),
inside CUDA graphs, at the message sizes tensor parallelism sends (batch x hidden x bf16).

    torchrun --nproc-per-node 2 benchmarks/bench_allreduce.py [--out allreduce.json]

Each graph holds REPEAT all-reduces back to back; the time per all-reduce is the median replay over REPEAT.
"""
import argparse
import json

import torch
import torch.distributed as dist

REPEAT, REPLAYS = 20, 30
SIZES = [4096 * n for n in (1, 2, 8, 32, 64, 128, 256)]  # elements: hidden 4096 x batch 1 .. 256


def time_graph(fn) -> float:
    """Median microseconds per call of `fn` captured REPEAT times in one graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEAT):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPEAT)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    group_name = dist.group.WORLD.group_name
    import torch.distributed._symmetric_memory as symm_mem
    buf = symm_mem.empty(max(SIZES), dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(buf, group_name)
    rows = []
    for n in SIZES:
        x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        row = {"elements": n, "bytes": 2 * n, "nccl_us": time_graph(lambda: dist.all_reduce(x))}
        # Correctness of each symmetric-memory op against NCCL before timing it.
        ref = x.clone()
        dist.all_reduce(ref)
        for name, op in (("one_shot_us", lambda: torch.ops.symm_mem.one_shot_all_reduce_out(
                              buf[:n], "sum", group_name, x)),
                         ("two_shot_us", lambda: torch.ops.symm_mem.two_shot_all_reduce_(
                              buf[:n], "sum", group_name))):
            try:
                buf[:n].copy_(x)
                op()
                got = x if name == "one_shot_us" else buf[:n]
                ok = torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)
                row[name] = time_graph(op) if ok else None
                row[name.replace("_us", "_ok")] = ok
            except Exception as e:  # report, don't die: the point is to learn what works on this box
                row[name] = None
                row[name.replace("_us", "_error")] = repr(e)[:300]
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "card": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
