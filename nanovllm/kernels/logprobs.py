"""Logprobs of sampled tokens straight from the logits: no (B, V) float32 copy, no sort, two kernels.

What the Sampler's gather_logprobs gives (layers/sampler.py: log_softmax, the token's logprob and rank, topk),
for a decode graph to replay after its sampler, so a request that asks for logprobs keeps its steps in CUDA
graphs. In torch that is ~10 launches a step plus topk's radix passes: at batch 1 on an H100 the host's
launches, not the GPU, set the pace, 0.91 ms a token against 0.65 without logprobs
(benchmarks/NOTES-gpu.md, session 31).

1. `_chunk_kernel`, grid (B, chunks): each chunk's max and sum of exp(x - max), how many of its logits
   exceed the sampled token's, and its `width` largest logits with their ids.
2. `_row_kernel`, grid (B,): the row's log-sum-exp from its chunks, the token's logprob (x - lse) and rank
   (1 + the count), and the row's `width` largest from the chunks' candidates, as logprobs.

A top list is `width` max reductions, each masking the one it found. A logit and its id travel as one int64
sort key (`_sort_key`: the float's bits made orderable, then the id's complement), so each is one reduction
of one value, with no second reduction to fetch the id of the max, and equal logits give the lowest id.

Ranks and top lists compare raw logits, which order as the logprobs do. Ties in a top list come lowest id
first; torch.topk leaves their order open. `width` is one of TOP_WIDTHS, the smallest that covers the
logprobs a step asks for (a compiled variant each).

With a HostOut the row kernel also writes each row's results, packed (PACKED), straight into a ring row of
pinned host memory, as kernels/sample.py writes the ids: four copies to the host after each step had kept
the GPU idle for each one's latency.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nanovllm.kernels import jit
from nanovllm.kernels.sample import HostOut
from nanovllm.layers.sampler import gather_logprobs
from nanovllm.sampling_params import MAX_LOGPROBS

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use logprobs_ref
    triton = tl = None

TOP_WIDTHS = (0, 5, MAX_LOGPROBS)  # top lists a kernel variant fills: up to the most a request may ask
CHUNK, SMALL_CHUNK, SMALL_CHUNK_ROWS = 4096, 1024, 32  # logits a program reads: narrower at a few rows
# A row's results packed as float32 in a host ring: [logprob, rank, top logprobs (MAX_LOGPROBS), top ids
# (MAX_LOGPROBS)]; ranks and ids are exact in float32 below 2^24 (a vocabulary of up to 16.7M tokens).
PACKED = 2 + 2 * MAX_LOGPROBS


def pack_ref(logprob: torch.Tensor, rank: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """What the row kernel writes into a host ring row: out (>= B, PACKED) float32, rows [:B]."""
    batch, width = top_ids.shape
    out[:batch, 0], out[:batch, 1] = logprob, rank.float()
    out[:batch, 2:2 + width], out[:batch, 2 + MAX_LOGPROBS:2 + MAX_LOGPROBS + width] = top_logprobs, top_ids.float()
    return out


def unpack(packed: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """A ring row's (B, PACKED) results as logprobs_ref returns them: (logprob, rank, top ids, top logprobs)."""
    return (packed[:, 0], packed[:, 1].long(), packed[:, 2 + MAX_LOGPROBS:2 + MAX_LOGPROBS + width].long(),
            packed[:, 2:2 + width])


def top_width(k: int) -> int:
    """The narrowest variant's top-list width that holds k logprobs (k <= MAX_LOGPROBS)."""
    return next(w for w in TOP_WIDTHS if w >= k)


def logprobs_ref(logits: torch.Tensor, token_ids: torch.Tensor, width: int):
    """(logprob (B,) float32, rank (B,) int64, top ids (B, width) int64, top logprobs (B, width) float32), as
    the Sampler computes them (SamplerOutput's order)."""
    out = gather_logprobs(logits, token_ids, width)
    return out.logprobs, out.ranks, out.top_ids, out.top_logprobs


class LogprobsBuffers(NamedTuple):
    """Outputs and workspace for up to R rows of a V-token vocabulary, made once by a caller that replays
    logprobs() in a CUDA graph."""
    logprob: torch.Tensor  # (R,) float32
    rank: torch.Tensor  # (R,) int64
    top_logprobs: torch.Tensor  # (R, MAX_LOGPROBS) float32: the first `width` columns are written
    top_ids: torch.Tensor  # (R, MAX_LOGPROBS) int64
    stats: torch.Tensor  # (R, chunks, 3) float32: each chunk's max, exp sum and count above the token
    candidates: torch.Tensor  # (R, chunks * MAX_LOGPROBS) int64: each chunk's largest logits, as sort keys

    @classmethod
    def make(cls, rows: int, vocab: int, device: torch.device | str) -> LogprobsBuffers:
        chunks, top = -(-vocab // SMALL_CHUNK), TOP_WIDTHS[-1]
        empty = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device=device)  # noqa: E731
        return cls(empty(rows), empty(rows, dtype=torch.int64), empty(rows, top), empty(rows, top, dtype=torch.int64),
                   empty(rows, chunks, 3), empty(rows, chunks * top, dtype=torch.int64))


