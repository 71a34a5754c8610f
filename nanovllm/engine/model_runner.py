"""Runs the model on a scheduled batch: owns the weights, the paged KV cache, the CUDA graphs and the sampler."""
import atexit
import gc
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.distributed.commands import send_allocate, send_forward, send_logits
from nanovllm.distributed.parallel_state import (
    check_tp_size,
    destroy_tensor_parallel,
    init_tensor_parallel,
    min_over_ranks,
)
from nanovllm.distributed.worker import TP_TIMEOUT_S, WorkerGroup
from nanovllm.engine.cuda_graph import DecodeGraphs, RingIds
from nanovllm.engine.prefill_graphs import PrefillGraphs
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.embed_head import ParallelLMHead
from nanovllm.layers.linear import RowParallelLinear
from nanovllm.layers.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    SeededDraw,
    changes_logits,
    compute_prompt_logprobs,
    reads_history,
    seed_key,
)
from nanovllm.models import load_model, set_use_triton
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.context import get_context, make_context, reset_context, set_context
from nanovllm.utils.loader import load_model_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_CPU_KV_GB = 1.0
# The decode graphs whose projections are tuned inside the step (DecodeGraphs.tune_step). Batch 2 gained
# nothing from it on an H100 (benchmarks/NOTES-gpu.md, session 20).
IN_STEP_BATCHES = (1,)
_LOGITS_CHUNK = 1024  # prompt-logprob rows turned into logits at a time: bounds the (rows, vocab) fp32 peak
# A started engine freezes the heap (_allocate_kv_cache); at exit the collector takes it back, so cycles close
# as before (else nanobind reports Triton's IR objects as leaked).
atexit.register(gc.unfreeze)


@dataclass
class StepOutput:
    """What one forward pass produced for the sequences that reached their last token."""
    sampled: dict[int, int]  # seq_id -> new token id
    logprobs: dict[int, tuple[float, list[int], list[float], int]]  # seq_id -> (lp, top ids, top lps, rank)
    prompt_logprobs: dict[int, list[tuple[int, float, list[int], list[float], int]]]
    # seq_id -> [(position of the predicted prompt token, its logprob, top ids, top lps, rank)]


