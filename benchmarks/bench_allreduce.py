"""All-reduce latency on the GPUs of one host: NCCL against torch symmetric memory, inside CUDA graphs, at
the message sizes tensor parallelism sends (tokens x hidden 4096 x bf16: decode batches 1..256, prefill
chunks up to 8192 tokens).

    torchrun --nproc-per-node 2 benchmarks/bench_allreduce.py [--out allreduce.json]

Columns (microseconds per all-reduce, each checked against NCCL's sum first: *_same_bits):
  nccl_us          dist.all_reduce in place
  one_shot_us      one_shot_all_reduce_out, data already in the buffer (no copies)
  two_shot_us      two_shot_all_reduce_ in the buffer (no copies)
  one_shot_copy_us one_shot_all_reduce_copy_out: copy in fused, sum written to the caller's tensor
  two_shot_copy_us copy into the buffer, then two_shot_all_reduce_out to the caller's tensor
  nanovllm_us      nanovllm's all_reduce (distributed/all_reduce.py): one of the two above by size
The last three are what an engine pays; the first two are the kernels alone. Each graph holds REPEAT
all-reduces back to back; the time per all-reduce is the median replay over REPEAT.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

REPEAT, REPLAYS = 20, 30
HIDDEN = 4096
TOKENS = [1, 2, 8, 32, 64, 128, 256, 1024, 8192]  # decode batches, then prefill chunks


def time_graph(fn) -> float:
    """Median microseconds per call of `fn` captured REPEAT times in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
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


def candidates(comm, x: torch.Tensor) -> dict:
    """name -> (op, the tensor that holds the sum afterwards)."""
    group, n = comm.group_name, x.numel()
    symm = comm.buffer[:2 * n].view(torch.bfloat16)
    ops = torch.ops.symm_mem

    def two_shot_copy():
        symm.copy_(x)
        ops.two_shot_all_reduce_out(symm, "sum", group, x)
    return {
        "one_shot_us": (lambda: ops.one_shot_all_reduce_out(symm, "sum", group, x), x),
        "two_shot_us": (lambda: ops.two_shot_all_reduce_(symm, "sum", group), symm),
        "one_shot_copy_us": (lambda: ops.one_shot_all_reduce_copy_out(symm, x, "sum", group, x), x),
        "two_shot_copy_us": (two_shot_copy, x),
        "nanovllm_us": (lambda: comm(x), x),
    }


def measure(comm, tokens: int, rank: int) -> dict:
    n = tokens * HIDDEN
    gen = torch.Generator(device="cuda").manual_seed(rank)
    data = torch.randn(n, generator=gen, device="cuda").to(torch.bfloat16)  # (n,) differs per rank
    ref = data.clone()
    dist.all_reduce(ref)
    x = data.clone()
    row = {"tokens": tokens, "bytes": 2 * n, "nccl_us": time_graph(lambda: dist.all_reduce(x))}
    for name, (op, result) in candidates(comm, x).items():
        try:  # correctness first, against NCCL's sum of the same data
            comm.buffer[:2 * n].view(torch.bfloat16).copy_(data)  # the no-copy kernels read it from here
            x.copy_(data)
            op()
            # Two ranks: a + b rounded once by every method, so the very same bits are expected.
            row[name.replace("_us", "_same_bits")] = torch.equal(result, ref)
            ok = torch.allclose(result.float(), ref.float(), rtol=1e-2, atol=1e-2)
            row[name] = time_graph(op) if ok else None
        except Exception as e:  # report, don't die: the point is to learn what works on this box
            row[name] = None
            row[name.replace("_us", "_error")] = repr(e)[:300]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # peer-to-peer kernels only
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    from nanovllm.distributed import all_reduce
    comm = all_reduce.SymmMemAllReduce(dist.group.WORLD.group_name, torch.device("cuda", rank))
    rows = []
    for tokens in TOKENS:
        rows.append(measure(comm, tokens, rank))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "card": torch.cuda.get_device_name(),
                       "one_shot_max_bytes": all_reduce.ONE_SHOT_MAX_BYTES, "max_bytes": all_reduce.MAX_BYTES,
                       "rows": rows}, f, indent=1)
    dist.barrier()
    del comm
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
