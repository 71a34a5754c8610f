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
  nanovllm_us      nanovllm's all_reduce (distributed/all_reduce.py) of a tensor outside the buffer: one of
                   the two above by size
  slot_us          nanovllm's one-shot kernel (kernels/all_reduce.py) on a message already in a slot of the
                   buffer, as a row-parallel projection leaves it: what the engine's decoder layers pay
  slot_p*_b*_w*_us the same kernel with other launch shapes (programs, elements per round, warps)
  slot_add_rmsnorm_us  the decoder layers' kernel: the same sum of (tokens, 4096) rows, plus a residual
                   add and an RMSNorm (timed only: tests/test_gpu_all_reduce.py checks it)
  push_add_rmsnorm_us  the same through the push kernel (stores into the peers' inboxes, no flags), up to
                   PUSH_MAX_BYTES; push_same_bits: its stream and normed rows equal the pull kernel's
  push_p*_w*_us    the push kernel with other launch shapes (most programs, warps)
slot_us and the three before it are what an engine pays; the first two are the kernels alone. Each graph holds REPEAT
all-reduces back to back; the time per all-reduce is the median replay over REPEAT.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

from nanovllm.distributed.all_reduce import PUSH_MAX_BYTES

REPEAT, REPLAYS = 20, 30
HIDDEN = 4096
TOKENS = [1, 2, 8, 32, 64, 128, 145, 256, 512, 1024, 2048, 8192]  # decode batches, then prefill chunks


def time_graph(fn, repeat: int = REPEAT) -> float:
    """Median microseconds per call of `fn` captured `repeat` times in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
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
        times.append(start.elapsed_time(end) * 1e3 / repeat)
    return sorted(times)[len(times) // 2]


SLOT_SHAPES = [(16, 1024, 4), (32, 1024, 4), (64, 1024, 4), (128, 1024, 4), (32, 2048, 8), (64, 2048, 8),
               (128, 2048, 8), (64, 4096, 16), (128, 4096, 16)]  # (programs, block, warps)


def candidates(comm, x: torch.Tensor, slot: torch.Tensor) -> dict:
    """name -> (op, the tensor that holds the sum afterwards)."""
    from nanovllm.kernels.all_reduce import one_shot_all_reduce
    group, n = comm.group_name, x.numel()
    symm = comm.buffer[:2 * n].view(torch.bfloat16)
    ops = torch.ops.symm_mem
    out = torch.empty_like(slot) if slot is not None else None

    def slot_op(programs=None, block=None, warps=None):
        if programs is None:
            return lambda: one_shot_all_reduce(slot, out, comm.signal, comm.offsets, comm.rank, comm.world_size)
        return lambda: one_shot_all_reduce(slot, out, comm.signal, comm.offsets, comm.rank, comm.world_size,
                                           programs, block, warps)
    shapes = {f"slot_p{p}_b{b}_w{w}_us": (slot_op(p, b, w), out) for p, b, w in SLOT_SHAPES}
    slots = {"slot_us": (slot_op(), out), **shapes} if slot is not None else {}  # None: over a slot
    if slot is not None:
        rows = slot.view(-1, HIDDEN)
        residual, weight = torch.zeros_like(rows), torch.ones(HIDDEN, device=x.device)
        slots["slot_add_rmsnorm_us"] = (add_rmsnorm(comm, rows, residual, weight, push=False), None)
        if slot.numel() * 2 <= PUSH_MAX_BYTES:
            slots["push_add_rmsnorm_us"] = (add_rmsnorm(comm, rows, residual, weight, push=True), None)
            for programs, warps in PUSH_SHAPES:
                slots[f"push_p{programs}_w{warps}_us"] = (push_shape(comm, rows, residual, weight, programs, warps),
                                                          None)

    def two_shot_copy():
        symm.copy_(x)
        ops.two_shot_all_reduce_out(symm, "sum", group, x)
    return {
        "one_shot_us": (lambda: ops.one_shot_all_reduce_out(symm, "sum", group, x), x),
        "two_shot_us": (lambda: ops.two_shot_all_reduce_(symm, "sum", group), symm),
        "one_shot_copy_us": (lambda: ops.one_shot_all_reduce_copy_out(symm, x, "sum", group, x), x),
        "two_shot_copy_us": (two_shot_copy, x),
        "nanovllm_us": (lambda: comm(x), x),
        **slots,
    }


def add_rmsnorm(comm, rows: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, push: bool):
    """The decoder's all-reduce + add + RMSNorm of a slot, through the push kernel or the pull kernel."""
    def op():
        comm.push_max_bytes = PUSH_MAX_BYTES if push else 0
        return comm.add_rmsnorm(rows, residual, weight, 1e-6)
    return op


PUSH_SHAPES = [(128, 16), (128, 8), (256, 8), (256, 16)]  # (most programs, warps) of the push kernel


def push_shape(comm, rows, residual, weight, programs: int, warps: int):
    from nanovllm.kernels.all_reduce import push_all_reduce_add_rmsnorm
    return lambda: push_all_reduce_add_rmsnorm(rows, residual, weight, 1e-6, comm.inbox, comm.calls, comm.offsets,
                                               comm.rank, comm.world_size, programs, warps)


def measure(comm, tokens: int, rank: int) -> dict:
    n = tokens * HIDDEN
    gen = torch.Generator(device="cuda").manual_seed(rank)
    data = torch.randn(n, generator=gen, device="cuda").to(torch.bfloat16)  # (n,) differs per rank
    ref = data.clone()
    dist.all_reduce(ref)
    x = data.clone()
    row = {"tokens": tokens, "bytes": 2 * n, "nccl_us": time_graph(lambda: dist.all_reduce(x))}
    slot = comm.slot(0, (n,), torch.bfloat16)
    if slot is not None and 2 * n <= PUSH_MAX_BYTES:  # push and pull: the same bits, from another residual
        rows, residual = slot.view(-1, HIDDEN), data.view(-1, HIDDEN).flip(0)
        weight = torch.rand(HIDDEN, device=x.device) + 0.5
        outs = []
        for push in (True, False):
            slot.copy_(data)
            outs.append(add_rmsnorm(comm, rows, residual, weight, push)())
        row["push_same_bits"] = all(torch.equal(a, b) for a, b in zip(*outs))
    for name, (op, result) in candidates(comm, x, slot).items():
        if result is None:
            row[name] = time_graph(op)
            continue
        try:  # correctness first, against NCCL's sum of the same data
            comm.buffer[:2 * n].view(torch.bfloat16).copy_(data)  # the no-copy kernels read it from here
            if slot is not None:
                slot.copy_(data)
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
    comm = all_reduce.SymmMemAllReduce(dist.group.WORLD.group_name, torch.device("cuda", rank), dist.get_world_size())
    rows = []
    for tokens in TOKENS:
        rows.append(measure(comm, tokens, rank))
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "card": torch.cuda.get_device_name(),
                       "one_shot_max_bytes": all_reduce.ONE_SHOT_MAX_BYTES, "max_bytes": all_reduce.MAX_BYTES,
                       "push_max_bytes": PUSH_MAX_BYTES,
                       "rows": rows}, f, indent=1)
    dist.barrier()
    del comm
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
