"""Token embedding and LM head (vLLM names; one rank holds the whole vocabulary for now)."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.layers.linear import default_weight_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (T, hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits. Unlike nano-vllm's it picks no rows: the runner passes only the rows it samples."""

    def forward(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            return F.linear(hidden_states, self.weight)  # (N, vocab)
        return torch.mm(hidden_states, self.weight.t(), out=out)
