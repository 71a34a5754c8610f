"""Paged-KV causal attention: stores this step's k/v in the cache, then attends per the global Context."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.context import Context, get_context


class Attention(nn.Module):
    """q (T, H, D), k/v (T, Hkv, D) -> (T, H*D).

    The runner assigns `k_cache`/`v_cache` of shape (num_blocks, block_size, Hkv, D). Until then they are
    empty and the layer attends over this step's k/v only (a cache-less forward; with no Context set, the
    T tokens are one sequence). With `use_triton` (set on CUDA) the paged Triton kernel attends; otherwise
    `forward_native` runs plain torch SDPA, the CPU path and the reference. `kv_stored=True` says the caller
    already wrote k/v into the cache (the fused RoPE + store kernel), so the layer only attends.
    """

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.k_cache = self.v_cache = torch.tensor([])
        self.use_triton = False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_stored: bool = False
                ) -> torch.Tensor:
        context = get_context()
        if self.k_cache.numel() == 0:
            return self.forward_no_cache(q, k, v, context).flatten(1)
        if not kv_stored:
            self.store_kv(k, v, context.slot_mapping)
        if self.use_triton:
            return self.forward_triton(q, context).flatten(1)
        return self.forward_native(q, context, k, v).flatten(1)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        # A slot indexes the cache viewed as (num_blocks * block_size, Hkv, D); view() (not reshape) so a
        # non-contiguous cache fails loudly instead of storing into a copy. Slot -1 (a padding row of the
        # decode graphs' batch) stores nothing.
        if (slot_mapping < 0).any():
            keep = slot_mapping >= 0
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, k)
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slot_mapping, v)

    def forward_triton(self, q: torch.Tensor, context: Context, rope=None) -> torch.Tensor:
        """rope (paged_attention.NewTokenRope, decode steps): the kernel normalizes and rotates q and the new
        k and stores k and v itself."""
        from nanovllm.kernels.paged_attention import paged_attention
        return paged_attention(q, self.k_cache, self.v_cache, context.block_tables, context.cu_seqlens_q,
                               context.context_lens_t, context.max_q_len, self.scale,
                               seq_order=context.seq_order, rope=rope)

    def forward_native(self, q: torch.Tensor, context: Context, k: torch.Tensor | None = None,
                       v: torch.Tensor | None = None) -> torch.Tensor:
        """k/v: this step's keys and values (already stored); a seq with no past attends over them directly
        instead of gathering them back from the cache."""
        if context.is_decode:
            return self._decode_native(q, context)
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, ctx_len) in enumerate(zip(context.q_lens, context.context_lens)):
            rows = slice(start, start + q_len)
            if q_len == ctx_len and k is not None:
                out[rows] = self._sdpa(q[rows], k[rows], v[rows], num_past=0)
            else:
                k_seq, v_seq = self._gather_kv(context.block_tables[i], ctx_len)  # (ctx_len, Hkv, D) each
                out[rows] = self._sdpa(q[rows], k_seq, v_seq, ctx_len - q_len)
            start += q_len
        return out

    def forward_no_cache(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         context: Context | None) -> torch.Tensor:
        q_lens = [q.size(0)] if context is None else context.q_lens
        out = torch.empty_like(q)
        start = 0
        for q_len in q_lens:
            seq = slice(start, start + q_len)
            out[seq] = self._sdpa(q[seq], k[seq], v[seq], num_past=0)
            start += q_len
        return out

    def _decode_native(self, q: torch.Tensor, context: Context) -> torch.Tensor:
        """One query per seq: gather every seq's K/V through its block table, one batched masked SDPA."""
        block_size = self.k_cache.size(1)
        num_blocks = -(-context.max_context_len // block_size)
        tables = context.block_tables[:, :num_blocks].clamp(min=0).long()  # padding -1 reads block 0, masked
        k = self.k_cache[tables].flatten(1, 2).transpose(1, 2)  # (B, Hkv, L, D), L = num_blocks * block_size
        v = self.v_cache[tables].flatten(1, 2).transpose(1, 2)
        mask = torch.arange(k.size(2), device=q.device) < context.context_lens_t[:, None]  # (B, L)
        # The query heads of one KV head become that head's "query rows": no K/V repeat for GQA.
        batch, group = q.size(0), self.num_heads // self.num_kv_heads
        q = q.view(batch, self.num_kv_heads, group, self.head_dim)  # (B, Hkv, G, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=self.scale)
        return out.reshape(batch, self.num_heads, self.head_dim)

    def _gather_kv(self, block_table: torch.Tensor, ctx_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = block_table[:-(-ctx_len // self.k_cache.size(1))].long()
        return self.k_cache[blocks].flatten(0, 1)[:ctx_len], self.v_cache[blocks].flatten(0, 1)[:ctx_len]

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_past: int) -> torch.Tensor:
        """Causal attention of one seq: q (q_len, H, D) at positions num_past.., k/v (ctx_len, Hkv, D)."""
        q_len, ctx_len = q.size(0), k.size(0)
        mask = None
        if num_past:  # SDPA's is_causal aligns queries to the first key; ours end at the last key
            mask = torch.ones(q_len, ctx_len, dtype=torch.bool, device=q.device).tril(diagonal=num_past)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, is_causal=not num_past, scale=self.scale,
                                             enable_gqa=True)  # (H, q_len, D)
        return out.transpose(0, 1)
