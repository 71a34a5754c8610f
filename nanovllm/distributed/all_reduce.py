"""The tensor-parallel all-reduce on the GPUs of one host, through symmetric memory.

Every rank maps one persistent buffer of every other rank (a rendezvous at init), so an all-reduce is a
kernel that reads the peers' buffers over NVLink and syncs through flags: no NCCL protocol, no proxy.

Row-parallel layers ask for a *slot* of the buffer (`slot`), write their partial product there, and the
all-reduce is then nanovllm's one-shot kernel alone (kernels/all_reduce.py: no copy, one barrier, every
rank reads the peers' slots in place), which can also add the residual and apply the next RMSNorm
(`add_rmsnorm`). Two slots, because that kernel has no barrier at its end: consecutive all-reduces must
alternate between them (layers/linear.py). On 2 x H200 in CUDA graphs (benchmarks/results/allreduce-h200.json)
it takes 4.5 us at 8 KB and 11.6 us at 2 MB (batch 1 and 256 of a 4096-wide model in bf16), NCCL 10.2 and
29.7 us. Up to PUSH_MAX_BYTES of 16 bits, `add_rmsnorm` takes the push kernel instead: every rank stores its
slot into the peers' inboxes (a third part of the buffer) and reads only local memory, no flags.

Any other tensor is copied into the buffer's first part, reduced by torch's kernels, and the sum lands back
in the caller's tensor: up to ONE_SHOT_MAX_BYTES one kernel that copies in and sums (one-shot: each rank
reads the whole message of every peer), above it a copy and the two-shot kernel (each rank sums 1/tp of the
message, then every rank gathers the sums): 7.3 and 20.4 us at the sizes above.

Only peer-to-peer kernels are used, never NVLink multicast (multimem): the buffer is created without a
multicast object. Messages that do not fit (over the buffer, another dtype, odd sizes) take NCCL.
Opt-in with NANOVLLM_SYMM_MEM=1; by default everything takes NCCL.

Unlike NCCL's, these kernels wait for their peers without a timeout: a peer that dies mid-step leaves the
step waiting forever instead of failing after the collective timeout.
"""
import math
import os

import torch

MAX_BYTES = 64 * 2**20  # 8192 tokens x 4096 hidden x bf16, vLLM's cap for 2 x H100 too; larger goes to NCCL
ONE_SHOT_MAX_BYTES = 256 * 2**10  # below: one fused kernel beats copy + two-shot (estimated; see bench_allreduce)
WORLD_SIZES = (2, 4, 8)  # the sizes torch's two-shot kernel is built for
DTYPES = (torch.bfloat16, torch.float32)  # the dtypes torch's kernels reduce
SLOT_BYTES = MAX_BYTES  # per slot at two ranks: an 8192-token prefill chunk at hidden 4096 in bf16
# Per slot at more ranks: larger messages copy in for torch's two-shot kernel, as one-shot reads (tp - 1)
# messages per rank where two-shot moves 2 (tp - 1) / tp. Not measured beyond two GPUs.
ONE_SHOT_SLOT_MAX_BYTES = 16 * 2**20
SIGNAL_BYTES = 2**16  # the one-shot kernel's flags: world_size int32 per program
# Up to this many bytes a 16-bit slot's all-reduce + add + RMSNorm takes the push kernel (kernels/all_reduce.py:
# stores into the peers' inboxes, no flags), above it the pull kernel. On 2 x H100 in CUDA graphs
# (results/allreduce-h100.json, 4096 wide) push / pull took 3.6 / 6.7 us at one row, 4.3 / 6.6 at 8,
# 7.9 / 12.3 at 145, 11.2 / 14.6 at 256 and 18.0 / 20.8 at 512. The inbox holds two halves of world_size
# messages of this size. NANOVLLM_PUSH_MAX_BYTES=0 turns it off.
PUSH_MAX_BYTES = int(os.environ.get("NANOVLLM_PUSH_MAX_BYTES", 4 * 2**20)) // 64 * 64  # 512 tokens at 4096 wide


def symm_mem_requested() -> bool:
    """NANOVLLM_SYMM_MEM=1 asks for it. Opt-in although faster (on 2 x H200 TP 2 gives 1.66x the throughput of
    TP 1 with it, benchmarks/results/tp-h200.json, 1.45x with NCCL: tp-h200-with-nccl.json): a dead peer would
    hang it instead of failing."""
    return os.environ.get("NANOVLLM_SYMM_MEM", "0") == "1"


def symm_mem_supported(world_size: int, device: torch.device) -> bool:
    """CUDA ranks, one GPU each (rank r on cuda:r), that can all read each other's memory, a torch that has
    the two kernels, and a Triton that gives every thread the result of a vector atomic: before 3.5 only
    the owning thread got it (triton-lang/triton#7402), and the one-shot kernel's flag loop would spin."""
    if device.type != "cuda" or world_size not in WORLD_SIZES or not triton_broadcasts_atomics():
        return False
    if not all(hasattr(torch.ops.symm_mem, op) for op in ("one_shot_all_reduce_copy_out", "two_shot_all_reduce_out")):
        return False
    return all(torch.cuda.can_device_access_peer(device.index, peer)
               for peer in range(world_size) if peer != device.index)


def triton_broadcasts_atomics() -> bool:
    try:
        import triton
    except ImportError:
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 5)


