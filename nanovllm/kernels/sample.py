"""Temperature sampling (and argmax) straight from the logits: one pass over the vocabulary, no softmax.

Drawing token i with probability softmax(logits / T)_i is the Gumbel-max trick: argmax(logits / T + g) with
g = -log(-log(u)), u uniform (0, 1), i.i.d. per token; rows with T = 0 take the plain argmax. The logits are
read once in the model dtype (bf16: 2 bytes per token), where the torch path (fp32 copy, softmax,
exponential draws, divide, argmax) moves ~20 bytes per token: ~0.4 ms per step at batch 256 with Qwen3's
151,936-token vocabulary on an H100.

Two kernels. The first splits each row into chunk-wide pieces, one program each (grid (B, V / chunk)), and
writes each piece's best (score, index): one program per row left most SMs idle at small batches and kept
too few loads in flight at large ones (210-275 us for 52-145 rows on an H200, ~10x its bandwidth time), and
a few rows take narrower chunks than many (chunk_size). The second (grid (B,)) picks each row's best
piece, the first of equal scores, so ties go to the lowest index as in torch.argmax. Random numbers come
from Philox keyed by a seed in device memory, with counters (vocabulary index // 4, row, 0): one Philox
call gives the 4 uniforms of 4 neighbouring tokens (tl.rand would spend a call per token and keep one of its
4 outputs, and Philox was most of the kernel's time). So a draw does not depend on the chunking, and a CUDA
graph that replays the kernels and then bumps the seed draws fresh numbers every replay.

A row with a seed of its own (a request's `seed`) is keyed by it instead, with counters (vocabulary index //
4, position, 1): its numbers depend on the request's seed and the position of the token it samples, not on
the batch, the step or the replay, so a seeded request draws the same tokens in a decode graph, in an eager
step, after a preemption or beside any other request. The reference runs the same Philox in torch for such
rows (philox_uniforms), so they agree draw for draw; unseeded rows take torch's generator there, and agree in
distribution only.

Under tensor parallelism each rank runs the first pass on its slice of the logits (indices and random
numbers of the full vocabulary) and the ranks all-gather only the per-chunk pairs (engine/cuda_graph.py):
the second pass over all of them picks what the unsplit row would have.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nanovllm.kernels import jit
from nanovllm.kernels.pdl import launch_dependents, pdl_enabled, wait_previous
from nanovllm.kernels.top_k_top_p import keys_ref, to_key

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use sample_ref
    triton = tl = None

CHUNK = 4096  # vocabulary entries per program: 37 programs per row at Qwen3's vocabulary
SMALL_CHUNK, SMALL_CHUNK_ROWS = 1024, 32  # up to 32 rows: 149 programs per row
_BLOCK = 1024  # entries per tile within a chunk


def chunk_size(rows: int) -> int:
    """Vocabulary entries per first-pass program in a batch of `rows` rows. At a few rows 37 programs a row
    leave most SMs idle, and with temperature each program's Philox draws keep it busy: on an H100 chunks of
    1,024 took both kernels at batch 1 from 11.8 to 7.4 µs (greedy 4.1 -> 2.8) and batch 32 from 23.2 to 21.6,
    but batches of 145 and 256 from 82 to 86 and 142 to 149 (benchmarks/NOTES-gpu.md, session 27)."""
    return SMALL_CHUNK if rows <= SMALL_CHUNK_ROWS else CHUNK


def sample_ref(logits: torch.Tensor, temperatures: torch.Tensor, out: torch.Tensor,
               keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The Sampler's exponential race, argmax(p / q) with q ~ Exp(1), at per-row temperatures (0: argmax).
    logits (B, V) in any float dtype, temperatures (B,) float32, out (B,) int64. keys: see sample(); a row with
    a key of its own takes the kernel's Gumbel-max over the kernel's Philox numbers instead. Only the rows that
    race draw from torch's generator (exponentials for them alone)."""
    out.copy_(logits.argmax(dim=-1))  # greedy rows keep it
    drawn = temperatures > 0
    own = keys[0] >= 0 if keys is not None else torch.zeros_like(drawn)
    if (race := drawn & ~own).any():  # only the rows that race draw from torch's generator
        rows = race.nonzero()[:, 0]
        scaled = logits[rows].float() * (1.0 / temperatures[rows, None])  # as the kernel scales
        q = torch.empty_like(scaled).exponential_().clamp_min_(torch.finfo(scaled.dtype).tiny)
        out[rows] = scaled.softmax(dim=-1).div_(q).argmax(dim=-1)
    if (keyed := drawn & own).any():
        rows = keyed.nonzero()[:, 0]
        scaled = logits[rows].float() * (1.0 / temperatures[rows, None])
        u = philox_uniforms(keys[0][rows], keys[1][rows], logits.shape[1])  # (S, V)
        out[rows] = (scaled - (-u.log()).log()).argmax(dim=-1)  # u = 0 gives -inf, never picked
    return out


