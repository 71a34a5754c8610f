"""Qwen2 / Qwen2.5: Llama with a bias on q, k and v (and none on o_proj)."""
from nanovllm.config import ModelConfig
from nanovllm.layers.rotary_embedding import RotaryEmbedding
from nanovllm.models.llama import FusedOutputMixin, LlamaAttention, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding) -> None:
        super().__init__(config, rotary_emb, qkv_bias=True, o_bias=False)


class Qwen2AttentionFused(FusedOutputMixin, Qwen2Attention):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen2Attention
    fused_attention_cls = Qwen2AttentionFused
