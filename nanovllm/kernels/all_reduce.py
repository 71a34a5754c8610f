"""One-shot all-reduce over symmetric memory: each rank reads every rank's partial sum straight from that
rank's buffer (over NVLink for the peers) and adds them in rank order, so every rank stores the same bits.

A row-parallel projection writes its partial product into a slot of its own rank's symmetric buffer, so
nothing is copied in. Then one kernel: each program first meets its namesakes on the other ranks (the
flags below), which proves that every rank's projection has finished, then sums its share of the
message from all ranks' slots into the caller's output. Reading (tp - 1) messages over NVLink per rank is
what torch's two-shot kernel moves too at tp = 2, without its copy in and its second barrier. The decoder's
variant (`one_shot_all_reduce_add_rmsnorm`) also adds the residual to the rounded sum and normalizes each
row for the next layer, as add_rmsnorm would after the all-reduce: the same bits, one kernel fewer.

The flags: rank r's program b sets flag (b, r) in every peer's signal region from 0 to 1, retrying while
it is still 1 (that peer has not taken the previous call's flag yet), then waits for each peer's flag
(b, s) in its own region and takes it back to 0. Release on the set and acquire on the take make every
rank's writes before this kernel visible to the loads after it. After a call all flags are 0 again, so
CUDA graphs replay it without any counter.

There is no barrier at the end: a rank may run ahead and write its next message while a slower peer still
reads this one. The caller keeps the two in different slots: consecutive all-reduces alternate between two
slots (attention's o_proj and the MLP's down_proj, layers/linear.py), and a rank writes a slot again only
after the peer's next all-reduce has met it, which the peer starts once it has finished reading.
"""
from __future__ import annotations

import torch

from nanovllm.kernels import jit
from nanovllm.kernels.add_rmsnorm import rmsnorm_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use the reference
    triton = tl = None

if triton is not None:
    from nanovllm.kernels.add_rmsnorm import rms_rstd
    from nanovllm.kernels.fused_attention_output import _INTERPRET, _round
    from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous

MAX_PROGRAMS = 128  # one wave: a program spins until its namesake on each rank runs, so keep them all resident
BLOCK = 2048  # elements per program per round: 16 bytes per thread with 8 warps of bf16


