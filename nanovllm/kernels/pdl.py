"""Programmatic dependent launch (PDL, Hopper or newer) for the Triton kernels of a decode step.

A kernel launched with PDL (`launch_pdl=True`) may be scheduled onto the GPU while the kernel ahead of it in
the stream is still running: as soon as every program of that kernel has executed `launch_dependents()` or
exited. Its launch latency and prologue (pointer math, loads of weights) then hide under the previous
kernel's tail instead of adding ~1-3 µs per kernel. The contract every kernel here keeps:

1. `launch_dependents(PDL)` first: it only lets the *next* kernel be scheduled; that kernel's own wait still
   holds it until this one has finished and its writes are visible, so triggering early is always correct.
2. Before `wait_previous(PDL)` read only what no kernel of the forward writes: weights, and the step's
   inputs (positions, slot mapping, block tables, lengths), which are copied in before the forward starts;
   and, in the decode attention kernel, the KV cache at positions before each seq's new token (a decode
   step writes only the new token's slot, and graph replays run one after another). Write nothing.
3. `wait_previous(PDL)` in every program, before any other read or write: it returns once the kernel ahead
   has completed. As that kernel waited for the one before it, completion is transitive, so this also
   covers inputs written several kernels back (the residual stream, the KV cache) and kernels that were
   not launched with PDL (cuBLAS): after those the wait returns at once.

CUDA-graph capture keeps the programmatic edges (CUDA 12.3+), so the decode graphs replay with them.
NANOVLLM_PDL=0 turns PDL off everywhere; the interpreter has no griddepcontrol, so it is off there too
(tests may still force a kernel's PDL path there: griddepcontrol is then a no-op).

Only for steps of up to PDL_MAX_TOKENS tokens (NANOVLLM_PDL_MAX_TOKENS, default 4): measured on an H200
(results/pdl-h200.json), PDL took the batch-1 decode step from 0.920 to 0.799 ms but the batch-8 one from
1.128 to 1.296 ms. A kernel that triggers first lets the next one's programs take SM slots while they wait,
which a kernel of one wave does not miss and a kernel of several waves does. On an H100, steps of 2 and 4
seqs gain 4-6 % and batch 1 and 8 do not move (results/pdl_tokens-h100.json); the H200 is untimed there.
"""
from __future__ import annotations

import functools
import os

import torch

from nanovllm.kernels import jit

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton never launch a kernel
    triton = tl = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if _INTERPRET:  # no griddepcontrol there, and kernels run one after another: a kernel's PDL path (what it
    # reads before the wait, its peeled first steps) can still be tested there, with these as no-ops
    @jit
    def gdc_launch_dependents():
        pass

    @jit
    def gdc_wait():
        pass


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """The device can launch with PDL: Hopper (sm_90) or newer, and a Triton with griddepcontrol."""
    return (gdc_wait is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def pdl_enabled(device: torch.device, num_tokens: int = 1) -> bool:
    """Whether kernels on `device` for a step of num_tokens tokens launch with PDL: where supported, up to
    NANOVLLM_PDL_MAX_TOKENS tokens, unless NANOVLLM_PDL=0 (both read per call, so a benchmark can compare
    settings in one process)."""
    return (os.environ.get("NANOVLLM_PDL", "1") != "0" and not _INTERPRET and pdl_supported(device)
            and num_tokens <= int(os.environ.get("NANOVLLM_PDL_MAX_TOKENS", "4")))


@jit
def launch_dependents(PDL: tl.constexpr):
    """Lets the next kernel in the stream be scheduled now (its wait still orders it after this one)."""
    if PDL:
        gdc_launch_dependents()


@jit
def wait_previous(PDL: tl.constexpr):
    """Returns once the kernel ahead in the stream has completed and its writes are visible."""
    if PDL:
        gdc_wait()
