"""Vocab-parallel token embedding and LM head (vLLM names).

Rank r holds the rows [r * V/tp, (r + 1) * V/tp) of the (V, hidden) table, V rounded up to a multiple of
tp with zero rows. The embedding looks up the ids in its own range, zeros the others, and one all-reduce
fills in every row; the LM head computes its slice of the logits, and rank 0 gathers the slices.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.distributed.parallel_state import all_reduce, gather_to_first, get_tp_rank, get_tp_size
from nanovllm.layers import linear
from nanovllm.layers.linear import copy_weight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if loaded_weight.size(0) != self.num_embeddings:  # checked before slicing, which would hide it
            raise ValueError(f"shape mismatch: the model expects {self.num_embeddings} vocabulary rows, "
                             f"the checkpoint has {loaded_weight.size(0)}")
        shard = loaded_weight[self.vocab_start:self.vocab_start + self.num_embeddings_per_rank]
        copy_weight(param.data[:shard.size(0)], shard)
        param.data[shard.size(0):].zero_()  # the padding rows past the vocabulary

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # (T, hidden)
        local_ids = input_ids - self.vocab_start
        mask = (local_ids >= 0) & (local_ids < self.num_embeddings_per_rank)  # (T,) ids this rank holds
        y = F.embedding(local_ids.masked_fill(~mask, 0), self.weight)  # (T, hidden)
        return all_reduce(y.masked_fill_(~mask[:, None], 0))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits. Unlike nano-vllm's it picks no rows: the runner passes only the rows it samples.
    Under tensor parallelism every rank must call it with the same rows; only rank 0 gets the logits.
    Without TP, where the column-parallel layers send x to the projections' dispatcher (linear.dispatches:
    up to COLUMN_DISPATCHER_MAX_M rows on CUDA), so does it: cuBLAS or a gemv launched with PDL, whichever
    was tuned faster."""

    def forward(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.tp_size == 1 and linear.dispatches(hidden_states):
            from nanovllm.kernels.fused_attention_output import project
            return project(hidden_states, self.weight, out=out)
        if self.tp_size == 1:
            if out is None:
                return F.linear(hidden_states, self.weight)  # (N, vocab)
            return torch.mm(hidden_states, self.weight.t(), out=out)
        logits = gather_to_first(F.linear(hidden_states, self.weight))  # (N, padded vocab) on rank 0
        if logits is None:
            return None
        logits = logits[:, :self.num_embeddings]  # (N, vocab)
        return logits if out is None else out.copy_(logits)
