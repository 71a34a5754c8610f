"""HF checkpoints (config.json + safetensors) -> ModelConfig and weights; .gguf files go to utils/gguf.py."""
import json
import os
from collections.abc import Iterable, Iterator
from glob import glob

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from nanovllm.config import ModelConfig
from nanovllm.layers.linear import default_weight_loader
from nanovllm.layers.rotary_embedding import SUPPORTED_ROPE_TYPES

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
_SKIPPED_WEIGHTS = ("rotary_emb.inv_freq",)  # a buffer that old Llama checkpoints saved; we recompute it

WeightIterator = Iterator[tuple[str, torch.Tensor]]


def load_model_config(path: str) -> ModelConfig:
    """The ModelConfig of an HF model folder or a .gguf file."""
    _check_exists(path)
    if str(path).endswith(".gguf"):
        from nanovllm.utils.gguf import load_gguf_config
        return load_gguf_config(path)
    _check_folder(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"No config.json in {path!r}: not an HF model folder.")
    hf_config = _read_json(config_file)
    generation_file = os.path.join(path, "generation_config.json")
    generation_config = _read_json(generation_file) if os.path.isfile(generation_file) else {}
    try:
        return model_config_from_hf(hf_config, generation_config)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e


def model_config_from_hf(hf: dict, generation_config: dict | None = None) -> ModelConfig:
    """Normalizes a config.json dict, in the old (`rope_theta`, `torch_dtype`) or transformers-5
    (`rope_parameters`, `dtype`) form."""
    architecture = _architecture(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu).")
    hidden_size, num_heads = _require(hf, "hidden_size"), _require(hf, "num_attention_heads")
    rope_theta, rope_scaling = _rope(hf)
    return ModelConfig(
        architecture=architecture,
        vocab_size=_require(hf, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_require(hf, "intermediate_size"),
        num_hidden_layers=_require(hf, "num_hidden_layers"),
        num_attention_heads=num_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden_size // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=architecture == "qwen2" or hf.get("attention_bias", False),  # Qwen2 always has it
        mlp_bias=hf.get("mlp_bias", False),
        dtype=hf.get("dtype") or hf.get("torch_dtype") or "float32",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_token_ids(hf, generation_config or {}),
    )


def _architecture(hf: dict) -> str:
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not names and hf.get("model_type") in ARCHITECTURES.values():
        return hf["model_type"]
    raise ValueError(f"Unsupported architecture {names or hf.get('model_type')!r}; "
                     f"supported: {', '.join(ARCHITECTURES)}.")


def _require(hf: dict, key: str):
    if key not in hf:
        raise ValueError(f"missing required field {key!r}.")
    return hf[key]


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from `rope_parameters` (transformers 5) or `rope_theta` +
    `rope_scaling` (older checkpoints)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)  # some old configs spell it both ways
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"Unsupported rope_type {rope_type!r}; "
                         f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    if rope_type == "default":
        return float(theta), None
    missing = [key for key in _ROPE_KEYS[rope_type] if key not in params]
    if missing:
        raise ValueError(f"rope_type {rope_type!r} needs {', '.join(missing)}.")
    return float(theta), {"rope_type": rope_type, **params}


def _eos_token_ids(*configs: dict) -> list[int]:
    """EOS ids of config.json then generation_config.json (which often adds e.g. <|eot_id|>), deduplicated."""
    ids: list[int] = []
    for config in configs:
        eos = config.get("eos_token_id")
        for token_id in [] if eos is None else [eos] if isinstance(eos, int) else eos:
            if token_id not in ids:
                ids.append(token_id)
    return ids


def iter_weights(path: str) -> WeightIterator:
    """(HF name, tensor) pairs of a model folder (single or sharded safetensors) or a .gguf file.
    Files are checked before the first tensor is read, so a missing shard fails before any loading."""
    _check_exists(path)
    if str(path).endswith(".gguf"):
        from nanovllm.utils.gguf import iter_gguf_weights
        return iter_gguf_weights(path)
    _check_folder(path)
    files = safetensors_files(path)
    return (item for file in files for item in _iter_safetensors(file))


def safetensors_files(folder: str) -> list[str]:
    index_file = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        shards = sorted(set(_read_json(index_file).get("weight_map", {}).values()))
        files = [os.path.join(folder, shard) for shard in shards]
        missing = [file for file in files if not os.path.isfile(file)]
        if missing:
            raise FileNotFoundError(f"{index_file} names shard files that are missing: {', '.join(missing)}")
        return files
    files = sorted(glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No *.safetensors file in {folder!r} (only safetensors checkpoints load).")
    return files


def _iter_safetensors(file: str) -> WeightIterator:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"Cannot read safetensors file {file!r} (truncated or corrupt?): {e}") from e


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 dtype: torch.dtype | None = None, source: str = "the checkpoint") -> None:
    """Copies HF-named weights into the model, one tensor at a time, cast to `dtype` before the copy.

    A name in `model.packed_modules_mapping` (q_proj, gate_proj, ...) goes to its fused parameter's
    `weight_loader` with a shard id. Every parameter must be provided, and every weight must fit a parameter.
    """
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters())
    # Tied weights show up twice without dedup; the alias (lm_head.weight) comes from the canonical name.
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - params.keys()
    loaded = set()
    for name, tensor in weights:
        if name.endswith(_SKIPPED_WEIGHTS) or name in aliases:
            continue
        param_name, shard_id = _route(name, packed)
        if param_name not in params:
            raise ValueError(f"{source} has weight {name!r}, which matches no parameter of "
                             f"{type(model).__name__} (is config.json right for these weights?)")
        param = params[param_name]
        tensor = tensor.to(dtype or param.dtype)
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            weight_loader(param, tensor) if shard_id is None else weight_loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"{source}, weight {name!r}: {e}") from e
        loaded.add(name)
    missing = sorted(expected_weight_names(model) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source} provides no weight for {shown}.")


def expected_weight_names(model: nn.Module) -> set[str]:
    """The HF weight names a model needs: its parameter names with each fused one expanded to its parts."""
    parts: dict[str, list[str]] = {}
    for hf_name, (fused_name, _) in getattr(model, "packed_modules_mapping", {}).items():
        parts.setdefault(fused_name, []).append(hf_name)
    names = set()
    for name, _ in model.named_parameters():
        fused = next((f for f in parts if f".{f}." in name), None)
        if fused is None:
            names.add(name)
        else:
            names.update(name.replace(f".{fused}.", f".{part}.") for part in parts[fused])
    return names


def _route(name: str, packed: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for hf_name, (fused_name, shard_id) in packed.items():
        if f".{hf_name}." in name:
            return name.replace(f".{hf_name}.", f".{fused_name}."), shard_id
    return name, None


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"Model path {path!r} does not exist "
                                "(expected an HF model folder or a .gguf file).")


def _check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is neither an HF model folder nor a .gguf file.")


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
