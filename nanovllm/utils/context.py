"""The per-step attention metadata, set by the model runner and read by every Attention layer."""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Context:
    q_lens: list[int]  # tokens computed per seq this step
    context_lens: list[int]  # KV length per seq after this step
    cu_seqlens_q: torch.Tensor  # (B+1,) int32
    context_lens_t: torch.Tensor  # (B,) int32
    slot_mapping: torch.Tensor  # (T,) int64
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with -1
    max_q_len: int
    max_context_len: int
    is_decode: bool
    seq_order: torch.Tensor | None = None  # (B,) int32, decode: the seqs longest first (paged_attention)


_CONTEXT: Context | None = None


def set_context(context: Context | None) -> None:
    global _CONTEXT
    _CONTEXT = context


def get_context() -> Context | None:
    return _CONTEXT


def reset_context() -> None:
    set_context(None)


def make_context(q_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                 block_size: int, device: torch.device | str = "cpu") -> Context:
    """Builds a Context from per-seq lengths and block tables (new tokens fill slots from context_len - q_len).
    In numpy: a prefill step has thousands of tokens and a mixed one hundreds of block tables, where
    per-token Python loops and torch.tensor over nested lists cost milliseconds per step."""
    num_seqs = len(q_lens)
    width = max(map(len, block_tables), default=0)
    tables = np.full((num_seqs, width), -1, dtype=np.int32)
    for row, table in zip(tables, block_tables):
        row[:len(table)] = table
    q = np.asarray(q_lens, dtype=np.int64).reshape(num_seqs)
    ctx = np.asarray(context_lens, dtype=np.int64).reshape(num_seqs)
    slots = token_slots(tables, q, ctx, block_size)
    return context_from_lengths(q, ctx, cu_seqlens(q), _to_device(slots, device), _to_device(tables, device), device)


def token_slots(tables: np.ndarray, q_lens: np.ndarray, context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """(T,) int64: the cache slot of each new token of a step, seq after seq. tables (B, width) holds the seqs'
    block ids; q_lens, context_lens (B,) int64. Token t of seq i sits at position ctx[i] - q[i] + (t - cu[i]),
    in slot table[pos // block_size] * block_size + pos % block_size."""
    cu = cu_seqlens(q_lens)
    seq = np.repeat(np.arange(len(q_lens)), q_lens)  # (T,)
    pos = np.arange(cu[-1]) + np.repeat(context_lens - q_lens - cu[:-1], q_lens)  # (T,)
    return tables[seq, pos // block_size].astype(np.int64) * block_size + pos % block_size


def _to_device(x: np.ndarray, device: torch.device | str) -> torch.Tensor:
    return torch.from_numpy(x).to(device, non_blocking=True)


def cu_seqlens(q_lens: np.ndarray) -> np.ndarray:
    """(B+1,) int32: where each seq's tokens start in the flattened batch, and the total."""
    cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
    np.cumsum(q_lens, out=cu[1:])
    return cu


def context_from_lengths(q_lens: np.ndarray, context_lens: np.ndarray, cu: np.ndarray, slot_mapping: torch.Tensor,
                         block_tables: torch.Tensor, device: torch.device | str) -> Context:
    """The Context of host lengths (int64 arrays, cu = cu_seqlens(q_lens)) and the step's slots and block
    tables, already on the device: make_context's end, and a TP worker's (distributed/commands.py)."""
    is_decode = bool((q_lens == 1).all())
    return Context(
        q_lens=q_lens.tolist(), context_lens=context_lens.tolist(),
        cu_seqlens_q=_to_device(cu, device), context_lens_t=_to_device(context_lens.astype(np.int32), device),
        slot_mapping=slot_mapping, block_tables=block_tables,
        max_q_len=int(q_lens.max(initial=0)), max_context_len=int(context_lens.max(initial=0)),
        is_decode=is_decode, seq_order=_to_device(longest_first(context_lens), device) if is_decode else None,
    )


def longest_first(context_lens: np.ndarray) -> np.ndarray:
    """The seqs' indices by decreasing context length (ties in order), int32: the decode kernel's seq_order."""
    return np.argsort(-context_lens, kind="stable").astype(np.int32)