_PHILOX_ROUND = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_STEP = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32 bits of a * b, for a 32-bit constant a and b int64 holding 32-bit values,
    in 16-bit halves so that no product leaves int64."""
    a_hi, a_lo, b_hi, b_lo = a >> 16, a & 0xFFFF, b >> 16, b & 0xFFFF
    mid = a_hi * b_lo + a_lo * b_hi  # < 2^33
    low = a_lo * b_lo + ((mid & 0xFFFF) << 16)  # < 2^33
    return a_hi * b_hi + (mid >> 16) + (low >> 32), low & _U32


def philox_uniforms(keys: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """The kernel's uniforms of seeded rows, in torch: token i of row r is lane i % 4 of Philox4x32-10 keyed
    by keys[r] (int64, its two 32-bit halves) at counters (i // 4, counters[r], 1, 0), as tl.philox computes
    them, mapped to [0, 1) as tl.uint_to_uniform_float does. keys, counters (S,) int64 -> (S, vocab) float32."""
    keys = keys.cpu()
    k0, k1 = keys & _U32, (keys >> 32) & _U32  # (S,)
    c0 = torch.arange(-(-vocab // 4), dtype=torch.int64)[None, :].expand(len(keys), -1)  # (S, V / 4)
    c1 = (counters.cpu() & _U32)[:, None].expand_as(c0)
    c2, c3 = torch.ones_like(c0), torch.zeros_like(c0)
    k0, k1 = k0[:, None], k1[:, None]
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & _U32, (k1 + _PHILOX_KEY_STEP[1]) & _U32
    bits = torch.stack([c0, c1, c2, c3], dim=-1).flatten(1)[:, :vocab]  # (S, vocab): [4n + lane]
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    signed = torch.where(signed < 0, -signed - 1, signed)  # ~x on int32
    return (signed.float() * 4.6566127342e-10).to(counters.device)


def sample_workspace(max_rows: int, vocab: int, device: torch.device | str, chunk: int | None = None) -> torch.Tensor:
    """The per-chunk bests of sample(): (max_rows, 2, chunks) float32, row r's scores in [r, 0] and their
    vocabulary indices (int32 bits) in [r, 1], so a tensor-parallel rank ships both in one all-gather.
    Made once by a caller that replays sample() in a CUDA graph. chunk: the chunking it serves, by default
    the narrowest of any batch (sample() takes what it needs of it)."""
    return torch.empty(max_rows, 2, -(-vocab // (chunk or chunk_size(1))), dtype=torch.float32, device=device)


class Keep(NamedTuple):
    """What a draw keeps of each row (kernels/top_k_top_p.py): the tokens whose 16-bit key is at least
    keys[row] and whose probability is at least min_p[row] times the top one's, exp((x - row_max) / T).
    The draw zeroes `hist` (rows, 65,536) for the next thresholds."""
    keys: torch.Tensor  # (>= B,) int32
    row_max: torch.Tensor  # (>= B,) float32
    min_p: torch.Tensor  # (>= B,) float32
    hist: torch.Tensor  # (>= B, 65536) int32

    def mask_ref(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        """What a draw keeps of logits (B, V) at temperatures (B,), in torch: (B, V) bool."""
        rows = logits.shape[0]
        inv_temps = 1.0 / torch.where(temperatures > 0, temperatures, 1.0)[:, None]
        return ((keys_ref(logits) >= self.keys[:rows, None])
                & (((logits.float() - self.row_max[:rows, None]) * inv_temps).exp() >= self.min_p[:rows, None]))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor, out: torch.Tensor,
           workspace: torch.Tensor | None = None, host_out: HostOut | None = None,
           keep: Keep | None = None, keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """logits (B, V) with unit stride on V, temperatures (B,) float32, seed (1,) int64 on the device (the
    caller advances it between draws), out (B,) int64, workspace from sample_workspace(>= B, V). No host
    sync; no allocation when the workspace is given: CUDA-graph safe. host_out: see pick_bests. keep: draw
    only from what top-k, top-p and min-p keep (16-bit logits). keys: (each row's own Philox key, -1 for
    none; each row's position), (B,) int64 each: a row with a key draws by it (see the module's docstring)."""
    batch, vocab = logits.shape
    if workspace is None:
        workspace = sample_workspace(batch, vocab, logits.device)
    chunk = _chunk(vocab, chunk_size(batch))
    workspace = workspace[:batch, :, :-(-vocab // chunk)]  # the columns this batch's chunks fill
    chunk_bests(logits, temperatures, seed, workspace, chunk=chunk, keep=keep, keys=keys)
    return pick_bests(workspace[None], out, host_out)


def _chunk(vocab: int, chunk: int) -> int:
    return min(chunk, max(4, triton.next_power_of_2(vocab)))  # a small vocabulary: one chunk


def chunk_bests(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor, workspace: torch.Tensor,
                vocab_offset: int = 0, chunk: int | None = None, keep: Keep | None = None,
                keys: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The first pass: each chunk's best score and its index into workspace, one column per chunk (CHUNK
    wide unless chunk says otherwise). Under TP logits are a rank's slice of the vocabulary, starting at
    vocab_offset: indices and random numbers are those of the full vocabulary, so the ranks' bests together
    are the unsplit row's. Columns past the logits (a last rank's padding) hold -inf. keys: see sample()."""
    batch, vocab = logits.shape
    chunk = _chunk(vocab, CHUNK if chunk is None else chunk)
    assert logits.stride(-1) == 1 and workspace.shape[2] >= -(-vocab // chunk) and workspace.shape[0] >= batch
    if batch:
        pdl = pdl_enabled(logits.device, batch)
        chunks = workspace.shape[2]
        lowest, row_max, min_p, hist = keep if keep is not None else (temperatures,) * 4  # unread without KEEP
        row_keys, positions = keys if keys is not None else (seed, seed)  # unread without SEEDED
        _chunk_best_kernel[(batch, chunks)](
            logits, logits.stride(0), temperatures, seed, row_keys, positions, workspace, workspace.stride(0),
            workspace.stride(1), vocab, vocab_offset, lowest, row_max, min_p, hist, -(-(1 << 16) // chunks),
            CHUNK=chunk, BLOCK=min(_BLOCK, chunk), ALIGNED=vocab_offset % 4 == 0, KEEP=keep is not None,
            SEEDED=keys is not None, PDL=pdl, launch_pdl=pdl)


class HostOut(NamedTuple):
    """Where pick_bests also writes the ids: row `slot[0]` of `ring` (S, >= B) int64 in pinned host memory,
    the slot read on the device (a CUDA graph's input). The kernel's stores reach the host over the bus, so
    the host reads them once an event after the kernel has completed, with no copy on the stream: a
    device-to-host copy after each decode graph replay kept the GPU idle ~9 µs a step at batch 1
    (benchmarks/NOTES-gpu.md, session 25)."""
    ring: torch.Tensor
    slot: torch.Tensor


def pick_bests(workspaces: torch.Tensor, out: torch.Tensor, host_out: HostOut | None = None) -> torch.Tensor:
    """The second pass: workspaces (R, B, 2, chunks), R ranks' first passes over consecutive slices of the
    vocabulary (R = 1 without TP) -> out (B,) int64, each row's best index, the lowest of equal scores; with
    host_out, the same ids into its ring's slot too."""
    ranks, batch, _, chunks = workspaces.shape
    if batch:
        pdl = pdl_enabled(out.device, batch)
        ring, slot = host_out if host_out is not None else (out, out)  # unread without HOST
        _row_best_kernel[(batch,)](workspaces, workspaces.stride(0), workspaces.stride(1), workspaces.stride(2),
                                   out, ring, ring.stride(0), slot, chunks, ranks * chunks,
                                   BLOCK=triton.next_power_of_2(ranks * chunks), HOST=host_out is not None,
                                   PDL=pdl, launch_pdl=pdl)
    return out


def feed_back_ref(ids: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """ids (B,) int64 in place: an entry -1 - r becomes prev[r], the others stay."""
    return ids.copy_(torch.where(ids < 0, prev[(-1 - ids).clamp(min=0)], ids))


def feed_back(ids: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """feed_back_ref in one kernel. Async scheduling launches a decode step before the host has the ids the
    step ahead samples, so the host writes -1 - (the seq's row in that step) and a decode graph whose last
    kernel samples into prev resolves them with its first: outside the graph that gather took an index
    kernel and a copy, each waiting its turn on the stream between two replays (benchmarks/NOTES-gpu.md,
    session 18)."""
    _feed_back_kernel[(1,)](ids, prev, ids.shape[0], BLOCK=max(16, triton.next_power_of_2(ids.shape[0])))
    return ids


@jit
def _feed_back_kernel(ids_ptr, prev_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=0)
    fed = ids < 0
    prev = tl.load(prev_ptr + tl.where(fed, -1 - ids, 0), mask=(offs < n) & fed, other=0)
    tl.store(ids_ptr + offs, tl.where(fed, prev, ids), mask=offs < n)


@jit
def _chunk_best_kernel(logits_ptr, stride, temps_ptr, seed_ptr, row_keys_ptr, positions_ptr, ws_ptr, stride_ws,
                       stride_kind, vocab, vocab_offset, keys_ptr, row_max_ptr, min_p_ptr, hist_ptr, hist_span,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, KEEP: tl.constexpr,
                       SEEDED: tl.constexpr, PDL: tl.constexpr):
    """Grid (B, chunks): the best score and its index in row's vocabulary [chunk * CHUNK, + CHUNK).
    ALIGNED: vocab_offset is a multiple of 4, so the tile's tokens are whole groups of 4 (one Philox call
    each); otherwise each token makes its own call and keeps its lane, which draws the same numbers.
    With PDL the temperature and the seed, step inputs, are read before the wait (nanovllm/kernels/pdl.py).
    KEEP (see Keep): tokens below the row's key or its min-p are out, and each program zeroes hist_span
    bins of the row's histogram. SEEDED: a row whose own key is >= 0 draws by it at its position."""
    launch_dependents(PDL)
    row, chunk = tl.program_id(0), tl.program_id(1)
    temp = tl.load(temps_ptr + row)
    inv_temp = 1.0 / tl.where(temp > 0, temp, 1.0)
    seed = tl.load(seed_ptr)
    counter, stream = row, 0  # Philox's counters after the vocabulary index: (row, 0) or (position, 1)
    if SEEDED:
        own = tl.load(row_keys_ptr + row)
        seeded = own >= 0
        seed = tl.where(seeded, own, seed)
        counter = tl.where(seeded, tl.load(positions_ptr + row).to(tl.int32), row)
        stream = seeded.to(tl.int32)
    if KEEP:
        min_p = tl.load(min_p_ptr + row)
    wait_previous(PDL)  # the logits come from the LM head
    if KEEP:  # the thresholds come from the kernel before
        lowest_key = tl.load(keys_ptr + row)
        row_max = tl.load(row_max_ptr + row)
        bins = chunk * hist_span + tl.arange(0, 1024)
        for start in range(0, hist_span, 1024):
            tl.store(hist_ptr + row.to(tl.int64) * 65536 + start + bins, 0,
                     mask=(start + tl.arange(0, 1024) < hist_span) & (start + bins < 65536))
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    best = -float("inf")
    best_idx = 0
    for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        x = tl.load(row_ptr + offs, mask=mask, other=-float("inf"))
        if KEEP:
            mask &= (to_key(x) >= lowest_key) & (tl.exp((x.to(tl.float32) - row_max) * inv_temp) >= min_p)
        x = x.to(tl.float32)
        if temp > 0:  # greedy rows skip the random numbers
            # Keyed by the full vocabulary's index: u = 0 gives -inf, never picked.
            u = _uniforms(seed, counter, stream, vocab_offset + start, vocab_offset + offs, BLOCK, ALIGNED)
            x = x * inv_temp - tl.log(-tl.log(u))
        score = tl.where(mask, x, -float("inf"))
        tile_best = tl.max(score, axis=0)
        tile_idx = start + tl.argmax(score, axis=0)  # the first of equal maxima
        better = tile_best > best  # strict: an earlier tile wins a tie
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    ws = ws_ptr + row * stride_ws + chunk
    tl.store(ws, best)
    tl.store((ws + stride_kind).to(tl.pointer_type(tl.int32)), vocab_offset + best_idx)


@jit
def _uniforms(seed, counter, stream, first, index, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Uniforms in [0, 1) for the vocabulary indices `index` (BLOCK of them, first..first + BLOCK - 1):
    lane index % 4 of Philox(seed; index // 4, counter, stream, 0). ALIGNED: first % 4 == 0."""
    if ALIGNED:  # one call per 4 tokens, its 4 outputs interleaved back into token order
        r0, r1, r2, r3 = tl.philox(seed, first // 4 + tl.arange(0, BLOCK // 4), counter, stream, 0)
        bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])  # [4n + 2a + b] = r(2a + b)[n]
    else:
        r0, r1, r2, r3 = tl.philox(seed, index // 4, counter + index * 0, stream + index * 0, 0)
        lane = index % 4
        bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return tl.uint_to_uniform_float(bits)


@jit
def _row_best_kernel(ws_ptr, stride_rank, stride_ws, stride_kind, out_ptr, ring_ptr, stride_ring, slot_ptr, chunks,
                     total, BLOCK: tl.constexpr, HOST: tl.constexpr, PDL: tl.constexpr):
    """Grid (B,): the row's best chunk over every rank (the first of equal scores) gives its token; with HOST
    also into ring[slot] (host memory). The slot is a step input: read before the wait."""
    launch_dependents(PDL)
    if HOST:
        ring_ptr += tl.load(slot_ptr) * stride_ring
    wait_previous(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)  # rank * chunks + chunk: the order of the vocabulary
    ptrs = ws_ptr + (offs // chunks) * stride_rank + row * stride_ws + offs % chunks
    scores = tl.load(ptrs, mask=offs < total, other=-float("inf"))
    best = tl.argmax(scores, axis=0)
    best_ptr = ws_ptr + (best // chunks) * stride_rank + row * stride_ws + best % chunks + stride_kind
    token = tl.load(best_ptr.to(tl.pointer_type(tl.int32))).to(tl.int64)
    tl.store(out_ptr + row, token)
    if HOST:
        tl.store(ring_ptr + row, token)
