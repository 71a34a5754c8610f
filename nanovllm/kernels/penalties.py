"""Repetition, frequency and presence penalties in one kernel launch, for the Sampler's rows on CUDA.

The torch path (layers/sampler.apply_penalties, which the CPU runs and the tests compare with) builds a
(B, V) mask and a (B, V) count with scatters and applies them with elementwise ops: about eight launches
over (B, V) tensors a step, for the few hundred logits a row's history names. Here one program a row touches
only the listed ids, in three passes over them with a barrier between:

1. count: for each id an int32 in a scratch row, the occurrences among the output ids in its low bits and a
   flag for any occurrence in the history (integer atomics: the same counts in any order);
2. write: each listed id's penalized logit, from its raw logit (an id listed twice is written twice, with the
   same value);
3. clear: the scratch entries back to zero, so the scratch needs no memset before the next call.

The arithmetic is the torch path's, in its order, with no fused multiply-add (enable_fp_fusion=False) and
IEEE division: the same bits. The scratch is one per device, so calls must not overlap on two streams (the
Sampler's run on the engine's one). Batch 1 steady 0.714 -> 0.701 ms per token on an H100
(benchmarks/NOTES-gpu.md, session 33).
"""
from __future__ import annotations

import torch

from nanovllm.kernels import jit

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use the torch path
    triton = tl = None

BLOCK = 1024  # ids a pass takes at a time
# The scratch's flag for an id in the history; the count of its output occurrences stays below it.
_SEEN = tl.constexpr(1 << 30) if tl is not None else 1 << 30
_scratch: dict[torch.device, torch.Tensor] = {}


def _scratch_rows(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A (>= rows, vocab) int32 scratch of zeros, kept per device and grown when a batch needs more rows."""
    scratch = _scratch.get(device)
    if scratch is None or scratch.shape[0] < rows or scratch.shape[1] != vocab:
        scratch = _scratch[device] = torch.zeros(max(rows, 8), vocab, dtype=torch.int32, device=device)
    return scratch


def apply_penalties(processed: torch.Tensor, raw: torch.Tensor, seen_ids: torch.Tensor | None,
                    repetition: torch.Tensor | None, output_ids: torch.Tensor | None,
                    frequency: torch.Tensor | None, presence: torch.Tensor | None) -> torch.Tensor:
    """processed (B, V) float32, equal to raw (B, V, the model dtype) so far: repetition penalty (HF: divide a
    positive logit, multiply a negative one) for the ids in seen_ids (B, Ls) int64, frequency and presence
    penalties (OpenAI: subtract per occurrence, once) for those in output_ids (B, Lo), both padded with V;
    the penalties (B,) float32. Writes processed in place and returns it, as layers/sampler.apply_penalties
    returns its result."""
    batch, vocab = processed.shape
    assert processed.dtype == torch.float32 and processed.stride(1) == 1 and raw.stride(1) == 1
    assert processed.data_ptr() != raw.data_ptr(), "raw must be its own copy: a repeated id would be penalized twice"
    if batch == 0 or (seen_ids is None and output_ids is None):
        return processed
    scratch = _scratch_rows(batch, vocab, processed.device)
    seen = seen_ids if seen_ids is not None else processed  # never read without HAS_REP
    outs = output_ids if output_ids is not None else processed  # nor without HAS_FREQ
    _penalties_kernel[(batch,)](
        processed, processed.stride(0), raw, raw.stride(0), scratch, scratch.stride(0), vocab,
        seen, seen.stride(0), seen.shape[1] if seen_ids is not None else 0,
        repetition if repetition is not None else processed,
        outs, outs.stride(0), outs.shape[1] if output_ids is not None else 0,
        frequency if frequency is not None else processed, presence if presence is not None else processed,
        HAS_REP=seen_ids is not None, HAS_FREQ=output_ids is not None, BLOCK=BLOCK, num_warps=4,
        enable_fp_fusion=False)
    return processed


@jit
def _mark(ids_ptr, n, scratch, vocab, value, ADD: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        ids = tl.load(ids_ptr + start + cols, mask=start + cols < n, other=vocab)
        if ADD:
            tl.atomic_add(scratch + ids, value, mask=ids < vocab)
        else:
            tl.atomic_or(scratch + ids, value, mask=ids < vocab)


@jit
def _write(ids_ptr, n, scratch, vocab, out_row, raw_row, rep_ptr, freq_ptr, pres_ptr, row,
           HAS_REP: tl.constexpr, HAS_FREQ: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        ids = tl.load(ids_ptr + start + cols, mask=start + cols < n, other=vocab)
        valid = ids < vocab
        flags = tl.atomic_add(scratch + ids, 0, mask=valid)  # a read at the L2, after the atomics of pass 1
        x = tl.load(raw_row + ids, mask=valid, other=0.0).to(tl.float32)
        if HAS_REP:
            penalty = tl.load(rep_ptr + row)
            penalized = tl.where(x > 0, tl.math.div_rn(x, penalty), x * penalty)
            x = tl.where((flags & _SEEN) != 0, penalized, x)
        if HAS_FREQ:
            counts = (flags & (_SEEN - 1)).to(tl.float32)
            x = x - tl.load(freq_ptr + row) * counts
            x = x - tl.load(pres_ptr + row) * (counts > 0).to(tl.float32)
        tl.store(out_row + ids, x, mask=valid)


@jit
def _clear(ids_ptr, n, scratch, vocab, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        ids = tl.load(ids_ptr + start + cols, mask=start + cols < n, other=vocab)
        tl.store(scratch + ids, 0, mask=ids < vocab)


@jit(do_not_specialize=["stride_seen", "n_seen", "stride_outs", "n_outs"])  # they change every step
def _penalties_kernel(out_ptr, stride_out, raw_ptr, stride_raw, scratch_ptr, stride_scratch, vocab,
                      seen_ptr, stride_seen, n_seen, rep_ptr, outs_ptr, stride_outs, n_outs, freq_ptr, pres_ptr,
                      HAS_REP: tl.constexpr, HAS_FREQ: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    scratch = scratch_ptr + row.to(tl.int64) * stride_scratch
    seen = seen_ptr + row.to(tl.int64) * stride_seen
    outs = outs_ptr + row.to(tl.int64) * stride_outs
    out_row = out_ptr + row.to(tl.int64) * stride_out
    raw_row = raw_ptr + row.to(tl.int64) * stride_raw
    if HAS_REP:
        _mark(seen, n_seen, scratch, vocab, _SEEN, False, BLOCK)
    if HAS_FREQ:
        _mark(outs, n_outs, scratch, vocab, 1, True, BLOCK)
    tl.debug_barrier()
    if HAS_REP:
        _write(seen, n_seen, scratch, vocab, out_row, raw_row, rep_ptr, freq_ptr, pres_ptr, row, HAS_REP, HAS_FREQ,
               BLOCK)
    if HAS_FREQ:
        _write(outs, n_outs, scratch, vocab, out_row, raw_row, rep_ptr, freq_ptr, pres_ptr, row, HAS_REP, HAS_FREQ,
               BLOCK)
    tl.debug_barrier()
    if HAS_REP:
        _clear(seen, n_seen, scratch, vocab, BLOCK)
    if HAS_FREQ:
        _clear(outs, n_outs, scratch, vocab, BLOCK)
