"""The symmetric-memory all-reduce on two GPUs, and on four where there are (skipped with fewer): nanovllm's
kernels against the rank-order sum at odd sizes and dtypes, many calls back to back with the slots
alternating as the decoder layers alternate them, so a rank that runs ahead into the next call while a peer
still reads the last one would show as a wrong sum; and the same with the decoder's residual add and
RMSNorm in the kernel, its 16-bit messages through the push kernel in five calls of eight and through the
pull kernel in the others; messages outside the slots, copied into the buffer's halves in turn. And a peer
that never comes: each kernel must fail after the timeout instead of waiting forever."""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

CALLS = 64
CASES = [(1, torch.float32), (3, torch.bfloat16), (4097, torch.float32), (5000, torch.float16),
         (256 * 4096, torch.bfloat16)]  # the last: a batch-256 decode step of a 4096-wide model
# messages outside the slots (the embedding's), copied in; the last fills a half of the buffer's first part
GENERIC_CASES = [(6, torch.bfloat16), (5000, torch.float16), (4097, torch.float32), (8 * 2**20, torch.bfloat16)]
# (rows, hidden, dtype): the decoder's all-reduce + add + RMSNorm; the last fills the push kernel's inbox
NORM_CASES = [(1, 4096, torch.bfloat16), (3, 200, torch.float32), (200, 1024, torch.bfloat16),
              (256, 4096, torch.bfloat16), (7, 1000, torch.float16), (512, 4096, torch.bfloat16)]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA devices")


def parts(rank: int, call: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(1000 * call + rank)
    return torch.randn(numel, generator=gen, device="cuda").to(dtype)


def lag(rank: int, call: int) -> None:
    """Makes one rank busy for ~25 us before some calls, so the other runs ahead into its next call (and
    writes its other slot) while this one still has to read: what the missing end barrier must survive."""
    if call % 5 == 2 * rank:
        torch.cuda._sleep(50_000)  # GPU clock cycles


def _worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    from nanovllm.distributed.all_reduce import PUSH_MAX_BYTES, SymmMemAllReduce
    from nanovllm.kernels.all_reduce import all_reduce_add_rmsnorm_ref, all_reduce_ref
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            device_id=device)
    comm = SymmMemAllReduce(dist.group.WORLD.group_name, device, world_size)
    try:
        for numel, dtype in CASES:
            inputs = [parts(rank, call, numel, dtype) for call in range(CALLS)]
            sums = []
            for call in range(CALLS):  # no sync in between, and each rank now and then falls behind
                lag(rank, call)
                slot = comm.slot(call % 2, (numel,), dtype)
                slot.copy_(inputs[call])  # what a projection writing into its slot does
                sums.append(comm(slot))
            for call in range(CALLS):
                expected = all_reduce_ref([parts(r, call, numel, dtype) for r in range(world_size)])
                assert torch.equal(sums[call], expected), (numel, dtype, call)
        for numel, dtype in GENERIC_CASES:
            sums = []
            for call in range(CALLS):
                lag(rank, call)
                x = parts(rank, call, numel, dtype)
                assert comm.fits(x) and not comm.in_slot(x)
                sums.append(comm(x))  # in place
            for call in range(CALLS):
                expected = all_reduce_ref([parts(r, call, numel, dtype) for r in range(world_size)])
                assert torch.equal(sums[call], expected), ("copied in", numel, dtype, call)
        for rows, n, dtype in NORM_CASES:
            residual, weight = parts(99, 0, rows * n, dtype).view(rows, n), parts(98, 0, n, torch.float32) + 2
            results = []
            for call in range(CALLS):
                lag(rank, call)
                comm.push_max_bytes = PUSH_MAX_BYTES if call % 8 < 5 else 0  # 16-bit: push, push, ..., pull, pull
                slot = comm.slot(call % 2, (rows, n), dtype)
                slot.copy_(parts(rank, call, rows * n, dtype).view(rows, n))
                results.append(comm.add_rmsnorm(slot, residual, weight if call % 3 else None, 1e-6))
            for call, (stream, normed) in enumerate(results):
                partials = [parts(r, call, rows * n, dtype).view(rows, n) for r in range(world_size)]
                ref_stream, ref_normed = all_reduce_add_rmsnorm_ref(partials, residual, weight if call % 3 else None,
                                                                    1e-6)
                assert torch.equal(stream, ref_stream), (rows, n, dtype, call)
                assert (normed is None) == (ref_normed is None)
                if normed is not None:  # fp64 vs fp32 mean: at most one rounding step apart
                    torch.testing.assert_close(normed, ref_normed, rtol=1e-2, atol=1e-2)
        dist.barrier()
    finally:
        del comm
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_reduce_kernels_on_the_gpus_sum_every_call_in_rank_order(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} CUDA devices")
    context = mp.start_processes(_worker, args=(world_size, free_port()), nprocs=world_size, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:  # a barrier that never met: fail instead of hanging CI
            for process in context.processes:
                process.kill()
            pytest.fail("the all-reduce workers did not finish in 240 s")


def _absent_peer_worker(rank: int, port: int, path: str, report: str) -> None:
    """Rank 0 all-reduces through `path` with a 2 s timeout; rank 1 joins the buffer, then never calls and
    stays alive (its memory mapped) until rank 0 has reported."""
    import torch.distributed as dist

    from nanovllm.distributed.all_reduce import SymmMemAllReduce
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=device)
    comm = SymmMemAllReduce(dist.group.WORLD.group_name, device, 2, timeout_s=2.0)
    if rank == 1:
        deadline = time.monotonic() + 120
        while not os.path.exists(report) and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)
    start, outcome = time.monotonic(), "returned"
    try:
        if path == "generic":
            comm(torch.ones(1000, device=device))
        else:
            comm.push_max_bytes = 0 if path == "pull" else comm.push_max_bytes
            slot = comm.slot(0, (4, 4096), torch.bfloat16).fill_(1)
            comm.add_rmsnorm(slot, torch.zeros_like(slot), torch.ones(4096, device=device), 1e-6)
        torch.cuda.synchronize()
    except RuntimeError as e:  # the trap: the context is lost, so this process only reports and exits
        outcome = f"raised {type(e).__name__}: {str(e).splitlines()[0]}"
    with open(report + ".tmp", "w") as f:
        f.write(f"{outcome} after {time.monotonic() - start:.1f} s")
    os.rename(report + ".tmp", report)
    os._exit(0)


@pytest.mark.parametrize("path", ["push", "pull", "generic"])
def test_a_peer_that_never_comes_fails_the_kernel_after_the_timeout(path, tmp_path):
    """What a rank sees when its peer died mid-step: a CUDA error within seconds of the timeout (2 s here,
    plus the kernel's compile), not a step that waits forever."""
    report = str(tmp_path / "report")
    context = mp.start_processes(_absent_peer_worker, args=(free_port(), path, report), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 150
    while not context.join(timeout=2) and time.monotonic() < deadline:
        pass
    for process in context.processes:
        process.kill()
    assert os.path.exists(report), f"rank 0 did not report within 150 s ({path}): the kernel hung"
    outcome = open(report).read()
    print(path, outcome)
    assert outcome.startswith("raised") and float(outcome.split(" after ")[1].split()[0]) < 60, outcome
