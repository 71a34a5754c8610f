"""Megatron-style tensor-parallel linear layers, named after vLLM's.

A column-parallel layer splits its output features across ranks: each rank computes its slice and nothing
is exchanged. A row-parallel layer splits its input features: each rank holds a partial sum of the output,
and one all-reduce adds them up. Attention (qkv column, o_proj row) and the MLP (gate_up column, down_proj
row) therefore cost one all-reduce each. Every parameter carries a `weight_loader` that copies its rank's
slice of a full checkpoint tensor; fused layers (qkv_proj, gate_up_proj) receive their HF parts one by one
with a shard id. With one rank every slice is the whole tensor.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.parallel_state import (
    all_reduce,
    all_reduce_add_rmsnorm,
    get_tp_rank,
    get_tp_size,
    reduce_slot,
)
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.layernorm import Normed, RMSNorm

# On CUDA the row-parallel projections (o_proj, down_proj) go through the fused kernel's dispatcher, fused
# output path on or off. Benchmarks set this False to time the unfused path as plain cuBLAS F.linear.
ROW_PARALLEL_DISPATCHER = True
# The column-parallel ones (qkv_proj, gate_up_proj) go through its projection-only mode (`project`: cuBLAS
# or a gemv, whichever its tuning found faster) for up to COLUMN_DISPATCHER_MAX_M tokens: a gemv launched
# with PDL keeps the decode step's chain of early launches unbroken, which a cuBLAS kernel breaks. On the
# H100 that took batch 1's decode step from 0.996 to 0.896 ms of GPU, but batch 8's from 1.311 to 1.361
# (the tuner, timing each kernel after itself, picked tensor-core gemv tilings that lose inside the step;
# benchmarks/results/pdl-h100.json). At 2 tokens it pays again, with the norm folded in (below): the
# graph of 2 seqs 10 % faster on the H100, that of 4 seqs 8-26 % slower (results/column_max_m-h100.json).
# So only steps of up to 2 tokens take it. Larger M: cuBLAS, untuned.
COLUMN_PARALLEL_DISPATCHER = True
COLUMN_DISPATCHER_MAX_M = 2
# There the RMSNorm before them folds into that gemv's load of x (rmsnorm_project): one kernel fewer per
# norm, the same bits. Benchmarks set this False to time the separate norm kernel.
FOLD_NORM = True


def copy_weight(param_slice: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copies a checkpoint tensor into (a slice of) a parameter; a shape mismatch is a user error
    (wrong config for these weights), not something to broadcast silently."""
    if param_slice.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: the model expects {tuple(param_slice.shape)}, "
                         f"the checkpoint has {tuple(loaded_weight.shape)}")
    param_slice.copy_(loaded_weight)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    copy_weight(param.data, loaded_weight)


def divide(n: int, tp_size: int) -> int:
    assert n % tp_size == 0, f"{n} does not split across {tp_size} ranks"
    return n // tp_size


class LinearBase(nn.Module):
    """y = x W^T (+ b), with W stored (out, in) like nn.Linear; sizes given are this rank's."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        default_weight_loader(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows [r * out/tp, (r + 1) * out/tp) of W (and b)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, divide(output_size, get_tp_size()), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        copy_weight(param.data, loaded_weight.chunk(self.tp_size, dim=0)[self.tp_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dispatches(x):
            # Imported here: the kernel module (and Triton) is only needed for the CUDA path.
            from nanovllm.kernels.fused_attention_output import project
            return project(x, self.weight, self.bias)  # (T, out)
        return F.linear(x, self.weight, self.bias)

    def forward_normed(self, x: torch.Tensor, norm: RMSNorm, residual: torch.Tensor | Normed | None = None,
                       act: SiluAndMul | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(s)), s), s the residual stream: x + residual, or x without a residual (what
        `norm(x, residual)` adds), or residual.stream when residual is Normed (x is norm(s) already); with
        `act` (a gate_up_proj), (act(self(norm(s))), s). At a few tokens on CUDA the norm is folded into the
        projection's kernel, and SiLU-and-mul into its epilogue."""
        if isinstance(residual, Normed):
            y = self(x)
            return (y if act is None else act(y)), residual.stream
        if folds_norm(x, norm) and (act is None or act.use_triton):
            from nanovllm.kernels.fused_attention_output import rmsnorm_project
            return rmsnorm_project(x, norm.weight, norm.eps, self.weight, self.bias, residual, act is not None)
        if residual is None:
            y, stream = self(norm(x)), x
        else:
            normed, stream = norm(x, residual)
            y = self(normed)
        return (y if act is None else act(y)), stream


def folds_norm(x: torch.Tensor, norm: RMSNorm) -> bool:
    """Whether the projection after this RMSNorm folds it into its own kernel for this input (a
    column-parallel layer of a step that the dispatcher takes; never the LM head after the model's final
    norm)."""
    return FOLD_NORM and norm.use_triton and norm.feeds_projection and dispatches(x)


def _runs_own_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    from nanovllm.kernels.fused_attention_output import runs_own_kernel  # Triton only on the CUDA path
    return runs_own_kernel(x, weight, bias)


