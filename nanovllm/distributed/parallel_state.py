"""This process's place in the tensor-parallel group, and the two collectives the layers need.

Layers read `get_tp_rank()` / `get_tp_size()` when they are built, so the group must exist before the model
is: rank 0 (the engine's process) and every worker call `init_tensor_parallel` first. Without it the size
is 1 and every collective here is a no-op, so a single-process model never touches torch.distributed.
On CUDA the all-reduce goes through a symmetric-memory buffer when the message fits (all_reduce.py), unless
NANOVLLM_SYMM_MEM=0.
"""
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from nanovllm.config import ModelConfig
from nanovllm.distributed.all_reduce import SymmMemAllReduce, symm_mem_fresh, symm_mem_requested, symm_mem_supported

_TP_RANK, _TP_SIZE = 0, 1
_SYMM_MEM: SymmMemAllReduce | None = None  # CUDA groups: the all-reduce's persistent buffer


def get_tp_rank() -> int:
    return _TP_RANK


def get_tp_size() -> int:
    return _TP_SIZE


@contextmanager
def single_rank() -> Iterator[None]:
    """Layers built inside take their full, unsharded sizes (e.g. a meta-device model that lists the
    checkpoint's shapes), whatever this process's rank."""
    global _TP_RANK, _TP_SIZE
    saved, (_TP_RANK, _TP_SIZE) = (_TP_RANK, _TP_SIZE), (0, 1)
    try:
        yield
    finally:
        _TP_RANK, _TP_SIZE = saved


def init_tensor_parallel(rank: int, world_size: int, store: dist.Store, device: torch.device,
                         timeout_s: float) -> None:
    """Joins the group: gloo on CPU, NCCL on CUDA (and the symmetric-memory all-reduce where it can). A
    collective that waits longer than timeout_s fails, so a hung peer cannot hang the engine forever."""
    global _TP_RANK, _TP_SIZE
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    _TP_RANK, _TP_SIZE = rank, world_size
    if backend == "nccl" and symm_mem_requested() and symm_mem_supported(world_size, device):
        _init_symm_mem(device, timeout_s)


def _init_symm_mem(device: torch.device, timeout_s: float) -> None:
    """Every rank uses the buffer, or none does: a rank that could not set it up falls back to NCCL, and
    the others must too, or their all-reduces would never meet. So must a group with a rank whose process
    has been in a group before (all_reduce.symm_mem_fresh), which would hang in the rendezvous: the ranks
    agree on it before any of them enters."""
    global _SYMM_MEM
    if not min_over_ranks(int(symm_mem_fresh()), device):
        warnings.warn("a second tensor-parallel group in one process cannot map symmetric memory "
                      "(pytorch/pytorch#196082): its all-reduce takes NCCL", stacklevel=3)
        return
    try:
        symm_mem = SymmMemAllReduce(dist.group.WORLD.group_name, device, dist.get_world_size(), timeout_s=timeout_s)
    except RuntimeError as e:
        symm_mem = None
        warnings.warn(f"symmetric-memory all-reduce unavailable, using NCCL: {e}", stacklevel=2)
    if min_over_ranks(int(symm_mem is not None), device):
        _SYMM_MEM = symm_mem


def all_reduce_backend() -> str:
    """What all_reduce uses: "symm_mem" (then NCCL for what does not fit), "nccl", "gloo" or "none"."""
    if _TP_SIZE == 1:
        return "none"
    return "symm_mem" if _SYMM_MEM is not None else dist.get_backend()


def destroy_tensor_parallel() -> None:
    """Leaves the group. NCCL communicators are aborted, not finalized: finalizing is collective and waits
    for every peer (a dead one never comes) and, on the H100 pair, hung at close. The caller has dropped its
    CUDA graphs, which hold captured collectives, and nothing is in flight after the synchronize."""
    global _TP_RANK, _TP_SIZE, _SYMM_MEM
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            torch.cuda.synchronize()
            _SYMM_MEM = None  # frees the buffer (a local unmap, no collective) while the group still exists
            dist.distributed_c10d._abort_process_group()  # also forgets the group, as destroy does
        else:
            dist.destroy_process_group()
    _TP_RANK, _TP_SIZE = 0, 1


def reduce_slot(index: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Where to write a message that all_reduce then sums in place, saving the copy into the buffer: slot
    `index` of the symmetric-memory buffer (RowParallelLinear says which), or None: any tensor will do."""
    return _SYMM_MEM.slot(index, shape, dtype) if _SYMM_MEM is not None and _TP_SIZE > 1 else None


def all_reduce_add_rmsnorm(slot: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor | None,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For a (T, hidden) message in a slot (reduce_slot): (stream, normed), stream = its sum over the ranks
    + residual, normed = its RMSNorm with norm_weight (None without one), in one kernel."""
    assert _SYMM_MEM is not None, "only for a slot of the symmetric-memory buffer"
    return _SYMM_MEM.add_rmsnorm(slot, residual, norm_weight, eps)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the ranks, in place (or, for a slot of the symmetric buffer, into a new tensor that it
    returns); every rank gets the same bits."""
    if _TP_SIZE > 1:
        if _SYMM_MEM is not None and _SYMM_MEM.fits(x):
            return _SYMM_MEM(x)
        dist.all_reduce(x)
    return x


def gather_to_first(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Rank 0 gets the ranks' x concatenated along dim; the others get None."""
    if _TP_SIZE == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)] if _TP_RANK == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=dim) if _TP_RANK == 0 else None


def all_gather(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (tp, *x.shape): every rank's x, in rank order, on every rank. x contiguous. CUDA-graph safe on
    NCCL (one collective into out); gloo has only the list form."""
    if x.is_cuda:
        dist.all_gather_into_tensor(out, x)
    else:
        dist.all_gather(list(out.unbind(0)), x)
    return out


def check_tp_size(model_config: ModelConfig, tp_size: int, device: torch.device) -> None:
    """ValueError unless the heads split evenly: q heads by tp, and KV heads either by tp or, when there
    are fewer KV heads than ranks, tp by them (each KV head is then replicated on tp / num_kv_heads ranks)."""
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    if heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide the number of attention heads ({heads}).")
    if (kv_heads % tp_size) if kv_heads >= tp_size else (tp_size % kv_heads):
        raise ValueError(f"tensor_parallel_size {tp_size} and the number of KV heads ({kv_heads}) must "
                         "divide one another.")
    if device.type == "cuda" and tp_size > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size {tp_size} exceeds the {torch.cuda.device_count()} "
                         "visible CUDA device(s).")


def min_over_ranks(n: int, device: torch.device) -> int:
    """The smallest n of all ranks (e.g. the KV-cache blocks every rank can hold)."""
    if _TP_SIZE == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
