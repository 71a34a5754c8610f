"""Runs the model on a scheduled batch: owns the weights, the paged KV cache and the sampler."""
from dataclasses import dataclass

import torch

from nanovllm.config import Config, ModelConfig
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampler import Sampler, SamplingBatch, compute_prompt_logprobs
from nanovllm.models import load_model
from nanovllm.utils.context import make_context, reset_context, set_context

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_CPU_KV_GB = 1.0


@dataclass
class StepOutput:
    """What one forward pass produced for the sequences that reached their last token."""
    sampled: dict[int, int]  # seq_id -> new token id
    logprobs: dict[int, tuple[float, list[int], list[float], int]]  # seq_id -> (lp, top ids, top lps, rank)
    prompt_logprobs: dict[int, list[tuple[int, float, list[int], list[float], int]]]
    # seq_id -> [(position of the predicted prompt token, its logprob, top ids, top lps, rank)]


def resolve_device(config: Config) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    def __init__(self, config: Config, model_path: str):
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        use_fused = config.use_fused_output
        if use_fused is None:
            use_fused = self.device.type == "cuda"
        self.model, self.model_config = load_model(model_path, self.dtype, self.device, use_fused,
                                                   config.load_format)
        self.model.eval()
        self.sampler = Sampler()
        self.eos_token_ids: list[int] = []  # set by the engine; masked while min_tokens is not reached
        self.num_blocks = 0

    def allocate_kv_cache(self, max_model_len: int) -> int:
        """Allocates one K and one V cache per layer and hands them to the Attention layers."""
        cfg: ModelConfig = self.model_config
        bs = self.config.block_size
        bytes_per_block = 2 * cfg.num_hidden_layers * bs * cfg.num_key_value_heads * cfg.head_dim
        bytes_per_block *= torch.tensor([], dtype=self.dtype).element_size()
        num_blocks = self.config.num_kvcache_blocks or self._blocks_from_memory(bytes_per_block)
        if num_blocks < 1:
            raise ValueError("Not enough memory for a single KV-cache block; lower max_model_len or free memory.")
        shape = (cfg.num_hidden_layers, num_blocks, bs, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=self.dtype, device=self.device)
        layers = [m for m in self.model.modules() if hasattr(m, "k_cache") and hasattr(m, "v_cache")]
        assert len(layers) == cfg.num_hidden_layers, f"found {len(layers)} attention layers"
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.k_cache[i], self.v_cache[i]
        self.num_blocks = num_blocks
        return num_blocks

    def _blocks_from_memory(self, bytes_per_block: int) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.config.gpu_memory_utilization - used - self._activation_reserve()
        else:
            budget = (self.config.kv_cache_memory_gb or _DEFAULT_CPU_KV_GB) * 2**30
        return int(budget // bytes_per_block)

    def _activation_reserve(self) -> int:
        # Peak activations of one step: logits and MLP intermediates dominate; a generous fixed estimate.
        cfg = self.model_config
        tokens = self.config.max_num_batched_tokens
        per_token = 4 * (cfg.intermediate_size * 2 + cfg.hidden_size * 4) + 4 * cfg.vocab_size // 8
        return tokens * per_token + 2**30

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepOutput:
        input_ids, positions, sample_rows, plp_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions)  # (T, hidden)
        reset_context()
        out = StepOutput({}, {}, {})
        sampled_seqs = [seq for seq, _ in sample_rows]
        if sampled_seqs:
            rows = torch.tensor([r for _, r in sample_rows], device=self.device)
            logits = self.model.compute_logits(hidden[rows]).float()  # (B, V)
            sampling = SamplingBatch.build(sampled_seqs, self.device, logits.shape[-1], self.eos_token_ids)
            result = self.sampler(logits, sampling)
            self._collect_samples(sampled_seqs, result, out)
        if plp_rows:
            self._collect_prompt_logprobs(hidden, plp_rows, out)
        return out

    def _prepare(self, batch: ScheduledBatch):
        ids, pos, q_lens, ctx_lens, tables = [], [], [], [], []
        sample_rows, plp_rows = [], []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start:start + n])
            pos.extend(range(start, start + n))
            q_lens.append(n)
            ctx_lens.append(start + n)
            tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                sample_rows.append((seq, offset + n - 1))
            if seq.sampling_params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                # Row p predicts token p + 1: prompt tokens 1 .. num_prompt_tokens - 1.
                last = min(start + n, seq.num_prompt_tokens - 1)
                plp_rows.append((seq, offset, start, last))
            offset += n
        set_context(make_context(q_lens, ctx_lens, tables, self.config.block_size, self.device))
        as_long = lambda x: torch.tensor(x, dtype=torch.int64).to(self.device, non_blocking=True)  # noqa: E731
        return as_long(ids), as_long(pos), sample_rows, plp_rows

    def _collect_samples(self, seqs: list[Sequence], result, out: StepOutput) -> None:
        token_ids = result.token_ids.tolist()
        want_lp = any(s.sampling_params.logprobs is not None for s in seqs)
        lps = result.logprobs.tolist() if want_lp else None
        ranks = result.ranks.tolist() if want_lp else None
        top_ids = result.top_ids.tolist() if want_lp and result.top_ids is not None else None
        top_lps = result.top_logprobs.tolist() if want_lp and result.top_logprobs is not None else None
        for i, seq in enumerate(seqs):
            out.sampled[seq.seq_id] = token_ids[i]
            k = seq.sampling_params.logprobs
            if k is not None:
                ids = top_ids[i][:k] if top_ids else []
                vals = top_lps[i][:k] if top_lps else []
                out.logprobs[seq.seq_id] = (lps[i], ids, vals, ranks[i])

    def _collect_prompt_logprobs(self, hidden: torch.Tensor, plp_rows, out: StepOutput) -> None:
        for seq, offset, start, last in plp_rows:
            rows = slice(offset, offset + last - start)
            logits = self.model.compute_logits(hidden[rows]).float()  # (n, V)
            targets = torch.tensor(seq.token_ids[start + 1:last + 1], device=self.device)
            k = seq.sampling_params.prompt_logprobs
            lp, ranks, top_ids, top_lps = compute_prompt_logprobs(logits, targets, k)
            entries = out.prompt_logprobs.setdefault(seq.seq_id, [])
            lp, ranks = lp.tolist(), ranks.tolist()
            top_ids = top_ids.tolist() if top_ids is not None else [[]] * len(lp)
            top_lps = top_lps.tolist() if top_lps is not None else [[]] * len(lp)
            for j in range(len(lp)):
                entries.append((start + 1 + j, lp[j], top_ids[j], top_lps[j], ranks[j]))