def dispatches(x: torch.Tensor) -> bool:
    """Whether a column-parallel layer (and the LM head, without TP) sends x to the fused kernel's dispatcher
    (`project`)."""
    return x.is_cuda and x.dim() == 2 and x.shape[0] <= COLUMN_DISPATCHER_MAX_M and COLUMN_PARALLEL_DISPATCHER


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers with the same input in one matmul (gate_proj and up_proj -> gate_up_proj).
    Each rank holds [its slice of gate | its slice of up], so SiLU-and-mul stays local."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: int) -> None:
        offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        size = self.output_sizes[loaded_shard_id] // self.tp_size
        shard = loaded_weight.chunk(self.tp_size, dim=0)[self.tp_rank]
        copy_weight(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj in one matmul; each rank's output is [q | k | v] of its own heads.

    Heads are split across ranks. With fewer KV heads than ranks each rank holds one KV head, replicated
    on tp / total_num_kv_heads ranks: rank r serves the q heads that read KV head r * kv / tp (GQA groups
    are contiguous, so its q heads all belong to that one)."""

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False):
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = divide(total_num_heads, tp_size)  # of this rank
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads, self.num_kv_replicas = divide(total_num_kv_heads, tp_size), 1
        else:
            self.num_kv_heads, self.num_kv_replicas = 1, divide(tp_size, total_num_kv_heads)
        # Sizes are already this rank's: skip ColumnParallelLinear's split.
        LinearBase.__init__(self, hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if loaded_shard_id == "q":
            offset, size, index = 0, q_size, self.tp_rank
        else:
            offset = q_size if loaded_shard_id == "k" else q_size + kv_size
            size, index = kv_size, self.tp_rank // self.num_kv_replicas
        shard = loaded_weight.narrow(0, index * size, size)
        copy_weight(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the partial outputs are summed by one all-reduce. The bias is
    whole on every rank but added by rank 0 alone, before the sum, so it counts once.

    `reduce_slot` (0 or 1): where in the symmetric-memory buffer the partial product goes, when there is
    one (distributed/all_reduce.py): it is summed there in place by a kernel without an end barrier, so
    one rank may already write its next partial while a peer still reads this one. Consecutive all-reduces
    must therefore use different slots: attention's o_proj takes 0 and the MLP's down_proj 1, and they
    alternate in every decoder layer (the embedding's all-reduce takes no slot)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_slot: int = 0):
        super().__init__(divide(input_size, get_tp_size()), output_size, bias)
        self.reduce_slot = reduce_slot

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param.data.ndim == 1:  # the bias is not sharded
            copy_weight(param.data, loaded_weight)
            return
        copy_weight(param.data, loaded_weight.chunk(self.tp_size, dim=1)[self.tp_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The all-reduce of this rank's x W^T (+ b on rank 0), projected into its slot if it has one."""
        return all_reduce(self._project(x, self.bias if self.tp_rank == 0 else None, None, self._slot(x)))  # (T, out)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, next_norm: RMSNorm | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | Normed | None]:
        """(x W^T (+ b) + residual, None): the add fused into the projection (the fused output path). Where it
        cannot be (cuBLAS runs the projection at this many tokens, or TP over NCCL), (x W^T (+ b), residual):
        the next RMSNorm adds it (add_rmsnorm), to the same bits. Under TP with a symmetric-memory slot the
        all-reduce kernel adds it after the sum, the bits of all_reduce + add_rmsnorm, and given the norm that
        comes next (`next_norm`, unless the next projection folds it) normalizes the new stream too: then
        (next_norm(stream), Normed(stream)). So every TP path rounds alike: fused output on or off, over
        NCCL or symmetric memory."""
        slot = self._slot(x)
        if slot is not None:
            self._project(x, self.bias if self.tp_rank == 0 else None, None, slot)
            normalize = next_norm is not None and next_norm.use_triton and not folds_norm(x, next_norm)
            stream, normed = all_reduce_add_rmsnorm(slot, residual, next_norm.weight if normalize else None,
                                                    next_norm.eps if normalize else 0.0)
            return (stream, None) if normed is None else (normed, Normed(stream))
        if self.tp_size > 1 or (x.is_cuda and not _runs_own_kernel(x, self.weight, self.bias)):
            return self.forward(x), residual
        return self._project(x, self.bias, residual), None

    def _slot(self, x: torch.Tensor) -> torch.Tensor | None:
        """Where this layer's partial product for x goes: its slot of the symmetric buffer, or None."""
        return reduce_slot(self.reduce_slot, (x.shape[0], self.weight.shape[0]), x.dtype)

    def _project(self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """On CUDA both paths go through the fused kernel's dispatcher, with and without the residual: the
        same tuned kernel computes the product either way, so use_fused_output on and off round the
        same product and give the same bits (the unfused add then happens in the next add_rmsnorm)."""
        if not x.is_cuda or (residual is None and not ROW_PARALLEL_DISPATCHER):
            # The unfused projection and add, bit for bit (torch.addmm rounds differently).
            y = F.linear(x, self.weight, bias)
            y = y if residual is None else y + residual
            return y if out is None else out.copy_(y)
        # Imported here: the kernel module (and Triton) is only needed for the CUDA path.
        from nanovllm.kernels.fused_attention_output import fused_o_proj_add_residual
        return fused_o_proj_add_residual(x, self.weight, residual, bias=bias, out=out)