def logprobs(logits: torch.Tensor, token_ids: torch.Tensor, width: int, buffers: LogprobsBuffers,
             host_out: HostOut | None = None):
    """logits (B, V) raw, unit stride on V; token_ids (B,) int64 on the device; width in TOP_WIDTHS. Writes
    rows [:B] of buffers' outputs and returns them as logprobs_ref does; with host_out, also rows [:B] of
    ring[slot] ((S, >= B, PACKED) float32, pinned), packed as pack_ref packs them. No host sync, no
    allocation: CUDA-graph safe."""
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1 and width in TOP_WIDTHS and batch <= buffers.logprob.shape[0]
    assert width <= vocab <= 1 << 24, "a top list within the vocabulary; ids exact in float32"
    chunk = min(SMALL_CHUNK if batch <= SMALL_CHUNK_ROWS else CHUNK, triton.next_power_of_2(vocab))
    chunks = -(-vocab // chunk)
    assert buffers.stats.shape[1] >= chunks, "buffers made for a smaller vocabulary"
    if batch:
        stats, keys = buffers.stats, buffers.candidates
        _chunk_kernel[(batch, chunks)](logits, logits.stride(0), token_ids, stats, stats.stride(0), keys,
                                       keys.stride(0), vocab, CHUNK=chunk, WIDTH=width)
        ring, slot = host_out if host_out is not None else (buffers.stats, token_ids)  # unread without HOST
        _row_kernel[(batch,)](logits, logits.stride(0), token_ids, stats, stats.stride(0), keys,
                              keys.stride(0), buffers.logprob, buffers.rank, buffers.top_logprobs,
                              buffers.top_ids, buffers.top_ids.stride(0), ring, ring.stride(0), ring.stride(1),
                              slot, chunks, WIDTH=width, TOP=MAX_LOGPROBS, CHUNKS=triton.next_power_of_2(chunks),
                              CANDIDATES=triton.next_power_of_2(max(chunks * width, 1)), HOST=host_out is not None,
                              num_warps=8)
    return (buffers.logprob[:batch], buffers.rank[:batch], buffers.top_ids[:batch, :width],
            buffers.top_logprobs[:batch, :width])


_NONE = tl.constexpr(-(1 << 63)) if tl is not None else None  # below every sort key: taken, or no candidate


@jit
def _sort_key(x, ids):
    """int64 keys that order as (x, then the lower id) do: x's float32 bits, negative floats' flipped so that
    they order as signed ints, in the high half; 2^31 - 1 - id in the low half (ids below 2^31)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@jit
def _key_value(key):
    ordered = (key >> 32).to(tl.int32)
    return tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)


@jit
def _key_id(key):
    return 0x7FFFFFFF - (key & 0x7FFFFFFF)


@jit
def _chunk_kernel(logits_ptr, stride, ids_ptr, stats_ptr, stride_stats, keys_ptr, stride_keys, vocab,
                  CHUNK: tl.constexpr, WIDTH: tl.constexpr):
    row, chunk = tl.program_id(0), tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    token_logit = tl.load(row_ptr + tl.load(ids_ptr + row)).to(tl.float32)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(row_ptr + offs, mask=offs < vocab, other=-float("inf")).to(tl.float32)
    high = tl.max(x, axis=0)
    stats = stats_ptr + row * stride_stats + chunk * 3
    tl.store(stats, high)
    tl.store(stats + 1, tl.sum(tl.exp(x - tl.where(high > -float("inf"), high, 0.0)), axis=0))  # all -inf: 0
    tl.store(stats + 2, tl.sum((x > token_logit).to(tl.float32), axis=0))  # exact below 2^24
    if WIDTH > 0:
        keys = tl.where(offs < vocab, _sort_key(x, offs), _NONE)
        out = keys_ptr + row * stride_keys + chunk * WIDTH
        for i in tl.static_range(WIDTH):
            best = tl.max(keys, axis=0)
            tl.store(out + i, best)
            keys = tl.where(keys == best, _NONE, keys)


@jit
def _row_kernel(logits_ptr, stride, ids_ptr, stats_ptr, stride_stats, keys_ptr, stride_keys, logprob_ptr,
                rank_ptr, top_lp_ptr, top_ids_ptr, stride_top, ring_ptr, stride_slot, stride_ring, slot_ptr, chunks,
                WIDTH: tl.constexpr, TOP: tl.constexpr, CHUNKS: tl.constexpr, CANDIDATES: tl.constexpr,
                HOST: tl.constexpr):
    row = tl.program_id(0)
    if HOST:  # this row of the ring's slot row (pinned host memory): PACKED floats
        ring_ptr += tl.load(slot_ptr) * stride_slot + row * stride_ring
    c = tl.arange(0, CHUNKS)
    stats = stats_ptr + row * stride_stats + c * 3
    highs = tl.load(stats, mask=c < chunks, other=-float("inf"))
    high = tl.max(highs, axis=0)
    total = tl.sum(tl.load(stats + 1, mask=c < chunks, other=0.0) * tl.exp(highs - high), axis=0)
    lse = high + tl.log(total)
    token = tl.load(ids_ptr + row)
    logprob = tl.load(logits_ptr + row.to(tl.int64) * stride + token).to(tl.float32) - lse
    tl.store(logprob_ptr + row, logprob)
    above = tl.sum(tl.load(stats + 2, mask=c < chunks, other=0.0), axis=0)
    tl.store(rank_ptr + row, above.to(tl.int64) + 1)
    if HOST:
        tl.store(ring_ptr, logprob)
        tl.store(ring_ptr + 1, above + 1.0)
    if WIDTH > 0:
        k = tl.arange(0, CANDIDATES)
        keys = tl.load(keys_ptr + row * stride_keys + k, mask=k < chunks * WIDTH, other=_NONE)
        for i in tl.static_range(WIDTH):
            best = tl.max(keys, axis=0)
            value, top_id = _key_value(best), _key_id(best)
            tl.store(top_lp_ptr + row * stride_top + i, value - lse)
            tl.store(top_ids_ptr + row * stride_top + i, top_id)
            if HOST:
                tl.store(ring_ptr + 2 + i, value - lse)
                tl.store(ring_ptr + 2 + TOP + i, top_id.to(tl.float32))
            keys = tl.where(keys == best, _NONE, keys)
