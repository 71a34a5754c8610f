"""One-shot all-reduce over symmetric memory: each rank reads every rank's partial sum straight from that
rank's buffer (over NVLink for the peers) and adds them in rank order, so every rank stores the same bits.
Decode-sized 16-bit messages take the push variant further down instead (each rank stores its partial into
the peers' inboxes, no flags), which the pull kernel here matches bit for bit.

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

Every wait on a peer (the flags here, the push kernel's inbox) gives up after `timeout_s`: the kernel then
executes `trap`, the step fails with a CUDA error, and the engine reports it instead of hanging on a peer
that died. The interpreter has no clock, and there the waits have no limit.
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
    from triton.language.extra.cuda import globaltimer

    from nanovllm.kernels.add_rmsnorm import rms_rstd
    from nanovllm.kernels.fused_attention_output import _INTERPRET, _round
    from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous

MAX_PROGRAMS = 128  # one wave: a program spins until its namesake on each rank runs, so keep them all resident
BLOCK = 2048  # elements per program per round: 16 bytes per thread with 8 warps of bf16
TIMEOUT_S = 300.0  # a wait on a peer longer than this ends the kernel with a trap (the engine's TP_TIMEOUT_S)


def all_reduce_ref(partials: list[torch.Tensor]) -> torch.Tensor:
    """The ranks' partials summed in rank order in fp32, rounded once: what the kernel stores on every rank."""
    acc = torch.zeros(partials[0].shape, dtype=torch.float32, device=partials[0].device)
    for part in partials:
        acc += part.float()
    return acc.to(partials[0].dtype)


