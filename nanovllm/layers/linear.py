"""Linear layers named after vLLM's tensor-parallel ones.

Tensor parallelism is not implemented yet (tp_size is 1), but each parameter carries a `weight_loader` that
copies its rank's slice of a checkpoint tensor, so the loader already speaks the sharded protocol:
fused layers (qkv_proj, gate_up_proj) receive their HF parts one by one with a shard id.
"""
import torch
import torch.nn.functional as F
from torch import nn


def copy_weight(param_slice: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copies a checkpoint tensor into (a slice of) a parameter; a shape mismatch is a user error
    (wrong config for these weights), not something to broadcast silently."""
    if param_slice.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: the model expects {tuple(param_slice.shape)}, "
                         f"the checkpoint has {tuple(loaded_weight.shape)}")
    param_slice.copy_(loaded_weight)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    copy_weight(param.data, loaded_weight)


class LinearBase(nn.Module):
    """y = x W^T (+ b), with W stored (out, in) like nn.Linear. `tp_dim` is the dim a rank would shard."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_dim: int | None = None):
        super().__init__()
        self.tp_dim, self.tp_rank, self.tp_size = tp_dim, 0, 1
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
    """Output features split across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=0)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        copy_weight(param.data, loaded_weight.chunk(self.tp_size, dim=0)[self.tp_rank])


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column layers with the same input in one matmul (gate_proj and up_proj -> gate_up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: int) -> None:
        offset = sum(self.output_sizes[:loaded_shard_id]) // self.tp_size
        size = self.output_sizes[loaded_shard_id] // self.tp_size
        shard = loaded_weight.chunk(self.tp_size, dim=0)[self.tp_rank]
        copy_weight(param.data.narrow(0, offset, size), shard)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj in one matmul; the output is [q | k | v] along the feature dim."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads  # of this rank
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, loaded_shard_id: str) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offsets = {"q": 0, "k": q_size, "v": q_size + kv_size}
        offset, size = offsets[loaded_shard_id], q_size if loaded_shard_id == "q" else kv_size
        shard = loaded_weight.chunk(self.tp_size, dim=0)[self.tp_rank]
        copy_weight(param.data.narrow(0, offset, size), shard)


class RowParallelLinear(LinearBase):
    """Input features split across ranks (a TP version would all-reduce the partial outputs)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=1)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param.data.ndim == 1:  # the bias is not sharded
            copy_weight(param.data, loaded_weight)
            return
        copy_weight(param.data, loaded_weight.chunk(self.tp_size, dim=1)[self.tp_rank])
