"""Tiny random HF checkpoints (saved by transformers itself) for tests that need a real model folder.

`make_tiny_model("qwen3", tmp_path)` builds a 2-layer model in ~0.1 s; the weights, including norms and
biases that HF initializes to constants, are random (seeded) so a mix-up of any tensor changes the logits.
"""
import os

import torch

TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=512,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_hf_config(arch: str, **overrides):
    """A transformers config for arch in llama, llama3 (llama3 rope scaling), qwen2, qwen3."""
    import transformers
    kwargs = {**TINY_SIZES, **overrides}
    if arch == "llama3":
        kwargs.setdefault("rope_parameters", LLAMA3_ROPE)
    config_cls = {"llama": transformers.LlamaConfig, "llama3": transformers.LlamaConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
    return config_cls(**kwargs)


def make_tiny_hf_model(arch: str, seed: int = 0, **overrides):
    """The transformers model itself, fp32, eval mode, random weights."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # HF initializes these to ones
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):  # and these to zeros
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def make_tiny_model(arch: str, tmp_dir: str, seed: int = 0, max_shard_size: str | None = None,
                    **overrides) -> str:
    """Saves a tiny random model (config.json + safetensors) into tmp_dir/arch and returns that folder.
    `overrides` are config fields, e.g. tie_word_embeddings=True."""
    path = os.path.join(str(tmp_dir), arch)
    model = make_tiny_hf_model(arch, seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


class FixedLogits(torch.nn.Module):
    """A stand-in model whose every row has the same logits: enough to test the decode graphs' sampler."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.row = logits  # (vocab,) in the graphs' dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return torch.ones(input_ids.shape[0], 1, dtype=self.row.dtype, device=input_ids.device)  # (T, 1)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.mm(hidden, self.row[None], out=out)  # (T, vocab)
