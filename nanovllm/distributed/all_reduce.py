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

Any other tensor (the vocab-parallel embedding's rows) is copied into one half of the buffer's first part and
summed by the one-shot kernel into the caller's tensor. Calls alternate between the two halves, for the reason
the slots alternate.

Only peer-to-peer kernels are used, never NVLink multicast (multimem): the buffer is created without a
multicast object. Messages that do not fit (over the buffer, another dtype, odd sizes) take NCCL.

On by default where supported; NANOVLLM_SYMM_MEM=0 takes NCCL for everything. Every kernel's wait on a peer
ends after the group's timeout with a trap (kernels/all_reduce.py), so a peer that dies mid-step fails the
step, as NCCL's collective timeout would, instead of hanging it.

torch (2.11 at least) numbers a process's rendezvous exchanges per process (pytorch/pytorch#196082), so a
second group in one process, e.g. a second tensor-parallel engine after the first closed, would wait on keys
that its fresh workers never write. Such a group takes NCCL (`symm_mem_fresh`).
"""
import math
import os

import torch

from nanovllm.kernels.all_reduce import TIMEOUT_S

MAX_BYTES = 64 * 2**20  # the first part: two halves for copied-in messages, larger ones go to NCCL
WORLD_SIZES = (2, 4, 8)  # powers of two: the kernels hold one flag per rank in a vector
DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the kernels sum (in fp32)
SLOT_BYTES = 64 * 2**20  # per slot at two ranks: an 8192-token prefill chunk at hidden 4096 in bf16
# Per slot at more ranks, where the one-shot kernel reads (tp - 1) messages per rank; larger ones go to NCCL.
# Not measured beyond two GPUs.
ONE_SHOT_SLOT_MAX_BYTES = 16 * 2**20
SIGNAL_BYTES = 2**16  # the one-shot kernel's flags: world_size int32 per program
# Up to this many bytes a 16-bit slot's all-reduce + add + RMSNorm takes the push kernel (kernels/all_reduce.py:
# stores into the peers' inboxes, no flags), above it the pull kernel. On 2 x H100 in CUDA graphs
# (results/allreduce-h100.json, 4096 wide) push / pull took 3.6 / 6.7 us at one row, 4.3 / 6.6 at 8,
# 7.9 / 12.3 at 145, 11.2 / 14.6 at 256 and 18.0 / 20.8 at 512. The inbox holds two halves of world_size
# messages of this size. NANOVLLM_PUSH_MAX_BYTES=0 turns it off.
PUSH_MAX_BYTES = int(os.environ.get("NANOVLLM_PUSH_MAX_BYTES", 4 * 2**20)) // 64 * 64  # 512 tokens at 4096 wide


_RENDEZVOUS_TRIED = False  # whether this process has entered a symmetric-memory rendezvous


def symm_mem_requested() -> bool:
    """On unless NANOVLLM_SYMM_MEM=0 (on 2 x H200 TP 2 gives 1.66x the throughput of TP 1 with it,
    benchmarks/results/tp-h200.json, 1.45x with NCCL: tp-h200-with-nccl.json)."""
    return os.environ.get("NANOVLLM_SYMM_MEM", "1") != "0"


def symm_mem_fresh() -> bool:
    """Whether this process has never entered a symmetric-memory rendezvous, the only state in which torch's
    rendezvous meets a group of fresh processes (see the module docstring)."""
    return not _RENDEZVOUS_TRIED


def symm_mem_supported(world_size: int, device: torch.device) -> bool:
    """CUDA ranks, one GPU each (rank r on cuda:r), that can all read each other's memory, a torch that maps
    symmetric memory, and a Triton that gives every thread the result of a vector atomic: before 3.5 only the
    owning thread got it (triton-lang/triton#7402), and the one-shot kernel's flag loop would spin."""
    if device.type != "cuda" or world_size not in WORLD_SIZES or not triton_broadcasts_atomics():
        return False
    if not torch_maps_symmetric_memory():
        return False
    return all(torch.cuda.can_device_access_peer(device.index, peer)
               for peer in range(world_size) if peer != device.index)


def torch_maps_symmetric_memory() -> bool:
    """A torch with symmetric memory's allocator and rendezvous (2.5 and later; the project allows 2.4)."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False
    return hasattr(symm_mem, "empty") and hasattr(symm_mem, "rendezvous")


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

    def __init__(self, group_name: str, device: torch.device, world_size: int, max_bytes: int = MAX_BYTES,
                 timeout_s: float = TIMEOUT_S):
        global _RENDEZVOUS_TRIED
        # Peer-to-peer only: without this torch would also try to bind the buffer to a multicast object.
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed._symmetric_memory as symm_mem
        self.max_bytes, self.timeout_s, self.turn = max_bytes, timeout_s, 0
        # bytes, any dtype views it: [copied-in messages, two halves | signal | slot 0 | slot 1 | inbox]
        slot_bytes = SLOT_BYTES if world_size == 2 else ONE_SHOT_SLOT_MAX_BYTES
        inbox_bytes = 2 * world_size * PUSH_MAX_BYTES
        self.buffer = symm_mem.empty(max_bytes + SIGNAL_BYTES + 2 * slot_bytes + inbox_bytes, dtype=torch.uint8,
                                     device=device)
        _RENDEZVOUS_TRIED = True
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
        return aligned and fits(x.dtype, x.numel() * x.element_size(), x.is_contiguous(), self.max_bytes // 2)

    def add_rmsnorm(self, slot: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sum over ranks of a (rows, n) slot + residual, its RMSNorm with weight or None), one kernel."""
        from nanovllm.kernels.all_reduce import one_shot_all_reduce_add_rmsnorm, push_all_reduce_add_rmsnorm
        if slot.element_size() == 2 and slot.numel() * 2 <= min(self.push_max_bytes, self.inbox.shape[2] * 2):
            return push_all_reduce_add_rmsnorm(slot, residual, weight, eps, self.inbox, self.calls, self.offsets,
                                               self.rank, self.world_size, timeout_s=self.timeout_s)
        return one_shot_all_reduce_add_rmsnorm(slot, residual, weight, eps, self.signal, self.offsets, self.rank,
                                               self.world_size, timeout_s=self.timeout_s)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks into x (in place, as NCCL's all-reduce); every rank gets the same bits.
        A slot's message is summed into a new tensor instead, which is returned."""
        from nanovllm.kernels.all_reduce import one_shot_all_reduce
        if self.in_slot(x):
            return one_shot_all_reduce(x, torch.empty_like(x), self.signal, self.offsets, self.rank,
                                       self.world_size, timeout_s=self.timeout_s)
        half = self.max_bytes // 2
        staged = self.buffer[self.turn * half:][:x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        self.turn ^= 1  # the next copied-in message takes the other half, as consecutive slot messages do
        one_shot_all_reduce(staged.copy_(x), x, self.signal, self.offsets, self.rank, self.world_size,
                            timeout_s=self.timeout_s)
        return x