def one_shot_all_reduce(slot: torch.Tensor, out: torch.Tensor, signal: torch.Tensor, offsets: torch.Tensor,
                        rank: int, world_size: int, max_programs: int = MAX_PROGRAMS, block: int = BLOCK,
                        num_warps: int = 8, timeout_s: float = TIMEOUT_S) -> torch.Tensor:
    """out <- the sum over ranks of the tensor at `slot`'s place in each rank's buffer.

    slot: this rank's partial, contiguous, inside its symmetric buffer; out: a tensor like it. signal
    (int32): this rank's signal region, at least world_size * programs flags, in the same buffer.
    offsets (world_size,) int64: each rank's buffer minus this rank's, in bytes, as this process maps
    them (0 for itself); multiples of 64, so peer slots keep the slot's alignment. A peer that has not
    arrived after timeout_s fails the kernel (a trap)."""
    numel = slot.numel()
    assert slot.is_contiguous() and out.is_contiguous() and out.shape == slot.shape and out.dtype == slot.dtype
    assert slot.element_size() <= 4 and slot.data_ptr() % (16 * slot.element_size()) == 0, "the loads' hints"
    programs = max(1, min(max_programs, triton.cdiv(numel, block), signal.numel() // world_size))
    _one_shot_all_reduce_kernel[(programs,)](slot, out, signal, offsets, numel, int(timeout_s * 1e9), RANK=rank,
                                             WORLD=world_size, BLOCK=block, ELEM_BYTES=slot.element_size(),
                                             INTERPRET=_INTERPRET, num_warps=num_warps)
    return out


@jit
def _now(INTERPRET: tl.constexpr):
    """The GPU's global timer in ns (0 in the interpreter, which has no clock)."""
    if INTERPRET:
        return 0
    return globaltimer()


@jit
def _fail_after(start, timeout_ns, INTERPRET: tl.constexpr):
    """Ends the kernel with a trap once timeout_ns have passed since start (never in the interpreter)."""
    if not INTERPRET:
        if globaltimer() - start > timeout_ns:
            tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@jit
def _meet(signal_ptr, offsets_ptr, block_id, timeout_ns, RANK: tl.constexpr, WORLD: tl.constexpr,
          INTERPRET: tl.constexpr):
    """Returns once program `block_id` of every rank has arrived (see the module docstring); traps after
    timeout_ns without them."""
    start = _now(INTERPRET)
    ranks = tl.arange(0, WORLD)
    theirs = signal_ptr + tl.load(offsets_ptr + ranks) // 4  # (WORLD,) each rank's region, as int32
    ones, zeros = tl.full([WORLD], 1, tl.int32), tl.full([WORLD], 0, tl.int32)
    done = ranks == RANK  # (WORLD,): nothing to tell ourselves
    while tl.min(done.to(tl.int32)) == 0:  # set our flag on every peer; -1 never matches: done ones rest
        old = tl.atomic_cas(theirs + block_id * WORLD + RANK, tl.where(done, -1, 0), ones, sem="release",
                            scope="sys")
        done = done | (old == 0)
        _fail_after(start, timeout_ns, INTERPRET)
    done = ranks == RANK
    while tl.min(done.to(tl.int32)) == 0:  # take every peer's flag on ours back to 0
        old = tl.atomic_cas(signal_ptr + block_id * WORLD + ranks, tl.where(done, -1, 1), zeros, sem="acquire",
                            scope="sys")
        done = done | (old == 1)
        _fail_after(start, timeout_ns, INTERPRET)
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
def _one_shot_all_reduce_kernel(slot_ptr, out_ptr, signal_ptr, offsets_ptr, numel, timeout_ns, RANK: tl.constexpr,
                                WORLD: tl.constexpr, BLOCK: tl.constexpr, ELEM_BYTES: tl.constexpr,
                                INTERPRET: tl.constexpr):
    pid, programs = tl.program_id(0), tl.num_programs(0)
    _meet(signal_ptr, offsets_ptr, pid, timeout_ns, RANK, WORLD, INTERPRET)
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
                                    world_size: int, timeout_s: float = TIMEOUT_S
                                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        residual.stride(0) if residual is not None else 0, eps, int(timeout_s * 1e9), RANK=rank, WORLD=world_size,
        BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, NORM=weight is not None, ELEM_BYTES=slot.element_size(),
        ALIGNED=n % 16 == 0 and slot.data_ptr() % (16 * slot.element_size()) == 0, PDL=pdl,
        INTERPRET=_INTERPRET, num_warps=min(16, max(4, block_n // 256)),
        launch_pdl=pdl)
    return stream, normed


@jit(do_not_specialize=["rows"])  # changes every step: one compile serves all
def _one_shot_all_reduce_rmsnorm_kernel(slot_ptr, res_ptr, weight_ptr, stream_ptr, normed_ptr, signal_ptr,
                                        offsets_ptr, rows, n, stride_r, eps, timeout_ns, RANK: tl.constexpr,
                                        WORLD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                        NORM: tl.constexpr, ELEM_BYTES: tl.constexpr, ALIGNED: tl.constexpr,
                                        PDL: tl.constexpr, INTERPRET: tl.constexpr):
    """With PDL (kernels/pdl.py) it meets the other ranks only after its wait: their projections' writes,
    and its own rank's, are then complete."""
    launch_dependents(PDL)
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols, mask, w = _row_setup(weight_ptr, n, NORM, BLOCK_N)
    wait_previous(PDL)
    _meet(signal_ptr, offsets_ptr, pid, timeout_ns, RANK, WORLD, INTERPRET)
    for row in range(pid, rows, programs):
        offs = row * n + cols  # (BLOCK_N,) into the slot and the outputs, all (rows, n) dense (int32: a slot is small)
        res = _residual_row(res_ptr, row, stride_r, cols, mask, HAS_RESIDUAL)
        acc = _sum_ranks(slot_ptr, offsets_ptr, offs, mask, WORLD, ELEM_BYTES, ALIGNED, BLOCK_N)
        _finish_row(acc, res, offs, mask, n, w, eps, stream_ptr, normed_ptr, HAS_RESIDUAL, NORM, INTERPRET)


@jit
def _row_setup(weight_ptr, n, NORM: tl.constexpr, BLOCK_N: tl.constexpr):
    """(cols, mask, w) for rows of n: the column offsets, which are real, and the norm's weight (fp32; zeros
    without NORM). The weight is not written by any kernel, so it may load before the PDL wait."""
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n
    if NORM:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.zeros([BLOCK_N], dtype=tl.float32)
    return cols, mask, w


@jit
def _residual_row(res_ptr, row, stride_r, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """The residual's row (fp32), or zeros without one. Loaded before the row's sum: it does not depend on
    the peers, so its round trip to memory overlaps the wait for them."""
    if HAS_RESIDUAL:
        return tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.zeros(cols.shape, dtype=tl.float32)


@jit
def _finish_row(acc, res, offs, mask, n, w, eps, stream_ptr, normed_ptr, HAS_RESIDUAL: tl.constexpr,
                NORM: tl.constexpr, INTERPRET: tl.constexpr):
    """Stores one row's rank sum `acc` (fp32), rounded, + the residual row `res`, rounded again, and its
    RMSNorm."""
    dtype = stream_ptr.dtype.element_ty
    x = _round(acc, dtype, INTERPRET).to(tl.float32)  # the all-reduce's sum
    if HAS_RESIDUAL:
        x = _round(x + res, dtype, INTERPRET).to(tl.float32)  # the new residual stream, as add_rmsnorm rounds it
    tl.store(stream_ptr + offs, x.to(dtype), mask=mask)
    if NORM:
        rstd = rms_rstd(x, n, eps)
        tl.store(normed_ptr + offs, _round(x * rstd * w, dtype, INTERPRET), mask=mask)


# The push variant, for small 16-bit messages (decode steps). The pull kernel above spends a round trip over
# NVLink on its flags before its first load of a peer's data, and then loads across the link, which waits
# another round trip per load. Here every rank instead *stores* its partial into each peer's inbox (posted
# writes: one trip, no reply), and each rank then reads only local memory: its own partial and the inboxes
# the peers filled. There are no flags: an inbox element holds EMPTY (-0.0) until the peer's value lands,
# and the reader spins on the data itself (as TensorRT-LLM's Lamport all-reduce does). A sender turns its
# -0.0s into +0.0s first, and every rank sums those same values in rank order into an fp32 accumulator that
# starts at +0.0, as the pull kernel's does: -0.0 and +0.0 add up alike there, so the bits are the pull
# kernel's, on every rank.
#
# The reader sets each inbox element back to EMPTY once read. Calls alternate between two inbox halves
# (parity), so a rank that runs ahead writes the other half: to write into this half again it must have
# finished the next call, which needed this rank's next push, which comes after this kernel (and its
# clearing) has finished. The parity is each program's count of calls: program p ticks entries p, p +
# programs, ... of `calls` once per call, so all entries stay equal whatever the grid, and a program reads
# only the entry it alone writes.
PUSH_MAX_PROGRAMS = 256  # one row each up to here: a push waits on no peer, but keep them in one wave (2 per SM)
EMPTY_BITS = -32768  # 0x8000 as int16: -0.0 in bf16 and in fp16
EMPTY = tl.constexpr(EMPTY_BITS) if tl is not None else EMPTY_BITS  # the kernels' name for it


def push_all_reduce_add_rmsnorm(slot: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                                eps: float, inbox: torch.Tensor, calls: torch.Tensor, offsets: torch.Tensor,
                                rank: int, world_size: int, max_programs: int = PUSH_MAX_PROGRAMS,
                                num_warps: int | None = None, timeout_s: float = TIMEOUT_S
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What one_shot_all_reduce_add_rmsnorm returns, to the bit, for a 16-bit slot (which only this rank
    reads). inbox: this rank's (2, world_size, m) int16 inbox, m >= slot.numel(), all EMPTY between calls,
    at the same place of every rank's symmetric buffer; calls: (PUSH_MAX_PROGRAMS,) int32, all equal, and
    equal on every rank (zeros at the start). One program per row at a time, at most max_programs."""
    rows, n = slot.shape
    assert slot.element_size() == 2 and slot.is_contiguous() and slot.numel() <= inbox.shape[2]
    assert inbox.dtype == torch.int16 and inbox.shape[:2] == (2, world_size) and inbox.is_contiguous()
    assert residual is None or (residual.shape == slot.shape and residual.stride(1) == 1)
    stream = torch.empty_like(slot)
    normed = torch.empty_like(slot) if weight is not None else None
    block_n = triton.next_power_of_2(n)
    assert calls.numel() & (calls.numel() - 1) == 0, "a power of two: the kernel ticks them as one vector"
    programs = max(1, min(max_programs, rows, calls.numel()))
    pdl = pdl_enabled(slot.device, rows)
    _push_all_reduce_rmsnorm_kernel[(programs,)](
        slot, residual if residual is not None else slot, weight if weight is not None else slot, stream,
        normed if normed is not None else stream, inbox, calls, offsets, rows, n,
        residual.stride(0) if residual is not None else 0, eps, inbox.shape[2], int(timeout_s * 1e9),
        NUM_CALLS=calls.numel(), RANK=rank, WORLD=world_size, BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
        NORM=weight is not None,
        ALIGNED=n % 8 == 0 and slot.data_ptr() % 16 == 0 and inbox.data_ptr() % 16 == 0 and inbox.shape[2] % 8 == 0,
        PDL=pdl, INTERPRET=_INTERPRET, num_warps=num_warps or min(16, max(4, block_n // 256)), launch_pdl=pdl)
    return stream, normed


@jit(do_not_specialize=["rows"])
def _push_all_reduce_rmsnorm_kernel(slot_ptr, res_ptr, weight_ptr, stream_ptr, normed_ptr, inbox_ptr, calls_ptr,
                                    offsets_ptr, rows, n, stride_r, eps, inbox_n, timeout_ns, NUM_CALLS: tl.constexpr,
                                    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK_N: tl.constexpr,
                                    HAS_RESIDUAL: tl.constexpr, NORM: tl.constexpr, ALIGNED: tl.constexpr,
                                    PDL: tl.constexpr, INTERPRET: tl.constexpr):
    """Under PDL its reads (the slot, the count of calls) and its pushes come after the wait."""
    launch_dependents(PDL)
    pid, programs = tl.program_id(0), tl.num_programs(0)
    cols, mask, w = _row_setup(weight_ptr, n, NORM, BLOCK_N)
    wait_previous(PDL)
    call = tl.load(calls_ptr + pid)
    half = (call % 2) * WORLD * inbox_n  # where this call's (WORLD, inbox_n) half starts, in elements
    for row in range(pid, rows, programs):  # first every push, so no rank waits on a peer that waits on it
        offs = _vector_offsets(row * n + cols, ALIGNED, BLOCK_N)
        mine = _sendable(tl.load(slot_ptr + offs, mask=mask, other=0))
        for r in tl.static_range(WORLD):
            if r != RANK:  # into inbox RANK of rank r's same half
                theirs = inbox_ptr + tl.multiple_of(tl.load(offsets_ptr + r) // 2, 32)  # buffers 64-byte aligned
                tl.store(theirs + _vector_offsets(half + RANK * inbox_n + row * n + cols, ALIGNED, BLOCK_N), mine,
                         mask=mask)
    for row in range(pid, rows, programs):
        offs = _vector_offsets(row * n + cols, ALIGNED, BLOCK_N)
        # What is local comes first, so its loads are in flight while the peers' values are awaited.
        mine = _sendable(tl.load(slot_ptr + offs, mask=mask, other=0))
        res = _residual_row(res_ptr, row, stride_r, cols, mask, HAS_RESIDUAL)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                bits = mine
            else:
                ours = _vector_offsets(half + r * inbox_n + row * n + cols, ALIGNED, BLOCK_N)
                bits = _receive(inbox_ptr + ours, mask, timeout_ns, INTERPRET)
            acc += bits.to(stream_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        _finish_row(acc, res, offs, mask, n, w, eps, stream_ptr, normed_ptr, HAS_RESIDUAL, NORM, INTERPRET)
    entries = tl.arange(0, NUM_CALLS)  # one vector store: a loop of scalar ones cost ~2 us at one or two programs
    tl.store(calls_ptr + entries, tl.full([NUM_CALLS], 1, tl.int32) + call, mask=entries % programs == pid)


@jit
def _vector_offsets(offs, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """offs (BLOCK,) consecutive: with ALIGNED the first is a multiple of 8 elements (16 bytes, from the
    slot's, the outputs' and the inbox's alignment and n % 8 == 0), so loads and stores become vectors."""
    if ALIGNED:
        offs = tl.max_contiguous(tl.multiple_of(offs, 8), BLOCK)
    return offs


@jit
def _sendable(values):
    """A 16-bit vector as int16 bits, with -0.0 made +0.0: no value sent ever looks EMPTY."""
    bits = values.to(tl.int16, bitcast=True)
    return tl.where(bits == EMPTY, 0, bits).to(tl.int16)


@jit
def _receive(ptrs, mask, timeout_ns, INTERPRET: tl.constexpr):
    """The int16 bits at ptrs (local inbox elements) once none is EMPTY, which leaves them EMPTY again;
    traps after timeout_ns without them."""
    bits = tl.load(ptrs, mask=mask, other=0, volatile=True)
    start = _now(INTERPRET)
    while tl.sum(((bits == EMPTY) & mask).to(tl.int32)) > 0:
        bits = tl.load(ptrs, mask=mask, other=0, volatile=True)
        _fail_after(start, timeout_ns, INTERPRET)
    tl.store(ptrs, tl.full(bits.shape, EMPTY, tl.int16), mask=mask)
    return bits