class PendingStep:
    """A launched step whose sampled ids are on their way to the host (async scheduling).

    `token_ids` (B,) stay on the device for the next step's input ids: valid until that step has launched
    (a graph step's ids live in a buffer the next replay overwrites). result() waits for the copy to pinned
    memory, not for the steps launched since, and builds the StepOutput; under TP it waits inside the
    worker group's guard, so a worker that died meanwhile is a clear error there too."""

    def __init__(self, seqs: list[Sequence], sampled: SamplerOutput, guard: Callable | None = None,
                 ring: RingIds | None = None):
        self.seqs = seqs
        self.token_ids = sampled.token_ids
        self.rows = {seq.seq_id: i for i, seq in enumerate(seqs)}  # seq_id -> row of token_ids
        self.guard = guard
        self.ring = ring  # a graph step that sampled in its graph: its ids are on their way to the ring
        # Else copies now: a graph step's ids are overwritten by the next replay. On CUDA, to pinned memory
        # without a sync (.tolist() later would wait for the whole stream, the steps launched since included).
        # Where the ids (and logprobs) are in the ring, nothing is copied: they are read from the ring later.
        self.event = torch.cuda.Event() if sampled.token_ids.is_cuda else None
        copy = _to_pinned if self.event is not None else torch.clone
        logprobs = (sampled.logprobs, sampled.ranks, sampled.top_ids, sampled.top_logprobs)
        if ring is not None and ring.width is not None:
            logprobs = (None,) * 4
        self.host = SamplerOutput(*(t if t is None else copy(t) for t in (
            None if ring is not None else sampled.token_ids, *logprobs)))
        if self.event is not None:
            self.event.record()

    def result(self) -> StepOutput:
        return self._result() if self.guard is None else self.guard(self._result)

    def _result(self) -> StepOutput:
        if self.event is not None:
            self.event.synchronize()
        if self.ring is not None:
            self.host.token_ids = self.ring.ids()
            if self.ring.width is not None:
                self.host.logprobs, self.host.ranks, self.host.top_ids, self.host.top_logprobs = self.ring.logprobs()
        out = StepOutput({}, {}, {})
        ModelRunner.collect_samples(self.seqs, self.host, out)
        return out


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def resolve_device(config: Config, rank: int = 0) -> torch.device:
    device = torch.device(config.device if config.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and config.tensor_parallel_size > 1:
        device = torch.device("cuda", rank)  # one GPU per rank
    return device


def resolve_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def needs_sampler(seq: Sequence, graph_logprobs: bool = False) -> bool:
    """Sampling seq needs the eager Sampler: penalties, a pending min_tokens, or logprobs unless the decode
    graphs give them (graph_logprobs). A seed does not: graphs and Sampler draw seeded rows alike
    (layers/sampler.py). Decided on the host: no tensors built."""
    return (seq.sampling_params.logprobs is not None and not graph_logprobs) or changes_logits(seq)


def graph_sampling(seq: Sequence, vocab_size: int,
                   graph_logprobs: bool = False) -> tuple[float, int, float, float] | None:
    """How a decode graph samples seq: (temperature, top_k, top_p, min_p), with temperature 0 for an argmax
    and each filter off as (vocab_size, 1, 0); None when it needs the eager Sampler (needs_sampler)."""
    p = seq.sampling_params
    if needs_sampler(seq, graph_logprobs):
        return None
    if p.greedy:
        return argmax_sampling(vocab_size)
    return p.temperature, p.top_k if p.top_k > 0 else vocab_size, p.top_p, p.min_p


def argmax_sampling(vocab_size: int) -> tuple[float, int, float, float]:
    """graph_sampling's argmax: temperature 0, every filter off."""
    return 0.0, vocab_size, 1.0, 0.0


def _scatter_rows(out: SamplerOutput, rows: torch.Tensor, sub: SamplerOutput) -> SamplerOutput:
    """out, whose token_ids (B,) are every row's (a copy), with sub's results (len(rows) rows) in rows. Where
    out has logprobs (the graph's, of its other rows) sub's go into a copy of them, top lists as wide as the
    wider of the two; else sub's become (B,)-row tensors, zero in the other rows, which do not ask for them."""
    out.token_ids[rows] = sub.token_ids
    for name in ("logprobs", "ranks", "top_ids", "top_logprobs"):
        if (part := getattr(sub, name)) is not None:
            mine = getattr(out, name)
            if part.dim() == 1:
                full = part.new_zeros(len(out.token_ids)) if mine is None else mine.clone()
                full[rows] = part
            else:  # top lists
                width = part.shape[1] if mine is None else max(part.shape[1], mine.shape[1])
                full = part.new_zeros(len(out.token_ids), width)
                if mine is not None:
                    full[:, :mine.shape[1]] = mine
                full[rows, :part.shape[1]] = part
            setattr(out, name, full)
    return out


class ModelRunner:
    """On CUDA every layer takes its Triton path, the fused o_proj is tuned before anything is captured,
    the KV cache fills what a profiled max_num_batched_tokens prefill leaves of gpu_memory_utilization,
    and decode steps replay CUDA graphs unless `enforce_eager`. On CPU it is plain torch.

    With tensor_parallel_size > 1 there is one runner per rank, each with its shard of the model. Rank 0's
    (the engine's) starts the others in worker processes (distributed/worker.py) and, before each model
    call, sends them the call (down a pipe) and its inputs (a broadcast) so they run it too; only rank 0
    gets logits and samples. Every rank captures the decode graphs; the residual is added after the
    all-reduce (by its kernel or by the next RMSNorm: RowParallelLinear.forward_add)."""

    def __init__(self, config: Config, model_path: str, rank: int = 0, store: dist.Store | None = None):
        self.config, self.rank = config, rank
        self.device = resolve_device(config, rank)
        self.dtype = resolve_dtype(config, self.device)
        self.workers: WorkerGroup | None = None  # rank 0 of a tensor-parallel group only
        self.in_tp_group = False
        if config.tensor_parallel_size > 1:
            self._join_tensor_parallel(model_path, store)
        use_fused = config.use_fused_output
        if use_fused is None:
            use_fused = self.device.type == "cuda"
        if config.async_scheduling is None:  # the engine reads it back once this runner exists
            config.async_scheduling = self.device.type == "cuda"
        try:
            self.model, self.model_config = load_model(model_path, self.dtype, self.device, use_fused,
                                                       config.load_format)
        except BaseException:
            self.close()  # the workers, if any
            raise
        self.model.eval()
        set_use_triton(self.model, self.device.type == "cuda")
        self.sampler = Sampler()
        self.eos_token_ids: list[int] = []  # set by the engine; masked while min_tokens is not reached
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        if self.device.type == "cuda":  # on and off alike: o_proj and down_proj use its kernels
            self._tune_fused_output()

    def _join_tensor_parallel(self, model_path: str, store: dist.Store | None) -> None:
        if self.rank == 0:
            if dist.is_initialized():  # checked before any worker starts: the group is global state
                raise ValueError("A tensor-parallel engine is already running in this process; close() it "
                                 "first.")
            check_tp_size(load_model_config(model_path), self.config.tensor_parallel_size, self.device)
            self.workers = WorkerGroup(self.config, model_path, self.device)
            store = self.workers.store
        try:
            if self.workers is not None:
                self.workers.wait_ready()
            init_tensor_parallel(self.rank, self.config.tensor_parallel_size, store, self.device, TP_TIMEOUT_S)
            self.in_tp_group = True
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stops the workers (rank 0) and leaves the tensor-parallel group; a no-op without TP."""
        if self.in_tp_group:
            self.graphs = None  # its graphs hold captured collectives of the group: free them first
        if self.workers is not None:
            self.workers.close()  # with healthy workers, this also leaves the group
        if self.in_tp_group:  # not another engine's group
            destroy_tensor_parallel()
            self.in_tp_group = False

    def _tune_fused_output(self) -> None:
        """Times the dispatcher's kernels once per shape and M bucket, before any capture or timing: the
        row-parallel layers' projection + residual (o_proj, down_proj) up to the largest step, and the
        column-parallel ones' projection alone (qkv_proj, gate_up_proj) where they use it."""
        from nanovllm.kernels.fused_attention_output import warmup
        from nanovllm.layers import linear
        shapes = {(*m.weight.shape, m.bias is not None and m.tp_rank == 0)  # only rank 0 adds the bias
                  for m in self.model.modules() if isinstance(m, RowParallelLinear)}
        max_m = max(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        for n, k, has_bias in shapes:
            warmup(n, k, self.dtype, self.device, max_m=max_m, has_bias=has_bias)
        if linear.COLUMN_PARALLEL_DISPATCHER:
            shapes = {(*m.weight.shape, m.bias is not None)
                      for m in self.model.modules() if isinstance(m, linear.ColumnParallelLinear)}
            shapes |= {(*m.weight.shape, False) for m in self.model.modules()  # the LM head (embed_head.py)
                       if isinstance(m, ParallelLMHead) and m.tp_size == 1}
            for n, k, has_bias in shapes:
                warmup(n, k, self.dtype, self.device, max_m=linear.COLUMN_DISPATCHER_MAX_M, has_bias=has_bias,
                       fused=False)

    # ---- memory -----------------------------------------------------------------------------------
    def allocate_kv_cache(self, max_model_len: int) -> int:
        """Allocates one K and one V cache per layer, hands them to the Attention layers, and (CUDA, not
        enforce_eager) captures the decode graphs, whose block tables span max_model_len. Under TP every
        rank allocates the same number of blocks: the fewest any rank has room for."""
        if self.workers is not None:
            return self.workers.guard(self._allocate_everywhere, max_model_len)
        return self._allocate_kv_cache(max_model_len)

    def _allocate_everywhere(self, max_model_len: int) -> int:
        send_allocate(max_model_len)
        return self._allocate_kv_cache(max_model_len)

    def _allocate_kv_cache(self, max_model_len: int) -> int:
        layers = [m for m in self.model.modules() if hasattr(m, "k_cache") and hasattr(m, "v_cache")]
        assert len(layers) == self.model_config.num_hidden_layers, f"found {len(layers)} attention layers"
        bs, num_kv_heads, head_dim = self.config.block_size, layers[0].num_kv_heads, layers[0].head_dim
        bytes_per_block = 2 * len(layers) * bs * num_kv_heads * head_dim
        bytes_per_block *= torch.tensor([], dtype=self.dtype).element_size()
        num_blocks = self.config.num_kvcache_blocks or self._blocks_from_memory(bytes_per_block, max_model_len)
        num_blocks = min_over_ranks(num_blocks, self.device)  # every rank must hold every block id
        if num_blocks < 1:
            raise ValueError("Not enough memory for a single KV-cache block; lower max_model_len or "
                             "max_num_batched_tokens, or raise gpu_memory_utilization.")
        shape = (len(layers), num_blocks, bs, num_kv_heads, head_dim)
        # Zeros, not empty: the torch decode path gathers whole blocks and masks the unwritten tail, and a
        # NaN there would survive the mask (0 * NaN) in the probs @ V product.
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.k_cache[i], self.v_cache[i]
        self.num_blocks = num_blocks
        # NANOVLLM_UNCAPTURED_GRAPHS=1 sends CPU decode steps through the graphs' code path, uncaptured: it
        # tests their padding and their tensor-parallel protocol without a GPU.
        uncaptured = self.device.type == "cpu" and os.environ.get("NANOVLLM_UNCAPTURED_GRAPHS") == "1"
        if (self.device.type == "cuda" or uncaptured) and not self.config.enforce_eager:
            # Async scheduling fills a step's pinned inputs while the step before still reads its own.
            host_buffers = 2 if self.config.async_scheduling else 1
            self.graphs = DecodeGraphs(self.model, self.config.max_num_seqs, -(-max_model_len // bs), bs,
                                       self.model_config.vocab_size, self.dtype, self.device,
                                       capture=not uncaptured, host_buffers=host_buffers)
            for bs in self._in_step_batches():
                self.graphs.tune_step(self.model, bs, min(128, max_model_len), num_blocks)
        if self.device.type == "cuda" and self.rank == 0:
            self._warm_up_seeded_draws()
            self._warm_up_penalties()
        if (self.device.type == "cuda" or uncaptured) and self._wants_prefill_graphs():
            block_size = self.config.block_size
            self.prefill_graphs = PrefillGraphs(self.model, self.config.max_num_batched_tokens,
                                                self.config.max_num_seqs, -(-max_model_len // block_size),
                                                block_size, self.device, capture=not uncaptured)
        # What exists now (modules, weights, graphs, everything imported) lives as long as the engine. Frozen,
        # it is out of the cyclic collector's sight, so a full collection while serving walks only what the
        # requests create; one that walked it all took 140 ms in the middle of a timed H100 run
        # (benchmarks/NOTES-gpu.md, session 8). vLLM freezes after capturing its graphs too. Refcounting
        # still frees the engine and its model when they go (tests/test_engine.py).
        gc.collect()
        gc.freeze()
        return num_blocks

    def _warm_up_seeded_draws(self) -> None:
        """Compiles the kernels that seeded rows run outside the decode graphs (layers/sampler.draw in an
        eager step: raw logits with and without filters, float32 logits after penalties), at the fewest rows
        of each variant up to max_num_seqs (PDL or not, narrow chunks or wide), so that the first seeded
        request does not compile them mid-serving."""
        from nanovllm.kernels.pdl import pdl_enabled
        from nanovllm.kernels.sample import chunk_size
        variants: dict[tuple[bool, int], int] = {}
        for rows in range(1, self.config.max_num_seqs + 1):
            variants.setdefault((pdl_enabled(self.device, rows), chunk_size(rows)), rows)
        vocab = self.model_config.vocab_size
        seqs = [Sequence([0], SamplingParams(temperature=1.0, top_p=p, seed=0)) for p in (1.0, 0.9)]
        for rows in variants.values():
            logits = torch.zeros(rows, vocab, dtype=self.dtype, device=self.device)
            for seq in seqs:
                SeededDraw.build([seq] * rows, list(range(rows)), self.device, vocab, filters=True)(logits)
            SeededDraw.build([seqs[0]] * rows, list(range(rows)), self.device, vocab, filters=False)(logits.float())
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # its temporaries (a float32 engine sorts the rows)

    def _warm_up_penalties(self) -> None:
        """Compiles kernels/penalties.py's three variants (repetition, frequency/presence, both) and makes its
        scratch, so that the first penalized request does not compile them mid-serving."""
        from nanovllm.kernels import penalties
        if penalties.triton is None:
            return
        vocab = self.model_config.vocab_size
        raw = torch.zeros(1, vocab, dtype=self.dtype, device=self.device)
        ids, factor = torch.zeros(1, 1, dtype=torch.int64, device=self.device), torch.ones(1, device=self.device)
        for rep, freq in ((True, False), (False, True), (True, True)):
            processed = torch.zeros(1, vocab, device=self.device)
            penalties.apply_penalties(processed, raw, ids if rep else None, factor if rep else None,
                                      ids if freq else None, factor if freq else None, factor if freq else None)
        torch.cuda.synchronize(self.device)

    def _in_step_batches(self) -> list[int]:
        """The graphs whose projections are tuned inside the step (DecodeGraphs.tune_step): that of 1 seq
        where it launches with PDL, in one process (no TP), unless NANOVLLM_TUNE_IN_STEP=0. The choices
        persist in the tuning file, so a later start only recalls them."""
        from nanovllm.kernels.pdl import pdl_enabled
        if (self.device.type != "cuda" or self.config.tensor_parallel_size != 1
                or os.environ.get("NANOVLLM_TUNE_IN_STEP", "1") == "0"):
            return []
        return [bs for bs in IN_STEP_BATCHES if bs in self.graphs.batch_sizes and pdl_enabled(self.device, bs)]

    def _wants_prefill_graphs(self) -> bool:
        """Steps with prompt tokens replay prefill graphs (engine/prefill_graphs.py): one process, not
        enforce_eager, unless NANOVLLM_PREFILL_GRAPHS=0."""
        return (os.environ.get("NANOVLLM_PREFILL_GRAPHS", "1") != "0" and not self.config.enforce_eager
                and self.config.tensor_parallel_size == 1)

    def _blocks_from_memory(self, bytes_per_block: int, max_model_len: int) -> int:
        if self.device.type != "cuda":
            return int((self.config.kv_cache_memory_gb or _DEFAULT_CPU_KV_GB) * 2**30 // bytes_per_block)
        activations = self.profile_activation_memory(max_model_len)
        if self._wants_prefill_graphs():  # their pool keeps a largest step's activations for good, and the
            activations *= 2  # steps they do not serve (prompt logprobs) still need as much again
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.config.gpu_memory_utilization - (total - free) - activations
        return int(budget // bytes_per_block)

    @torch.inference_mode()
    def profile_activation_memory(self, max_model_len: int) -> int:
        """Peak bytes a max_num_batched_tokens prefill allocates beyond what is already held (the weights),
        measured by running one, with a chunk of prompt-logprob logits (nano-vllm's warmup_model)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens, bs = self.config.max_num_batched_tokens, self.config.block_size
        seq_len = min(max_model_len, tokens)
        num_seqs = max(1, min(tokens // seq_len, self.config.max_num_seqs))
        q_lens = [seq_len] * num_seqs
        set_context(make_context(q_lens, q_lens, [[0] * -(-seq_len // bs)] * num_seqs, bs, self.device))
        try:
            input_ids = torch.zeros(num_seqs * seq_len, dtype=torch.int64, device=self.device)
            positions = torch.arange(seq_len, device=self.device).repeat(num_seqs)
            hidden = self.model(input_ids, positions)  # (T, hidden); no KV cache yet: attention is cache-less
            logits = self.model.compute_logits(hidden[:_LOGITS_CHUNK])  # None on a TP worker (rank 0 gathers)
            if logits is not None:
                logits.float().log_softmax(-1)
        finally:
            reset_context()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        return peak

    # ---- a step -----------------------------------------------------------------------------------
    def run(self, batch: ScheduledBatch) -> StepOutput:
        if self.workers is not None:  # a dead worker becomes a clear error, not a hang
            return self.workers.guard(self._run, batch)
        return self._run(batch)

    @torch.inference_mode()
    def _run(self, batch: ScheduledBatch) -> StepOutput:
        out = StepOutput({}, {}, {})
        if self._graph_ready(batch):  # read back as an async step is, at once
            sampled, ring = self._replay(batch.seqs)
            return PendingStep(batch.seqs, sampled, ring=ring).result()
        hidden, sample_rows, plp_rows = self._forward(batch)  # (T, hidden)
        sampled_seqs = [seq for seq, _ in sample_rows]
        if sampled_seqs:
            rows = torch.tensor([r for _, r in sample_rows], device=self.device)
            logits = self.compute_logits(hidden[rows])  # (B, V)
            self.collect_samples(sampled_seqs, self._sample_on_device(sampled_seqs, logits), out)
        if plp_rows:
            self._collect_prompt_logprobs(hidden, plp_rows, out)
        return out

    # ---- async scheduling: a step launched now, read back later ------------------------------------
    def launch(self, batch: ScheduledBatch, prev: PendingStep | None = None) -> PendingStep:
        """Starts a step (no prompt logprobs: Scheduler.can_overlap) and returns before its sampled ids are
        back. With prev, the step still in flight, a seq sampled there has a placeholder for its input id:
        it is gathered from prev's ids on the device. Under TP the workers get the step's commands now and
        follow on their own streams; nothing here waits for a GPU."""
        if self.workers is not None:
            return self.workers.guard(self._launch, batch, prev)
        return self._launch(batch, prev)

    @torch.inference_mode()
    def _launch(self, batch: ScheduledBatch, prev: PendingStep | None) -> PendingStep:
        guard = None if self.workers is None else self.workers.guard
        if self._graph_ready(batch) and (prev is None or all(seq.seq_id in prev.rows for seq in batch.seqs)):
            src_rows = None if prev is None else [prev.rows[seq.seq_id] for seq in batch.seqs]
            prev_ids = None if prev is None else prev.token_ids
            sampled, ring = self._replay(batch.seqs, prev_ids, src_rows)
            return PendingStep(batch.seqs, sampled, guard, ring)
        hidden, sample_rows, plp_rows = self._forward(batch, prev)  # (T, hidden)
        assert not plp_rows, "prompt logprobs come from run(): such steps are not launched ahead"
        sampled_seqs = [seq for seq, _ in sample_rows]
        if not sampled_seqs:  # only prefill chunks that end mid-prompt
            return PendingStep([], SamplerOutput(torch.empty(0, dtype=torch.int64, device=self.device)), guard)
        logits = self.compute_logits(hidden[self._to_device([row for _, row in sample_rows])])  # (B, V)
        history = None if prev is None else (prev.token_ids, [prev.rows.get(seq.seq_id) for seq in sampled_seqs])
        return PendingStep(sampled_seqs, self._sample_on_device(sampled_seqs, logits, history), guard)

    def _to_device(self, values) -> torch.Tensor:
        """int64 indices on the device, copied without waiting for the stream (a blocking copy from pageable
        memory would wait for the steps in flight)."""
        return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

    def _replay(self, seqs: list[Sequence], prev_ids: torch.Tensor | None = None,
                src_rows: list[int] | None = None) -> tuple[SamplerOutput, RingIds | None]:
        """One decode step of seqs from the captured graphs; the sampled ids (B,) stay on the device, and
        where the graph sampled them all also go to the ring (RingIds); rows that need the Sampler take it
        on their rows of the graph's logits. With prev_ids, seq i's input id is
        prev_ids[src_rows[i]] (async scheduling: see DecodeGraphs.replay)."""
        n, vocab_size = len(seqs), self.graphs.vocab_size
        history = None  # penalties read the ids in flight (SamplingBatch.build)
        if prev_ids is not None and any(reads_history(seq) for seq in seqs):
            # Never the graphs' buffer, which the replay below overwrites: a seq with penalties took the Sampler
            # in the step before, whose ids are a tensor of their own.
            assert prev_ids.data_ptr() != self.graphs.next_tokens.data_ptr()
            history = prev_ids, src_rows
        graph_logprobs = self.graphs.tp_size == 1  # under TP a row with logprobs takes the full Sampler
        params = [graph_sampling(seq, vocab_size, graph_logprobs) for seq in seqs]
        # Rows that need the Sampler (penalties, min_tokens, logprobs): at TP 1, unless every row does, the graph
        # takes their argmax and the Sampler replaces it from their rows of the graph's logits, so the other
        # rows still sample in the graph. Otherwise the full Sampler below takes the whole step.
        eager = [i for i, p in enumerate(params) if p is None]
        if self.graphs.tp_size == 1 and 0 < len(eager) < n:
            params = [p or argmax_sampling(vocab_size) for p in params]
        else:
            eager = []
        filters, off = None if None in params else [p[1:] for p in params], argmax_sampling(vocab_size)[1:]
        keys = None if filters is None else [seed_key(seq) if p[0] > 0 else -1 for seq, p in zip(seqs, params)]
        keys = keys if keys is not None and max(keys) >= 0 else None  # seeded rows draw by their own keys
        if filters is not None and all(f == off for f in filters):  # argmax or temperature, no filter
            temperatures = [p[0] for p in params]
            ring = self.graphs.replay(seqs, temperatures if any(temperatures) else None, prev_ids, src_rows,
                                      keys=keys)
        elif filters is not None and self.graphs.can_filter(n):  # top-k/p, min-p: the FILTER graph
            ring = self.graphs.replay(seqs, [p[0] for p in params], prev_ids, src_rows, filters=filters,
                                      keys=keys)
        else:  # the full Sampler, on the greedy graph's logits
            self.graphs.replay(seqs, prev_ids=prev_ids, src_rows=src_rows, logits=True)
            return self._sample_on_device(seqs, self.graphs.logits[:n], history), None
        # Rows that ask for logprobs get them from the bucket's logprobs graph (every row, the widest asked);
        # the Sampler's rows bring their own.
        sampler_rows = set(eager)
        asked = [seq.sampling_params.logprobs for i, seq in enumerate(seqs)
                 if seq.sampling_params.logprobs is not None and i not in sampler_rows]
        out = SamplerOutput(self.graphs.next_tokens[:n], *self.graphs.logprobs(ring, max(asked)) if asked else ())
        if not eager:
            return out, ring
        rows = self._to_device(eager)
        sub = self._sample_on_device([seqs[i] for i in eager], self.graphs.logits[:n][rows],
                                     None if history is None else (prev_ids, [src_rows[i] for i in eager]))
        out.token_ids = out.token_ids.clone()
        return _scatter_rows(out, rows, sub), None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, hidden_size) -> logits (N, V). Under TP the workers compute their vocab slices of the
        same rows, which rank 0 gathers."""
        if self.workers is not None:
            send_logits(hidden)
        return self.model.compute_logits(hidden)

    def _graph_ready(self, batch: ScheduledBatch) -> bool:
        """A captured graph serves the batch: one token per seq, every seq sampled, within the buckets."""
        return (self.graphs is not None and len(batch.seqs) <= self.graphs.max_bs
                and all(n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens
                        for seq, n in zip(batch.seqs, batch.num_new_tokens)))

    def _sample_on_device(self, seqs: list[Sequence], logits: torch.Tensor,
                          history: tuple[torch.Tensor, list[int | None]] | None = None) -> SamplerOutput:
        """logits (B, V) in the model dtype -> the sampled ids (B,) (+ logprobs), left on the device. history:
        where the ids of the step in flight are, for penalties (SamplingBatch.build)."""
        if all(seq.sampling_params.greedy and not needs_sampler(seq) for seq in seqs):  # greedy: one argmax
            return SamplerOutput(logits.argmax(dim=-1))
        sampling = SamplingBatch.build(seqs, self.device, logits.shape[-1], self.eos_token_ids, history)
        return self.sampler(logits, sampling)

    def _forward(self, batch: ScheduledBatch, prev: PendingStep | None = None):
        """(hidden states (T or more rows, the step's T first), sample rows, prompt-logprob rows) of a step
        the decode graphs do not serve: its bucket's prefill graph replayed where one fits, else the model
        run eagerly (under TP by every rank). With prev, the step in flight (async scheduling), a seq sampled
        there has a placeholder for its input id: it is gathered from prev's ids on the device."""
        ids, pos, q_lens, ctx_lens, tables, sample_rows, plp_rows = self._host_inputs(batch)
        graphs = self.prefill_graphs
        if graphs is not None and not plp_rows and graphs.fits(len(ids), len(q_lens), max(q_lens)):
            bucket = graphs.write_inputs(ids, pos, q_lens, ctx_lens, tables)
            self._fill_placeholders(batch, prev, graphs.input_ids)
            return graphs.run(bucket), sample_rows, plp_rows
        set_context(make_context(q_lens, ctx_lens, tables, self.config.block_size, self.device))
        input_ids, positions = self._to_device(ids), self._to_device(pos)
        self._fill_placeholders(batch, prev, input_ids)
        if self.workers is not None:  # the gathered ids: broadcast after the gather, on the same stream
            send_forward(input_ids, positions, get_context())
        hidden = self.model(input_ids, positions)
        reset_context()
        return hidden, sample_rows, plp_rows

    def _fill_placeholders(self, batch: ScheduledBatch, prev: PendingStep | None, input_ids: torch.Tensor) -> None:
        """Replaces the placeholder ids of seqs sampled in prev (in flight) with prev's ids, on the device."""
        if prev is None:
            return
        starts = itertools.accumulate(batch.num_new_tokens, initial=0)
        pairs = [(start, prev.rows[seq.seq_id]) for seq, start in zip(batch.seqs, starts) if seq.seq_id in prev.rows]
        if pairs:
            dst, src = zip(*pairs)
            input_ids[self._to_device(dst)] = prev.token_ids[self._to_device(src)]

    def _host_inputs(self, batch: ScheduledBatch):
        """A step's inputs as host lists: ids, positions, q_lens, context_lens, block tables, and the rows to
        sample ((seq, row)) and to take prompt logprobs from ((seq, offset, start, last))."""
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
        return ids, pos, q_lens, ctx_lens, tables, sample_rows, plp_rows

    @staticmethod
    def collect_samples(seqs: list[Sequence], result: SamplerOutput, out: StepOutput) -> None:
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
            entries = out.prompt_logprobs.setdefault(seq.seq_id, [])
            for lo in range(start, last, _LOGITS_CHUNK):
                hi = min(lo + _LOGITS_CHUNK, last)
                rows = slice(offset + lo - start, offset + hi - start)
                logits = self.compute_logits(hidden[rows]).float()  # (n, V)
                targets = torch.tensor(seq.token_ids[lo + 1:hi + 1], device=self.device)
                self._append_prompt_logprobs(entries, lo, logits, targets, seq.sampling_params.prompt_logprobs)

    @staticmethod
    def _append_prompt_logprobs(entries: list, start: int, logits: torch.Tensor, targets: torch.Tensor,
                                k: int) -> None:
        lp, ranks, top_ids, top_lps = compute_prompt_logprobs(logits, targets, k)
        lp, ranks = lp.tolist(), ranks.tolist()
        top_ids = top_ids.tolist() if top_ids is not None else [[]] * len(lp)
        top_lps = top_lps.tolist() if top_lps is not None else [[]] * len(lp)
        for j in range(len(lp)):
            entries.append((start + 1 + j, lp[j], top_ids[j], top_lps[j], ranks[j]))
