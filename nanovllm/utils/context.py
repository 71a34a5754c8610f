"""The per-step attention metadata, set by the model runner and read by every Attention layer."""
from dataclasses import dataclass

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
    """Builds a Context from per-seq lengths and block tables (new tokens fill slots from context_len - q_len)."""
    slots = []
    for q_len, ctx_len, table in zip(q_lens, context_lens, block_tables):
        for pos in range(ctx_len - q_len, ctx_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max((len(t) for t in block_tables), default=0)
    padded = [t + [-1] * (width - len(t)) for t in block_tables]
    cu = [0]
    for q_len in q_lens:
        cu.append(cu[-1] + q_len)
    as_tensor = lambda x, dt: torch.tensor(x, dtype=dt).to(device, non_blocking=True)  # noqa: E731
    return Context(
        q_lens=list(q_lens), context_lens=list(context_lens),
        cu_seqlens_q=as_tensor(cu, torch.int32), context_lens_t=as_tensor(context_lens, torch.int32),
        slot_mapping=as_tensor(slots, torch.int64), block_tables=as_tensor(padded, torch.int32),
        max_q_len=max(q_lens, default=0), max_context_len=max(context_lens, default=0),
        is_decode=all(q == 1 for q in q_lens),
    )