def fits(dtype: torch.dtype, nbytes: int, contiguous: bool, max_bytes: int = MAX_BYTES) -> bool:
    """Whether a message goes through the buffer: a dtype the kernels reduce, 4-byte multiples (their
    narrowest vector), at most the buffer, and dense (the kernels walk flat memory)."""
    return dtype in DTYPES and contiguous and 0 < nbytes <= max_bytes and nbytes % 4 == 0


class SymmMemAllReduce:
    """One rank's side of the persistent buffer. Construct it on every rank of the group at the same
    point (the rendezvous is collective); drop it on every rank before the group goes."""

    def __init__(self, group_name: str, device: torch.device, world_size: int, max_bytes: int = MAX_BYTES):
        # Peer-to-peer only: without this torch would also try to bind the buffer to a multicast object.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed._symmetric_memory as symm_mem
        self.group_name, self.max_bytes = group_name, max_bytes
        # bytes, any dtype views it: [torch's kernels' area | signal | slot 0 | slot 1 | inbox]
        slot_bytes = SLOT_BYTES if world_size == 2 else ONE_SHOT_SLOT_MAX_BYTES
        inbox_bytes = 2 * world_size * PUSH_MAX_BYTES
        self.buffer = symm_mem.empty(max_bytes + SIGNAL_BYTES + 2 * slot_bytes + inbox_bytes, dtype=torch.uint8,
                                     device=device)
        handle = symm_mem.rendezvous(self.buffer, group_name)
        self.rank, self.world_size = handle.rank, handle.world_size
        mine = handle.buffer_ptrs[self.rank]
        self.offsets = torch.tensor([ptr - mine for ptr in handle.buffer_ptrs], dtype=torch.int64, device=device)
        assert all(ptr % 64 == 0 for ptr in handle.buffer_ptrs), "the kernel assumes 64-byte aligned buffers"
        self.signal = self.buffer[max_bytes:max_bytes + SIGNAL_BYTES].view(torch.int32)
        self.slots = self.buffer[max_bytes + SIGNAL_BYTES:][:2 * slot_bytes].view(2, slot_bytes)
        self.set_inbox(self.buffer[max_bytes + SIGNAL_BYTES + 2 * slot_bytes:])
        self.signal.zero_()
        handle.barrier()  # every rank's flags are zero before any rank's kernel sets one

    def set_inbox(self, memory: torch.Tensor) -> None:
        """The push kernel's state: its inbox, (2, world_size, PUSH_MAX_BYTES / 2) int16 of `memory` (bytes
        at the same place of every rank's buffer), all EMPTY, and its count of calls, zeros on every rank."""
        from nanovllm.kernels.all_reduce import EMPTY_BITS, PUSH_MAX_PROGRAMS
        self.push_max_bytes = PUSH_MAX_BYTES
        self.inbox = memory.view(torch.int16).view(2, self.world_size, -1).fill_(EMPTY_BITS)
        self.calls = torch.zeros(PUSH_MAX_PROGRAMS, dtype=torch.int32, device=memory.device)

    def slot(self, index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """Slot `index` (0 or 1) as a tensor of this shape and dtype, or None if the message is too large."""
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 < nbytes <= self.slots.shape[1]:
            return None
        return self.slots[index, :nbytes].view(dtype).view(shape)

    def in_slot(self, x: torch.Tensor) -> bool:
        """Whether x lies in a slot (`slot`): the one-shot kernel then sums it where it is."""
        start = self.slots.data_ptr()
        return start <= x.data_ptr() < start + self.slots.numel()

    def fits(self, x: torch.Tensor) -> bool:
        """Whether this all-reduces x: a slot's message (summed where it is), or one it can copy in."""
        if self.in_slot(x):
            return True
        # A view must start 16-byte aligned, as the buffer does: the kernels use one vector width for both.
        aligned = x.storage_offset() * x.element_size() % 16 == 0
        return aligned and fits(x.dtype, x.numel() * x.element_size(), x.is_contiguous(), self.max_bytes)

    def add_rmsnorm(self, slot: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sum over ranks of a (rows, n) slot + residual, its RMSNorm with weight or None), one kernel."""
        from nanovllm.kernels.all_reduce import one_shot_all_reduce_add_rmsnorm, push_all_reduce_add_rmsnorm
        if slot.element_size() == 2 and slot.numel() * 2 <= min(self.push_max_bytes, self.inbox.shape[2] * 2):
            return push_all_reduce_add_rmsnorm(slot, residual, weight, eps, self.inbox, self.calls, self.offsets,
                                               self.rank, self.world_size)
        return one_shot_all_reduce_add_rmsnorm(slot, residual, weight, eps, self.signal, self.offsets, self.rank,
                                               self.world_size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks into x (in place, as NCCL's all-reduce); every rank gets the same bits.
        A slot's message is summed into a new tensor instead, which is returned."""
        if self.in_slot(x):
            from nanovllm.kernels.all_reduce import one_shot_all_reduce
            return one_shot_all_reduce(x, torch.empty_like(x), self.signal, self.offsets, self.rank,
                                       self.world_size)
        nbytes = x.numel() * x.element_size()
        symm, flat = self.buffer[:nbytes].view(x.dtype), x.view(-1)  # (numel,) each
        if nbytes <= ONE_SHOT_MAX_BYTES:
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, flat, "sum", self.group_name, flat)
        else:
            symm.copy_(flat)
            torch.ops.symm_mem.two_shot_all_reduce_out(symm, "sum", self.group_name, flat)
        return x
