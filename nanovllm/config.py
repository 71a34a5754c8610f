"""Engine and model configuration as plain dataclasses."""
from dataclasses import dataclass, field


@dataclass(slots=True)
class ModelConfig:
    """The architecture facts the engine needs, normalized from config.json or GGUF metadata."""
    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qkv bias: True for Qwen2
    mlp_bias: bool = False
    dtype: str = "float32"  # dtype the checkpoint is stored in
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Config:
    """Engine arguments (vLLM names). `model` is an HF folder or a .gguf file; "" is the default model."""
    model: str = ""
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's context, capped at 8192
    block_size: int = 16
    num_kvcache_blocks: int | None = None  # None: sized from memory
    kv_cache_memory_gb: float | None = None  # CPU: KV-cache budget (default 1 GiB)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU
    device: str = "auto"  # auto: cuda if available, else cpu
    use_fused_output: bool | None = None  # None: on for CUDA, off for CPU
    tensor_parallel_size: int = 1
    seed: int = 0
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks, GPU tests)
    skip_tokenizer_init: bool = False  # token-id prompts only; outputs carry token ids and no text
    # Schedule and launch decode step n+1 while step n runs, its input ids taken from step n's sampled ids
    # on the device, at any tensor_parallel_size; outputs are the same.
    async_scheduling: bool | None = None  # None: on for CUDA, off for CPU (no GPU to overlap with)

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}.")
        if self.num_kvcache_blocks is not None and self.num_kvcache_blocks < 1:
            raise ValueError(f"num_kvcache_blocks must be >= 1, got {self.num_kvcache_blocks!r}.")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}.")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}.")
