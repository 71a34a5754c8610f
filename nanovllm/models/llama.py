"""Llama (SmolLM2, Llama 3): the decoder that Qwen2 and Qwen3 reuse with small changes."""
import torch
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.kernels.paged_attention import NewTokenRope, rope_in_decode
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import Normed, RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.utils.context import get_context


class LlamaAttention(nn.Module):
    """input_layernorm -> qkv_proj -> (q/k RMSNorm per head, Qwen3) -> rope -> paged attention -> o_proj.

    With `use_triton` and a KV cache, the q/k norm, rope and cache store are one kernel (rope_and_store_kv),
    or, in decode steps of some sizes (paged_attention.rope_in_decode), part of the decode attention kernel.
    The layer's norm comes in as an argument: at one token it folds into qkv_proj's kernel.
    """
    fuses_residual = False  # o_proj adds the residual (FusedOutputMixin)

    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding, qkv_bias: bool | None = None,
                 o_bias: bool | None = None, qk_norm: bool = False) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        qkv_bias = config.attention_bias if qkv_bias is None else qkv_bias
        o_bias = config.attention_bias if o_bias is None else o_bias
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias)
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)
        self.use_triton = False  # RoPE (+ q/k norm) fused with the KV-cache store, on CUDA

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        """qkv_proj's output (T, (H + 2 Hkv) * D) -> the attention output before o_proj: (T, H*D)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # (T, H, D), a strided view into the qkv output
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.use_triton and self.attn.k_cache.numel():
            context = get_context()
            if context.max_q_len == 1 and rope_in_decode(q.shape[0]):  # one kernel link fewer
                return self.attn.forward_triton(q, context, self.new_token_rope(k, v)).flatten(1)
            self.rope_and_store_kv(positions, q, k, v)
            return self.attn(q, k, v, kv_stored=True)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.attn(q, k, v)

    def rope_and_store_kv(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor) -> None:
        """One Triton kernel: q/k RMSNorm (Qwen3), RoPE on q and k in place, k and v into the paged cache."""
        from nanovllm.kernels.rope_kv_store import rope_and_store_kv
        rope = self.new_token_rope(k, v)
        rope_and_store_kv(q, k, v, positions, rope.cos_sin_cache, self.attn.k_cache, self.attn.v_cache,
                          rope.slot_mapping, rope.q_norm_weight, rope.k_norm_weight, rope.eps)

    def new_token_rope(self, k: torch.Tensor, v: torch.Tensor) -> NewTokenRope:
        q_norm, k_norm = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        eps = self.q_norm.eps if self.q_norm is not None else 1e-6
        return NewTokenRope(k, v, self.rotary_emb.cos_sin_cache, get_context().slot_mapping, q_norm, k_norm, eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, norm: RMSNorm,
                residual: torch.Tensor | Normed | None = None, next_norm: RMSNorm | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | Normed | None]:
        """The residual stream is hidden_states + residual (None: nothing to add; Normed: hidden_states is
        norm(stream) already), before and after: attention reads norm(stream). Returns (o_proj(attn),
        stream), or with `fuses_residual` (o_proj(attn) + stream, None) from one kernel, unless cuBLAS runs
        o_proj at this many tokens, or under TP (next_norm(new stream), Normed(new stream)) where the
        all-reduce normalizes too (RowParallelLinear.forward_add)."""
        qkv, stream = self.qkv_proj.forward_normed(hidden_states, norm, residual)
        attn = self.attend(positions, qkv)  # (T, H*D)
        if self.fuses_residual:
            return self.o_proj.forward_add(attn, stream, next_norm)
        return self.o_proj(attn), stream


class FusedOutputMixin:
    """Makes an attention class add the residual inside o_proj, one kernel instead of a matmul and an add."""
    fuses_residual = True

    @property
    def residual_proj(self) -> RowParallelLinear:
        return self.o_proj


class LlamaAttentionFused(FusedOutputMixin, LlamaAttention):
    pass


class LlamaMLP(nn.Module):
    """post_attention_layernorm -> gate_up_proj -> SiLU-and-mul -> down_proj, with the residual stream
    carried as LlamaAttention carries it; with `fuses_residual` down_proj adds it, as the fused o_proj does."""

    def __init__(self, config: ModelConfig, fuses_residual: bool = False) -> None:
        super().__init__()
        size, bias = config.intermediate_size, config.mlp_bias
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, reduce_slot=1)  # o_proj: 0
        self.act_fn = SiluAndMul()
        self.fuses_residual = fuses_residual

    @property
    def residual_proj(self) -> RowParallelLinear:
        return self.down_proj

    def forward(self, hidden_states: torch.Tensor, norm: RMSNorm, residual: torch.Tensor | Normed | None = None,
                next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | Normed | None]:
        x, stream = self.gate_up_proj.forward_normed(hidden_states, norm, residual, self.act_fn)  # (T, inter)
        if self.fuses_residual:
            return self.down_proj.forward_add(x, stream, next_norm)
        return self.down_proj(x), stream


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, self_attn: LlamaAttention) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = LlamaMLP(config, fuses_residual=self_attn.fuses_residual)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | Normed | None,
                next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | Normed | None]:
        """The residual stream is hidden_states + residual, the latter carried separately (None: nothing
        to add): each norm adds it in (nano-vllm's fused add + norm). With the fused output path o_proj and
        down_proj add it instead where their kernel can, and return (residual stream, None): the next norm
        has nothing to add. Under TP they may also normalize for the next norm (the next layer's
        input_layernorm, or the model's final norm: `next_norm`) and return (normed, Normed(stream))."""
        hidden_states, residual = self.self_attn(positions, hidden_states, self.input_layernorm, residual,
                                                 self.post_attention_layernorm)
        return self.mlp(hidden_states, self.post_attention_layernorm, residual, next_norm)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, attention_cls: type[LlamaAttention]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        # One rope table shared by all layers (it is a non-persistent buffer, not a weight).
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                     config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attention_cls(config, rotary_emb))
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm.feeds_projection = False  # the LM head never folds it: under TP the last all-reduce applies it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None  # (T, hidden)
        next_norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
        for layer, next_norm in zip(self.layers, next_norms):
            hidden_states, residual = layer(positions, hidden_states, residual, next_norm)
        if isinstance(residual, Normed):  # the last all-reduce applied the final norm
            return hidden_states
        if residual is None:  # the fused output path: hidden_states is the whole residual stream
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name -> (our fused parameter, shard id passed to its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    attention_cls: type[LlamaAttention] = LlamaAttention
    fused_attention_cls: type[LlamaAttention] = LlamaAttentionFused

    def __init__(self, config: ModelConfig, use_fused_output: bool = False) -> None:
        super().__init__()
        self.model = LlamaModel(config, self.fused_attention_cls if use_fused_output else self.attention_cls)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions (T,) int64 -> hidden states (T, hidden)."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, hidden) -> (N, vocab); into `out` when given (a CUDA graph's static buffer)."""
        return self.lm_head(hidden_states, out)
