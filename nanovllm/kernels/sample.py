"""Temperature sampling (and argmax) straight from the logits: one pass over each row, no softmax.

Drawing token i with probability softmax(logits / T)_i is the Gumbel-max trick: argmax(logits / T + g) with
g = -log(-log(u)), u uniform (0, 1), i.i.d. per token; rows with T = 0 take the plain argmax. A program
reads its row once in the model dtype (bf16: 2 bytes per token), where the torch path (fp32 copy, softmax,
exponential draws, divide, argmax) moves ~20 bytes per token: ~0.4 ms per step at batch 256 with Qwen3's
151,936-token vocabulary on an H100. Random numbers come from Philox (tl.rand) keyed by a seed that lives
in device memory, so a CUDA graph that replays the kernel and then bumps the seed draws fresh numbers
every replay; the reference uses torch's generator instead, so the two agree in distribution, not in draws.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use sample_ref
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)
_BLOCK = 2048


def sample_ref(logits: torch.Tensor, temperatures: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The Sampler's exponential race, argmax(p / q) with q ~ Exp(1), at per-row temperatures (0: argmax).
    logits (B, V) in any float dtype, temperatures (B,) float32, out (B,) int64."""
    temps = temperatures[:, None]  # (B, 1)
    probs = torch.softmax(logits.float() / torch.where(temps > 0, temps, 1.0), dim=-1)  # (B, V)
    q = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    return torch.where(temps[:, 0] > 0, probs.div_(q).argmax(dim=-1), logits.argmax(dim=-1), out=out)


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """logits (B, V) with unit stride on V, temperatures (B,) float32, seed (1,) int64 on the device (the
    caller advances it between draws), out (B,) int64. No host sync, no allocation: CUDA-graph safe."""
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1 and out.dtype == torch.int64
    if batch:
        block = min(_BLOCK, triton.next_power_of_2(vocab))
        _sample_kernel[(batch,)](logits, logits.stride(0), temperatures, seed, out, vocab, BLOCK=block)
    return out


@_jit
def _sample_kernel(logits_ptr, stride, temps_ptr, seed_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    """Grid (B,): one program per row walks the vocabulary in BLOCK-wide tiles, keeping the best score."""
    row = tl.program_id(0)
    temp = tl.load(temps_ptr + row)
    inv_temp = 1.0 / tl.where(temp > 0, temp, 1.0)
    seed = tl.load(seed_ptr)
    best = -float("inf")
    best_idx = 0
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + offs, mask=mask, other=-float("inf")).to(tl.float32)
        u = tl.rand(seed, row * vocab + offs)  # uniform [0, 1); u = 0 gives g = -inf: never picked
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(temp > 0, x * inv_temp + gumbel, x)
        score = tl.where(mask, score, -float("inf"))
        tile_best = tl.max(score, axis=0)
        tile_idx = start + tl.argmax(score, axis=0)
        better = tile_best > best  # strict: the first of equal scores wins, as in torch.argmax
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_best, best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))
