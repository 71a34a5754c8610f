"""Top-k and top-p thresholds without a sort: a histogram of the logits' 16-bit keys, then a scan from the top.

A sort of the vocabulary per row is what the eager Sampler does, and on a GPU it is slow at a few rows (a
batch-1 step with top-k or top-p cost ~0.25 ms more than one with temperature alone on an H100, sorted in a
CUDA graph or not: benchmarks/NOTES-gpu.md, session 28). But a bf16 or fp16 logit has only 65,536 values,
and its bits map to a 16-bit key in the same order (positive: flip the sign bit; negative: flip all bits).
So each row's tokens are counted per key, and the thresholds are found from the counts:

1. `_stats_kernel`, grid (B, chunks): each chunk's max and softmax sum at the row's temperature, and one
   atomic increment per token into the row's 65,536-bin histogram (rows without top-k or top-p skip it).
   Key k counts in bin (k x 40503) mod 65,536 (bin_of): neighbouring values, which many tokens share, would
   otherwise queue on the same few L2 lines (at batch 1 on an H100 this took the two kernels from 24 to 13 µs).
2. `_threshold_kernel`, grid (B,): the row's max M and sum Z from its chunks, then a walk down the keys from
   M's, 8 x 1,024 keys a step (row sums first, then the row that crosses): top-k's threshold is the first
   key where the count from the top reaches k; top-p's is the first where the mass from the top, each key's
   count x exp((value - M) / T), reaches p times the mass top-k keeps. A row keeps the keys at or above the
   higher of the two.

The draw then masks as it goes (kernels/sample.py: keys below the threshold, and min-p's probability ratio
exp((x - M) / T) < min_p, need no search) and zeroes the histogram for the next step. The semantics are
layers/sampler.filter_logits': ties at a boundary are kept or dropped together.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nanovllm.kernels import jit

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

KEYS = 1 << 16
_ROWS, _TILE, _WALK_WARPS = 8, 1024, 4  # the walk's step is _ROWS x _TILE keys, over _WALK_WARPS warps
_CHUNK = 1024  # tokens per program of the first pass


class FilterWorkspace(NamedTuple):
    """Buffers of the filter kernels for up to R rows: made once (the histogram zeroed) by a caller that
    replays them in a CUDA graph. The draw zeroes the histogram again after each use."""
    hist: torch.Tensor  # (R, KEYS) int32
    stats: torch.Tensor  # (R, 2, chunks) float32: each chunk's max and softmax sum
    keep: torch.Tensor  # (R,) int32: the lowest key a row keeps (0: every token)
    row_max: torch.Tensor  # (R,) float32: each row's largest logit

    @classmethod
    def make(cls, rows: int, vocab: int, device: torch.device | str) -> FilterWorkspace:
        return cls(torch.zeros(rows, KEYS, dtype=torch.int32, device=device),
                   torch.empty(rows, 2, -(-vocab // _CHUNK), dtype=torch.float32, device=device),
                   torch.zeros(rows, dtype=torch.int32, device=device),
                   torch.zeros(rows, dtype=torch.float32, device=device))


def supports(dtype: torch.dtype) -> bool:
    """The kernels read 16-bit float logits; others take filter_logits."""
    return dtype in (torch.bfloat16, torch.float16)


def thresholds(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
               ws: FilterWorkspace) -> FilterWorkspace:
    """logits (B, V) bf16/fp16 with unit stride on V; temperatures (B,) float32 (0: greedy, no filters);
    top_k (B,) float32 (>= V: off); top_p (B,) float32 (1: off). Fills ws.keep[:B] and ws.row_max[:B], and
    counts into ws.hist, which the draw must zero (sample.sample's `keep`). No host sync."""
    batch, vocab = logits.shape
    assert supports(logits.dtype) and logits.stride(-1) == 1
    chunks = -(-vocab // _CHUNK)
    _stats_kernel[(batch, chunks)](logits, logits.stride(0), temperatures, top_k, top_p, ws.hist, ws.stats,
                                   ws.stats.stride(0), ws.stats.stride(1), vocab, CHUNK=_CHUNK)
    _threshold_kernel[(batch,)](ws.hist, ws.stats, ws.stats.stride(0), ws.stats.stride(1), temperatures, top_k,
                                top_p, ws.keep, ws.row_max, chunks, vocab,
                                BF16=logits.dtype == torch.bfloat16, ROWS=_ROWS, TILE=_TILE,
                                CHUNKS=triton.next_power_of_2(chunks), num_warps=_WALK_WARPS)
    return ws


def keys_ref(x: torch.Tensor) -> torch.Tensor:
    """to_key in torch: 16-bit float values -> int32 keys in their order."""
    bits = x.view(torch.int16).int() & 0xFFFF
    return torch.where(bits >= 0x8000, 0xFFFF - bits, bits | 0x8000)


@jit
def to_key(x):
    """16-bit float values -> int32 keys in [0, 65536) in the values' order."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return tl.where(bits >= 0x8000, 0xFFFF - bits, bits | 0x8000)


@jit
def bin_of(key):
    """Where a key's count lives in its row's histogram: keys times an odd number, mod 65,536 (a bijection), so
    that the many tokens of neighbouring keys do not queue for the same few cache lines in the L2."""
    return (key * 40503) & 0xFFFF


@jit
def from_key(key, BF16: tl.constexpr):
    """to_key's inverse, as float32 values."""
    bits = tl.where(key >= 0x8000, key & 0x7FFF, 0xFFFF - key).to(tl.int16)
    if BF16:
        return bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@jit
def _inv_temp(temps_ptr, row):
    temp = tl.load(temps_ptr + row)
    return 1.0 / tl.where(temp > 0, temp, 1.0), temp > 0


@jit
def _stats_kernel(logits_ptr, stride, temps_ptr, top_k_ptr, top_p_ptr, hist_ptr, stats_ptr, stride_st,
                  stride_kind, vocab, CHUNK: tl.constexpr):
    """Grid (B, chunks): the chunk's max and sum of exp((x - max) / T), and its tokens counted per key."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    inv_temp, hot = _inv_temp(temps_ptr, row)
    filtered = hot & ((tl.load(top_k_ptr + row) < vocab) | (tl.load(top_p_ptr + row) < 1.0))
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < vocab
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=mask, other=-float("inf"))
    top = tl.max(x.to(tl.float32), axis=0)
    total = tl.sum(tl.where(mask, tl.exp((x.to(tl.float32) - top) * inv_temp), 0.0), axis=0)
    st = stats_ptr + row * stride_st + chunk
    tl.store(st, top)
    tl.store(st + stride_kind, total)
    if filtered:
        tl.atomic_add(hist_ptr + row.to(tl.int64) * 65536 + bin_of(to_key(x)), 1, mask=mask, sem="relaxed")


@jit
def _walk(hist, hi, lo, goal, top, inv_temp, BY_MASS: tl.constexpr, BF16: tl.constexpr, ROWS: tl.constexpr,
          TILE: tl.constexpr):
    """Walks the keys down from hi, ROWS x TILE at a time (their row sums first, then the row that crosses),
    until the count (BY_MASS: the mass) of the keys from hi down reaches goal. Returns the key where it does
    (lo if none does before lo) and the mass from hi down to that key."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, TILE)
    offs = r[:, None] * TILE + c[None, :]  # (ROWS, TILE): row-major, descending keys
    key = lo
    kept = 0.0
    acc = 0.0  # the count (or mass) above hi
    mass = 0.0  # the mass above hi
    while hi >= lo:
        keys = hi - offs
        n = tl.load(hist + bin_of(keys), mask=keys >= lo, other=0).to(tl.float32)
        w = n * tl.exp((from_key(keys, BF16) - top) * inv_temp)
        v = w if BY_MASS else n
        row_v = tl.sum(v, axis=1)  # (ROWS,)
        row_w = tl.sum(w, axis=1)
        cross = tl.min(tl.where(acc + tl.cumsum(row_v, axis=0) >= goal, r, ROWS), axis=0)
        if cross < ROWS:
            in_row = r[:, None] == cross
            cum = acc + tl.sum(tl.where(r < cross, row_v, 0.0), axis=0) + tl.cumsum(
                tl.sum(tl.where(in_row, v, 0.0), axis=0), axis=0)  # (TILE,)
            at = tl.min(tl.where(cum >= goal, c, TILE), axis=0)
            key = hi - cross * TILE - at
            kept = mass + tl.sum(tl.where(r < cross, row_w, 0.0), axis=0) + tl.sum(
                tl.where(c <= at, tl.sum(tl.where(in_row, w, 0.0), axis=0), 0.0), axis=0)
            hi = lo - 1
        else:
            acc += tl.sum(row_v, axis=0)
            mass += tl.sum(row_w, axis=0)
            kept = mass
            hi -= ROWS * TILE
    return key, kept


@jit
def _threshold_kernel(hist_ptr, stats_ptr, stride_st, stride_kind, temps_ptr, top_k_ptr, top_p_ptr, keep_ptr,
                      row_max_ptr, chunks, vocab, BF16: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr,
                      CHUNKS: tl.constexpr):
    """Grid (B,): the lowest key the row keeps, and its max logit."""
    row = tl.program_id(0)
    inv_temp, hot = _inv_temp(temps_ptr, row)
    c = tl.arange(0, CHUNKS)
    st = stats_ptr + row * stride_st + c
    tops = tl.load(st, mask=c < chunks, other=-float("inf"))
    top = tl.max(tops, axis=0)
    total = tl.sum(tl.load(st + stride_kind, mask=c < chunks, other=0.0) * tl.exp((tops - top) * inv_temp), axis=0)
    top_key = to_key(top.to(tl.bfloat16 if BF16 else tl.float16))
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    hist = hist_ptr + row.to(tl.int64) * 65536
    keep_k = 0
    kept = total  # the mass top-k keeps (all of it without top-k)
    if hot & (k < vocab):  # down to the k-th token
        keep_k, kept = _walk(hist, top_key, 0, k, top, inv_temp, False, BF16, ROWS, TILE)
    keep_p = keep_k
    if hot & (p < 1.0):  # down to where the mass from the top reaches p of what top-k keeps
        keep_p, _ = _walk(hist, top_key, keep_k, p * kept, top, inv_temp, True, BF16, ROWS, TILE)
    tl.store(keep_ptr + row, keep_p)
    tl.store(row_max_ptr + row, top)
