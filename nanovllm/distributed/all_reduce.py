"""The tensor-parallel all-reduce on the GPUs of one host, through torch symmetric memory.

Every rank maps one persistent buffer of every other rank (a rendezvous at init), so an all-reduce is a
kernel that reads the peers' buffers over NVLink and syncs through signal pads: no NCCL protocol, no
proxy. On 2 x H100 inside CUDA graphs (benchmarks/results/allreduce-h100.json) NCCL took 9.6 us at 8 KB
and 30.6 us at 2 MB (batch 1 and 256 of a 4096-wide model in bf16), torch's two-shot kernel 7.5 and
13.8 us. A message is copied into the buffer, reduced, and the sum lands back in the caller's tensor: up
to ONE_SHOT_MAX_BYTES one kernel that copies in and sums (one-shot: each rank reads the whole message of
every peer), above it a copy and the two-shot kernel (each rank sums 1/tp of the message, then every rank
gathers the sums).

Only peer-to-peer kernels are used, never NVLink multicast (multimem): the buffer is created without a
multicast object. Messages that do not fit (over the buffer, another dtype, odd sizes) take NCCL.
Opt-in with NANOVLLM_SYMM_MEM=1; by default everything takes NCCL.

Unlike NCCL's, these kernels wait for their peers without a timeout: a peer that dies mid-step leaves the
step waiting forever instead of failing after the collective timeout.
"""
import os

import torch

MAX_BYTES = 64 * 2**20  # 8192 tokens x 4096 hidden x bf16, vLLM's cap for 2 x H100 too; larger goes to NCCL
ONE_SHOT_MAX_BYTES = 256 * 2**10  # below: one fused kernel beats copy + two-shot (estimated; see bench_allreduce)
WORLD_SIZES = (2, 4, 8)  # the sizes torch's two-shot kernel is built for
DTYPES = (torch.bfloat16, torch.float32)  # the dtypes torch's kernels reduce


def symm_mem_requested() -> bool:
    """NANOVLLM_SYMM_MEM=1 asks for it. Opt-in: on 2 x H100 it did not move the engine's throughput (1.38x
    vs NCCL's 1.40x over TP 1, in two calls), and a dead peer would hang it instead of failing (below)."""
    return os.environ.get("NANOVLLM_SYMM_MEM", "0") == "1"


def symm_mem_supported(world_size: int, device: torch.device) -> bool:
    """CUDA ranks, one GPU each (rank r on cuda:r), that can all read each other's memory, and a torch that
    has the two kernels."""
    if device.type != "cuda" or world_size not in WORLD_SIZES:
        return False
    if not all(hasattr(torch.ops.symm_mem, op) for op in ("one_shot_all_reduce_copy_out", "two_shot_all_reduce_out")):
        return False
    return all(torch.cuda.can_device_access_peer(device.index, peer)
               for peer in range(world_size) if peer != device.index)


def fits(dtype: torch.dtype, nbytes: int, contiguous: bool, max_bytes: int = MAX_BYTES) -> bool:
    """Whether a message goes through the buffer: a dtype the kernels reduce, 4-byte multiples (their
    narrowest vector), at most the buffer, and dense (the kernels walk flat memory)."""
    return dtype in DTYPES and contiguous and 0 < nbytes <= max_bytes and nbytes % 4 == 0


class SymmMemAllReduce:
    """One rank's side of the persistent buffer. Construct it on every rank of the group at the same
    point (the rendezvous is collective); drop it on every rank before the group goes."""

    def __init__(self, group_name: str, device: torch.device, max_bytes: int = MAX_BYTES):
        # Peer-to-peer only: without this torch would also try to bind the buffer to a multicast object.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed._symmetric_memory as symm_mem
        self.group_name, self.max_bytes = group_name, max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)  # bytes: any dtype views it
        symm_mem.rendezvous(self.buffer, group_name)

    def fits(self, x: torch.Tensor) -> bool:
        # A view must start 16-byte aligned, as the buffer does: the kernels use one vector width for both.
        aligned = x.storage_offset() * x.element_size() % 16 == 0
        return aligned and fits(x.dtype, x.numel() * x.element_size(), x.is_contiguous(), self.max_bytes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks into x (in place, as NCCL's all-reduce); every rank gets the same bits."""
        nbytes = x.numel() * x.element_size()
        symm, flat = self.buffer[:nbytes].view(x.dtype), x.view(-1)  # (numel,) each
        if nbytes <= ONE_SHOT_MAX_BYTES:
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, flat, "sum", self.group_name, flat)
        else:
            symm.copy_(flat)
            torch.ops.symm_mem.two_shot_all_reduce_out(symm, "sum", self.group_name, flat)
        return x
