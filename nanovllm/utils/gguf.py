"""Read a GGUF file as a `ModelConfig` and a stream of HF-named float32 weights.

GGUF is llama.cpp's single-file format: metadata key/values, then tensors under llama.cpp's names
(`blk.0.attn_q.weight`), some of them quantized. We dequantize tensor by tensor with the `gguf`
package, so peak memory stays near one fp32 tensor on top of the memory-mapped file.
"""
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from nanovllm.config import ModelConfig
from nanovllm.layers.rotary_embedding import compute_inv_freq

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SUPPORTED_TYPES = tuple(GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"))

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Llama 3.1-3.3's rope scaling constants; a GGUF keeps only the per-frequency factors they produce.
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class _GGUFReader(GGUFReader):
    """GGUFReader over a plain-ndarray view of its memmap. Parsing a 49k-token vocabulary drops from ~5 s
    to ~1 s: slicing an np.memmap costs microseconds per field part, and a vocabulary has 150k parts."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.memmap) -> None:
        self._data = value.view(np.ndarray)  # still backed by the read-only file mapping


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF: metadata values and tensors (their data memory-mapped, not loaded)."""
    path: str
    metadata: dict[str, Any]
    tensors: dict[str, ReaderTensor]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def read_gguf(path: str) -> GGUFFile:
    """Parse `path` once; config, weights and tokenizer share the result (parsing takes seconds)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = os.stat(path)
    return _read_gguf(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read_gguf(path: str, size: int, mtime_ns: int) -> GGUFFile:
    try:
        reader = _GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # a bad file surfaces as ValueError, IndexError, struct or numpy errors alike
        raise ValueError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from e
    # Keep plain values, not the reader: its per-field numpy views take ~150 MB for a 49k-token vocabulary.
    return GGUFFile(path, metadata, {t.name: t for t in reader.tensors})


def gguf_architecture(gguf: GGUFFile) -> str:
    arch = gguf.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"{gguf.path}: architecture {arch!r} is not supported; supported: {supported}.")
    return arch


def _float32_value(x: float) -> float:
    # GGUF stores floats as float32; going through its shortest repr gives 1e-05, not 9.9999997e-06.
    return float(str(np.float32(x)))


def load_gguf_config(path: str) -> ModelConfig:
    """The architecture of a llama/qwen2/qwen3 GGUF file, read from its metadata."""
    gguf = read_gguf(path)
    arch = gguf_architecture(gguf)

    def get(key: str, default: Any = None) -> Any:
        return gguf.get(f"{arch}.{key}", default)

    required = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
    if missing := [f"{arch}.{key}" for key in required if get(key) is None]:
        raise ValueError(f"{path} lacks metadata {', '.join(missing)}.")
    if "token_embd.weight" not in gguf.tensors:
        raise ValueError(f"{path} has no token_embd.weight tensor.")
    hidden_size, num_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden_size // num_heads)
    rope_theta = _float32_value(get("rope.freq_base", 10000.0))
    return ModelConfig(
        architecture=arch,
        # The embedding's rows, not the token list: the weights must fit, and the two agree in practice.
        vocab_size=int(gguf.tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden_size,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(gguf, arch, rope_theta, head_dim),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        dtype="float32",  # iter_gguf_weights dequantizes everything to float32
        bos_token_id=gguf.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=gguf_eos_token_ids(gguf),
    )


def gguf_eos_token_ids(gguf: GGUFFile) -> list[int]:
    """End-of-sequence ids: EOS and, where set, end-of-turn and end-of-message (llama.cpp stops on all)."""
    ids = [gguf.get(f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def _rope_scaling(gguf: GGUFFile, arch: str, theta: float, head_dim: int) -> dict | None:
    kind = gguf.get(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": gguf.get(f"{arch}.rope.scaling.factor", 1.0)}
        optional = {"original_context_length": "original_max_position_embeddings",
                    "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow"}
        for key, hf_key in optional.items():
            if (value := gguf.get(f"{arch}.rope.scaling.{key}")) is not None:
                scaling[hf_key] = value
        return scaling
    if kind not in (None, "none"):
        supported = "linear, yarn, llama3 (as rope_freqs.weight)"
        raise ValueError(f"{gguf.path}: rope scaling {kind!r} is not supported; supported: {supported}.")
    if "rope_freqs.weight" in gguf.tensors:
        return _llama3_rope_scaling(_to_numpy(gguf.tensors["rope_freqs.weight"]), theta, head_dim)
    return None


def _llama3_rope_scaling(rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    # A GGUF keeps only llama.cpp's per-frequency divisors (default / scaled inverse frequency); recover
    # HF's rope_scaling by trying Llama 3's constants, and check that they reproduce the divisors.
    scaling = {"rope_type": "llama3", "factor": float(rope_freqs.max()), **_LLAMA3_ROPE}
    divisors = compute_inv_freq(head_dim, theta) / compute_inv_freq(head_dim, theta, scaling)  # (D/2,)
    if not np.allclose(divisors.numpy(), rope_freqs, rtol=1e-4):
        raise ValueError("rope_freqs.weight matches no Llama 3 rope scaling: this GGUF's rope is unsupported")
    return scaling


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, float32 tensor of the HF shape)` for every weight, dequantizing one at a time."""
    gguf = read_gguf(path)
    arch = gguf_architecture(gguf)
    num_heads = gguf.get(f"{arch}.attention.head_count")
    num_kv_heads = gguf.get(f"{arch}.attention.head_count_kv", num_heads)
    for t in gguf.tensors.values():
        if t.name == "rope_freqs.weight":  # not a weight: read into ModelConfig.rope_scaling
            continue
        name = hf_weight_name(t.name)
        weight = _to_numpy(t)
        # llama.cpp's converter permutes llama Q/K rows for its interleaved rope (not qwen2/qwen3, which
        # use NeoX rope like HF); undo it so HF's rotate_half rope applies.
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_qk(weight, num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_qk(weight, num_kv_heads)
        yield name, torch.from_numpy(weight)


def hf_weight_name(gguf_name: str) -> str:
    """The HF name of a llama.cpp tensor: `blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`"""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"Unexpected GGUF tensor {gguf_name!r}: not part of a llama/qwen2/qwen3 model.")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _to_numpy(t: ReaderTensor) -> np.ndarray:
    """A writable float32 array of the tensor in numpy (= HF) axis order."""
    if t.tensor_type not in SUPPORTED_TYPES:
        supported = ", ".join(q.name for q in SUPPORTED_TYPES)
        raise ValueError(f"Tensor {t.name} has type {t.tensor_type.name}; supported types: {supported}.")
    weight = dequantize(t.data, t.tensor_type)
    if t.tensor_type == GGMLQuantizationType.F32:
        weight = weight.copy()  # a read-only view of the memory-mapped file otherwise
    return weight.reshape(tuple(reversed(t.shape.tolist())))  # GGUF lists dims innermost first


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows go from rope pairs interleaved, (D/2, 2),
    back to the two halves HF's rotate_half expects, (2, D/2). `n_head` is the KV head count for K."""
    shape = weight.shape
    w = weight.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])  # (H, D/2, 2, ...)
    return np.ascontiguousarray(w.swapaxes(1, 2)).reshape(shape)  # (H, 2, D/2, ...) -> (H*D, ...)