def all_reduce_ref(partials: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' partials summed in rank order in fp32, rounded once: what the kernel stores on every rank."""
    acc = torch.zeros(partials[0].shape, dtype=torch.float32, device=partials[0].device)
    for part in partials:
        acc += part.float()
    return acc.to(partials[0].dtype)


def one_shot_all_reduce(slot: torch.Tensor, out: torch.Tensor, signal: torch.Tensor, offsets: torch.Tensor,
                        rank: int, world_size: int, max_programs: int = MAX_PROGRAMS, block: int = BLOCK,
                        num_warps: int = 8) -> torch.Tensor:
    """out <- the sum over ranks of the tensor at `slot`'s place in each rank's buffer.

    slot: this rank's partial, contiguous, inside its symmetric buffer; out: a tensor like it. signal
    (int32): this rank's signal region, at least world_size * programs flags, in the same buffer.
    offsets (world_size,) int64: each rank's buffer minus this rank's, in bytes, as this process maps
    them (0 for itself); multiples of 64, so peer slots keep the slot's alignment."""
    numel = slot.numel()
    assert slot.is_contiguous() and out.is_contiguous() and out.shape == slot.shape and out.dtype == slot.dtype
    assert slot.element_size() <= 4 and slot.data_ptr() % (16 * slot.element_size()) == 0, "the loads' hints"
    programs = max(1, min(max_programs, triton.cdiv(numel, block), signal.numel() // world_size))
    _one_shot_all_reduce_kernel[(programs,)](slot, out, signal, offsets, numel, RANK=rank, WORLD=world_size,
                                             BLOCK=block, ELEM_BYTES=slot.element_size(),
                                             INTERPRET=_INTERPRET, num_warps=num_warps)
    return out


@jit
def _meet(signal_ptr, offsets_ptr, block_id, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Returns once program `block_id` of every rank has arrived (see the module docstring)."""
    ranks = tl.arange(0, WORLD)
    theirs = signal_ptr + tl.load(offsets_ptr + ranks) // 4  # (WORLD,) each rank's region, as int32
    ones, zeros = tl.full([WORLD], 1, tl.int32), tl.full([WORLD], 0, tl.int32)
    done = ranks == RANK  # (WORLD,): nothing to tell ourselves
    while tl.min(done.to(tl.int32)) == 0:  # set our flag on every peer; -1 never matches: done ones rest
        old = tl.atomic_cas(theirs + block_id * WORLD + RANK, tl.where(done, -1, 0), ones, sem="release",
                            scope="sys")
        done = done | (old == 0)
    done = ranks == RANK
    while tl.min(done.to(tl.int32)) == 0:  # take every peer's flag on ours back to 0
        old = tl.atomic_cas(signal_ptr + block_id * WORLD + ranks, tl.where(done, -1, 1), zeros, sem="acquire",
                            scope="sys")
        done = done | (old == 1)
    tl.debug_barrier()  # the acquiring threads' view, for every thread of the program


@jit
def _sum_ranks(slot_ptr, offsets_ptr, offs, mask, WORLD: tl.constexpr, ELEM_BYTES: tl.constexpr,
               ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """(BLOCK,) fp32: the elements at `offs` of every rank's slot (`offs` into this rank's), in rank order on
    every rank, so every rank gets the same bits. ALIGNED: offs starts at a multiple of 16 elements."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        theirs = tl.load(offsets_ptr + r) // ELEM_BYTES + offs  # the same place in rank r's buffer
        if ALIGNED:  # let the loads be 16-byte vectors
            theirs = tl.max_contiguous(tl.multiple_of(theirs, 16), BLOCK)
        acc += tl.load(slot_ptr + theirs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)  # not L1
    return acc


@jit
def _one_shot_all_reduce_kernel(slot_ptr, out_ptr, signal_ptr, offsets_ptr, numel, RANK: tl.constexpr,
                                WORLD: tl.constexpr, BLOCK: tl.constexpr, ELEM_BYTES: tl.constexpr,
                                INTERPRET: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    _meet(signal_ptr, offsets_ptr, pid, RANK, WORLD)
    for start in range(pid * BLOCK, numel, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)  # (BLOCK,) into the message
        mask = offs < numel
        acc = _sum_ranks(slot_ptr, offsets_ptr, offs, mask, WORLD, ELEM_BYTES, True, BLOCK)
        tl.store(out_ptr + offs, _round(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def all_reduce_add_rmsnorm_ref(partials: list[torch.Tensor], residual: torch.Tensor | None,
                               weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stream, normed): stream = the rank-order sum (+ residual, rounded again), normed = rmsnorm(stream)
    with `weight` (None without one), as all_reduce and then add_rmsnorm would round them."""
    stream = all_reduce_ref(partials)
    if residual is not None:
        stream = (stream.float() + residual.float()).to(stream.dtype)
    return stream, (None if weight is None else rmsnorm_ref(stream, weight, eps))


def one_shot_all_reduce_add_rmsnorm(slot: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                                    eps: float, signal: torch.Tensor, offsets: torch.Tensor, rank: int,
                                    world_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The all-reduce of a (rows, n) slot, then the decoder's next residual add and RMSNorm, in one kernel:
    returns (stream, normed) as all_reduce_add_rmsnorm_ref does (normed None without `weight`). residual
    (rows, n) with unit column stride, read only; both outputs are new tensors. One program per row at a
    time (the norm needs the whole row), at most MAX_PROGRAMS of them."""
    rows, n = slot.shape
    assert slot.is_contiguous() and (residual is None or (residual.shape == slot.shape and residual.stride(1) == 1))
    stream = torch.empty_like(slot)
    normed = torch.empty_like(slot) if weight is not None else None
    block_n = triton.next_power_of_2(n)
    programs = max(1, min(MAX_PROGRAMS, rows, signal.numel() // world_size))
    pdl = pdl_enabled(slot.device, rows)
    _one_shot_all_reduce_rmsnorm_kernel[(programs,)](
        slot, residual if residual is not None else slot, weight if weight is not None else slot, stream,
        normed if normed is not None else stream, signal, offsets, rows, n,
        residual.stride(0) if residual is not None else 0, eps, RANK=rank, WORLD=world_size, BLOCK_N=block_n,
        HAS_RESIDUAL=residual is not None, NORM=weight is not None, ELEM_BYTES=slot.element_size(),
        ALIGNED=n % 16 == 0 and slot.data_ptr() % (16 * slot.element_size()) == 0, PDL=pdl,
        INTERPRET=_INTERPRET, num_warps=min(16, max(4, block_n // 256)),
        launch_pdl=pdl)
    return stream, normed


@jit(do_not_specialize=["rows"])  # changes every step: one compile serves all
def _one_shot_all_reduce_rmsnorm_kernel(slot_ptr, res_ptr, weight_ptr, stream_ptr, normed_ptr, signal_ptr,
                                        offsets_ptr, rows, n, stride_r, eps, RANK: tl.constexpr,
                                        WORLD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                        NORM: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGNED: tl.constexpr,
                                        PDL: tl.constexpr, INTERPRET: tl.constexpr):
    """With PDL (kernels/pdl.py) it meets the other ranks only after its wait: their projections' writes,
    and its own rank's, are then complete."""
    launch_dependents(PDL)
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    dtype = stream_ptr.dtype.element_ty
    if NORM:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    wait_previous(PDL)
    _meet(signal_ptr, offsets_ptr, pid, RANK, WORLD)
    for row in range(pid, rows, programs):
        offs = row * n + cols  # (BLOCK_N,) into the slot and the outputs, all (rows, n) dense (int32: a slot is small)
        acc = _sum_ranks(slot_ptr, offsets_ptr, offs, mask, WORLD, ELEM_BYTES, ALIGNED, BLOCK_N)
        x = _round(acc, dtype, INTERPRET).to(tl.float32)  # the all-reduce's sum
        if HAS_RESIDUAL:
            x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            x = _round(x, dtype, INTERPRET).to(tl.float32)  # the new residual stream, as add_rmsnorm rounds it
        tl.store(stream_ptr + offs, x.to(dtype), mask=mask)
        if NORM:
            rstd = rms_rstd(x, n, eps)
            tl.store(normed_ptr + offs, _round(x * rstd * w, dtype, INTERPRET), mask=mask)
