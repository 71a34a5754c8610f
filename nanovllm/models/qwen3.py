"""Qwen3: Llama with an RMSNorm over each q and k head before rope (and no qkv bias)."""
from nanovllm.config import ModelConfig
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.llama import FusedOutputMixin, LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__(config, rotary_emb, qk_norm=True)


class Qwen3AttentionFused(FusedOutputMixin, Qwen3Attention):
    """o_proj(attn) + residual through nanovllm.kernels.fused_attention_output.fused_o_proj_add_residual
    (one kernel on GPU)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
    fused_attention_cls = Qwen3AttentionFused
