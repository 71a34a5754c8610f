"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, fed through static buffers.

A decode step of a small model is hundreds of tiny kernels; launched one by one from Python, the launches
cost more than the kernels. Captured once per bucket (1, 2, 4, 8, 16, then every 16 up to max_num_seqs),
a step is one replay. A batch is padded up to its bucket with rows that store nothing (slot -1) and attend
to nothing (context length 0). Block tables are padded to max_model_len's block count, so the decode
kernel's split count, chosen from shapes alone, is fixed per bucket. Where a table of SHORT_CONTEXT tokens
would split the keys fewer ways (the small buckets of an engine whose max_model_len is larger, at TP 1),
the bucket has its graphs twice, the second over the first SHORT_CONTEXT tokens' columns of the tables, and
a step whose seqs all fit replays that one: at the default max_model_len (8,192) a batch-1 step splits its
keys 32 ways, which long contexts need and short ones pay for (NANOVLLM_SHORT_DECODE_GRAPHS=0: off).

The graphs end with the sampler where it can live there: each bucket has a greedy graph (LM head, argmax)
and a sampling graph that draws temperature samples in one Triton pass over the logits (kernels/sample.py;
rows with temperature 0 keep the argmax, and on CUDA the greedy graph's argmax is that pass at temperature
0), so such a step copies back only B token ids. Every bucket (one process; NANOVLLM_FILTER_MAX_BS=n keeps
it to buckets of up to n seqs) has a third graph for top-k, top-p and min-p: two kernels find each row's
threshold from a histogram of its logits (kernels/top_k_top_p.py), and the same draw keeps to it. A seeded
row draws in these graphs by its own Philox key at its position (`draw_keys`), as the eager Sampler draws it.
Logprobs come after the replay from a small graph of the bucket (kernels/logprobs.py), captured the first
time a step asks for them (at TP 1). A row that needs anything else (penalties, a pending min_tokens) is the
graph's argmax, and the runner replaces it with the Sampler's draw from that row of the graph's logits (at
TP 1; under TP such a step, or one with logprobs, replays the greedy graph and runs the Sampler on every
row).

Under tensor parallelism every rank captures the same graphs, collectives included (NCCL collectives are
captured like kernels), and samples inside them without gathering the logits: each rank computes its slice
of the vocabulary's logits and each row's best (score, index) per chunk of it (Gumbel-perturbed at the
row's temperature, plain for greedy rows), the ranks all-gather those pairs (a few KB), and every rank picks
the same winners (kernels/sample.py). Only a step that needs the full Sampler gathers the B x vocab logits
to rank 0, eagerly after the replay. Before each replay rank 0 sends DECODE down the workers' pipes and
broadcasts the step's input buffers (distributed/commands.py), and the workers replay the same graph on
them; the sampling seed is rank 0's on every rank, and every replay bumps it everywhere, so the ranks'
random numbers agree.
"""
import os
from itertools import chain, count

import torch
import torch.distributed as dist
from torch import nn

from nanovllm.distributed.commands import broadcast_decode_inputs, send_decode
from nanovllm.distributed.parallel_state import all_gather, gather_to_first, get_tp_rank, get_tp_size
from nanovllm.engine.sequence import Sequence
from nanovllm.kernels import top_k_top_p
from nanovllm.kernels.logprobs import PACKED, LogprobsBuffers, logprobs, logprobs_ref, pack_ref, top_width, unpack
from nanovllm.kernels.paged_attention import default_num_kv_splits
from nanovllm.kernels.sample import (
    CHUNK,
    HostOut,
    chunk_bests,
    feed_back,
    feed_back_ref,
    pick_bests,
    sample_workspace,
)
from nanovllm.layers.sampler import draw
from nanovllm.utils.context import Context, longest_first, reset_context, set_context


def replay_us(graph: torch.cuda.CUDAGraph, reps: int, rounds: int) -> float:
    """Median over `rounds` of a graph's µs a replay, each round `reps` back-to-back replays between two
    CUDA events, after 3 untimed ones."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[rounds // 2]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, 48, ...: the first bucket >= max_num_seqs is the last."""
    sizes = []
    for size in chain((1, 2, 4, 8), count(16, 16)):
        sizes.append(size)
        if size >= max_num_seqs:
            return sizes


GREEDY, SAMPLE, FILTER = 0, 1, 2  # a bucket's graphs: argmax; temperature draws; top-k/top-p/min-p draws
RING = 4  # rows of the ids' ring: async scheduling reads a step's ids back while one more is in flight
SHORT_CONTEXT = 1024  # tokens of the short graphs' block tables (see the module's docstring)


SORTED_FILTER_MAX_BS = 32  # the default bound where a FILTER graph sorts (float32 logits on CUDA)


def filter_max_bs(default: int) -> int:
    """The largest bucket with a FILTER graph: `default` unless NANOVLLM_FILTER_MAX_BS says otherwise (read
    when an engine starts; 0: no FILTER graphs). By default every bucket where the histogram kernels run
    (256 KB a row); above 32 seqs they took a top-k/top-p workload from 13.6k to 19.3k tok/s on an H100
    (benchmarks/NOTES-gpu.md, session 30): the eager Sampler's sort of every row had cost that run 2.9 s over
    ~1,000 steps. Graphs of float32 logits sort inside (filter_logits), and its temporaries (~28 bytes a
    logit: ~1 GB at 256 rows of a 152k vocabulary) stay in the graph pool, so there they stop at
    SORTED_FILTER_MAX_BS."""
    value = os.environ.get("NANOVLLM_FILTER_MAX_BS")
    if value is None:
        return default
    if not value.strip().lstrip("-").isdigit():
        raise ValueError(f"NANOVLLM_FILTER_MAX_BS must be an integer number of seqs, got {value!r}")
    return int(value)


def capture_behind(fn, stream: torch.cuda.Stream, **capture_args) -> torch.cuda.CUDAGraph:
    """fn's kernels as a CUDA graph, captured on `stream` behind what the current stream has queued, which
    then waits for it. Not torch.cuda.graph(): each use syncs, collects and empties the allocator's caches,
    slow for many captures (tuning) and a stall mid-serving. capture_args go to capture_begin."""
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(**capture_args)
        try:
            fn()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


class RingIds:
    """Where one replay's sampled ids land: a row of DecodeGraphs.ring (pinned), written by the graph's last
    kernel, so valid once an event after the replay has completed and until RING replays later reuse the
    row. Where the step's logprobs graph ran (width set), its results are in the same row of logprob_ring."""

    def __init__(self, graphs: "DecodeGraphs", replay: int, n: int):
        self.graphs, self.replay, self.n = graphs, replay, n
        self.slot = replay % RING  # replay r + RING reuses the row
        self.width: int | None = None  # the top width of the logprobs in logprob_ring, if any

    def ids(self) -> torch.Tensor:
        """(n,) int64 in pinned memory; call after the replay is known complete."""
        return self._row(self.graphs.ring)

    def logprobs(self) -> tuple[torch.Tensor, ...]:
        """(logprob, rank, top ids, top logprobs) as logprobs_ref returns them, from pinned memory; call after
        the logprobs graph is known complete."""
        return unpack(self._row(self.graphs.logprob_ring), self.width)

    def _row(self, ring: torch.Tensor) -> torch.Tensor:
        if self.graphs.num_replays - self.replay > RING:
            raise RuntimeError(f"decode step {self.replay}'s results were read after {RING} later replays reused "
                               "their ring row")
        return ring[self.slot, :self.n]


class _PinnedInputs:
    """One set of host staging buffers for a replay's inputs (pinned on CUDA). A replay's copies read them
    after replay() has returned, so a set is rewritten only once its step is known to be done: after the
    caller's read-back with one set, or two steps later with two (async scheduling)."""

    def __init__(self, max_bs: int, max_num_blocks: int, pin: bool):
        # The 4th row: [ring slot, 0...]; the 5th: each row's Philox key (DecodeGraphs.draw_keys)
        self.int64 = torch.zeros(5, max_bs, dtype=torch.int64, pin_memory=pin)
        self.int32 = torch.zeros(max_bs * (2 + max_num_blocks), dtype=torch.int32, pin_memory=pin)
        self.temps = torch.zeros(max_bs, dtype=torch.float32, pin_memory=pin)
        self.filters = torch.zeros(3, max_bs, dtype=torch.float32, pin_memory=pin)  # top_k, top_p, min_p
        self.np64, self.np32 = self.int64.numpy(), self.int32.numpy()  # views: writes go to pinned memory
        self.np_tables = self.np32[2 * max_bs:].reshape(max_bs, max_num_blocks)
        self.row_tables: list[list[int] | None] = [None] * max_bs  # what each row of np_tables holds


class DecodeGraphs:
    """Captures `model` for decode batches of up to max_num_seqs seqs and replays it for a batch of seqs.

    Inputs travel in host-to-device copies from pinned buffers: int64 [input_ids; positions; slot_mapping;
    ring slot; seeded rows' Philox keys], int32 [context_lens | seq_order | block_tables] and, for the
    sampling graphs, float32 temperatures. Outputs: `logits` (max_bs, vocab) in the model dtype (under TP:
    on rank 0, after a replay that gathers them), `next_tokens` (max_bs,) int64, and on rank 0 the same ids
    in pinned memory, in the `ring` row the replay's input names (RingIds): the sampler's last kernel writes
    them there, so no copy back follows a replay on the stream.
    """

    @torch.inference_mode()
    def __init__(self, model: nn.Module, max_num_seqs: int, max_num_blocks: int, block_size: int,
                 vocab_size: int, dtype: torch.dtype, device: torch.device, capture: bool = True,
                 host_buffers: int = 1):
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = max_bs = self.batch_sizes[-1]
        self.bucket = [next(b for b in self.batch_sizes if b >= n) for n in range(max_bs + 1)]
        self.block_size, self.max_num_blocks = block_size, max_num_blocks
        self.host = [_PinnedInputs(max_bs, max_num_blocks, device.type == "cuda") for _ in range(host_buffers)]
        self.num_replays = 0  # picks the host buffer set: replay i uses host[i % host_buffers]
        self.dev64 = torch.zeros(5, max_bs, dtype=torch.int64, device=device)
        self.dev32 = torch.zeros(max_bs * (2 + max_num_blocks), dtype=torch.int32, device=device)
        # (max_bs,) each; draw_keys: a seeded row's own key (-1: the graph's seed), drawn at its position
        self.input_ids, self.positions, self.slot_mapping, ring_row, self.draw_keys = self.dev64
        self.ring_slot = ring_row[:1]  # (1,): which ring row this replay's ids go to
        self.ring = torch.zeros(RING, max_bs, dtype=torch.int64, pin_memory=device.type == "cuda")
        # Each replay's logprobs, packed (kernels/logprobs.py), in the ring row of its ids.
        self.logprob_ring = torch.zeros(RING, max_bs, PACKED, dtype=torch.float32, pin_memory=device.type == "cuda")
        self.context_lens, self.seq_order = self.dev32[:max_bs], self.dev32[max_bs:2 * max_bs]
        self.block_tables = self.dev32[2 * max_bs:].view(max_bs, max_num_blocks)
        self.temperatures = torch.zeros(max_bs, dtype=torch.float32, device=device)
        self.greedy_temps = torch.zeros(max_bs, dtype=torch.float32, device=device)  # the greedy graphs' zeros
        self.filters = torch.zeros(3, max_bs, dtype=torch.float32, device=device)  # top_k, top_p, min_p per row
        self.seed = torch.randint(2**62, (1,), dtype=torch.int64).to(device)  # the sampling kernel's Philox key
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=device)  # one query per seq
        self.logits = torch.empty(max_bs, vocab_size, dtype=dtype, device=device)
        self.next_tokens = torch.empty(max_bs, dtype=torch.int64, device=device)
        self.device = device
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (bucket, GREEDY/SAMPLE/FILTER) -> graph
        # The same over the tables' first SHORT_CONTEXT tokens, for the buckets in short_buckets.
        self.short_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.short_blocks = SHORT_CONTEXT // block_size
        # (bucket, top width) -> (graph, the outputs it writes)
        self.logprob_graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.logprob_buffers: LogprobsBuffers | None = None  # made by the first step that asks for logprobs
        self.model = model
        self.vocab_size = vocab_size
        self.tp_size, self.rank = get_tp_size(), get_tp_rank()
        self.short_buckets = self._short_buckets(model, device)
        sorts = device.type == "cuda" and not top_k_top_p.supports(dtype)  # float32: filter_logits in the graph
        self.filter_max_bs = filter_max_bs(SORTED_FILTER_MAX_BS if sorts else max_bs)
        if self.tp_size > 1:
            self._init_sharded_head(model, max_bs, vocab_size, dtype, device)
        else:
            self.sample_workspace = sample_workspace(max_bs, vocab_size, device)  # per-chunk bests of each row
            filter_rows = min(max_bs, self.filter_max_bs)  # the CPU filters with filter_logits
            self.filter_workspace = (top_k_top_p.FilterWorkspace.make(filter_rows, vocab_size, device)
                                     if device.type == "cuda" and filter_rows > 0 else None)
        if capture:
            self._capture(model)

    def _init_sharded_head(self, model: nn.Module, max_bs: int, vocab_size: int, dtype: torch.dtype,
                           device: torch.device) -> None:
        """Buffers of the in-graph sampling over this rank's vocabulary slice, and rank 0's seed."""
        head = model.lm_head
        width = head.num_embeddings_per_rank
        self.head_weight, self.vocab_start = head.weight, head.vocab_start
        self.num_valid = min(width, vocab_size - head.vocab_start)  # the last rank's slice ends in padding
        self.local_logits = torch.empty(max_bs, width, dtype=dtype, device=device)
        # (max_bs, 2, chunks of the slice): one chunking for every batch, as the ranks all-gather it whole
        self.sample_workspace = sample_workspace(max_bs, width, device, CHUNK)
        self.gathered = torch.empty(self.tp_size * self.sample_workspace.numel(), device=device)
        dist.broadcast(self.seed, src=0)

    def _short_buckets(self, model: nn.Module, device: torch.device) -> set[int]:
        """The buckets whose decode kernel would split the keys fewer ways over a short table (CUDA, TP 1,
        NANOVLLM_SHORT_DECODE_GRAPHS not 0, max_model_len over SHORT_CONTEXT)."""
        layers = [m for m in model.modules() if hasattr(m, "k_cache")]
        if (device.type != "cuda" or self.tp_size > 1 or not layers or self.short_blocks >= self.max_num_blocks
                or os.environ.get("NANOVLLM_SHORT_DECODE_GRAPHS", "1") == "0"):
            return set()
        splits = lambda bs, blocks: default_num_kv_splits(bs, layers[0].num_kv_heads, blocks * self.block_size,
                                                          device)
        return {bs for bs in self.batch_sizes if splits(bs, self.short_blocks) < splits(bs, self.max_num_blocks)}

    def context(self, bs: int, short: bool = False) -> Context:
        # The host lists serve only the torch attention path, which graphs never run.
        blocks = self.short_blocks if short else self.max_num_blocks
        return Context(q_lens=[1] * bs, context_lens=[], cu_seqlens_q=self.cu_seqlens_q[:bs + 1],
                       context_lens_t=self.context_lens[:bs], slot_mapping=self.slot_mapping[:bs],
                       block_tables=self.block_tables[:bs, :blocks], max_q_len=1,
                       max_context_len=blocks * self.block_size, is_decode=True, seq_order=self.seq_order[:bs])

    def _forward(self, model: nn.Module, bs: int, mode: int) -> None:
        """What a graph holds: the model, the head and the sampler (under TP, their sharded form; no FILTER)."""
        # The ids the replay before sampled, where the host had placeholders (see replay).
        (feed_back if self.input_ids.is_cuda else feed_back_ref)(self.input_ids[:bs], self.next_tokens)
        hidden = model(self.input_ids[:bs], self.positions[:bs])  # (bs, hidden)
        if self.tp_size == 1:
            return self._head(model, hidden, bs, mode)
        local = torch.mm(hidden, self.head_weight.t(), out=self.local_logits[:bs])  # (bs, vocab / tp)
        temps = self.temperatures[:bs] if mode else self.greedy_temps[:bs]
        workspace = self.sample_workspace[:bs]  # (bs, 2, chunks)
        chunk_bests(local[:, :self.num_valid], temps, self.seed, workspace, self.vocab_start,
                    keys=self._keys(bs) if mode else None)
        gathered = all_gather(workspace, self.gathered[:self.tp_size * workspace.numel()].view(
            self.tp_size, *workspace.shape))  # (tp, bs, 2, chunks): a few KB, not the logits
        pick_bests(gathered, self.next_tokens[:bs], self._host_out())
        self._ids_to_ring(bs)
        if mode:
            self.seed.add_(1)

    def _host_out(self) -> HostOut | None:
        """Where rank 0's sampler also writes the ids (on CUDA: in its kernel)."""
        return HostOut(self.ring, self.ring_slot) if self.rank == 0 and self.ring.is_pinned() else None

    def _ids_to_ring(self, bs: int) -> None:
        """Off CUDA (uncaptured graphs on CPU) rank 0 copies the ids to the ring eagerly, as the kernel would."""
        if self.rank == 0 and not self.next_tokens.is_cuda:
            self.ring[int(self.ring_slot)][:bs] = self.next_tokens[:bs]

    def _head(self, model: nn.Module, hidden: torch.Tensor, bs: int, mode: int) -> None:
        logits = model.compute_logits(hidden, out=self.logits[:bs])  # (bs, vocab); None on a TP worker
        if logits is None:
            return
        # On CUDA, kernels/sample.py: per-row temperature draws (Gumbel-max in one pass over the logits, then
        # a new seed for the next replay), or at temperature 0 the argmax (ties to the lowest id, as
        # torch.argmax), spread over the SMs, where torch's reduction of one row runs on one, and launched
        # with PDL at small batches (kernels/pdl.py). FILTER first finds each row's top-k / top-p threshold
        # (kernels/top_k_top_p.py), and the draw keeps to it and to min-p (float32 logits: filter_logits
        # first). Elsewhere torch: argmax, or the Sampler's exponential race (same distribution), after
        # filter_logits for FILTER. Seeded rows draw by their own keys, the same numbers on both.
        if mode or logits.is_cuda:  # layers/sampler.draw: what the Sampler's seeded rows run too
            draw(logits, self.temperatures[:bs] if mode else self.greedy_temps[:bs],
                 self._keys(bs) if mode else None, self.filters[:, :bs] if mode == FILTER else None, self.seed,
                 self.next_tokens[:bs], self.sample_workspace, self.filter_workspace, self._host_out())
            if mode:
                self.seed.add_(1)
        else:
            torch.argmax(logits, dim=-1, out=self.next_tokens[:bs])
        self._ids_to_ring(bs)

    def _keys(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """kernels/sample.py's keys: seeded rows draw by their own key at the position they sample."""
        return self.draw_keys[:bs], self.positions[:bs]

    def can_filter(self, n: int) -> bool:
        """A step of n seqs can take its top-k, top-p and min-p in its bucket's FILTER graph."""
        return self.tp_size == 1 and self.bucket[n] <= self.filter_max_bs

    def _modes(self, bs: int) -> tuple[int, ...]:
        """The graphs of bucket bs: a sampling one, a greedy one and, where it can filter, a FILTER one."""
        return (SAMPLE, GREEDY, FILTER) if self.can_filter(bs) else (SAMPLE, GREEDY)

    def _capture(self, model: nn.Module) -> None:
        # Warm-up and capture really run: slot -1 and context 0 keep them away from the KV cache.
        self.slot_mapping.fill_(-1)
        self.context_lens.zero_()
        self.seq_order.copy_(torch.arange(self.max_bs))
        self.pool = None
        for bs in reversed(self.batch_sizes):  # the largest first, so the shared pool is sized once
            self._capture_bucket(model, bs)
        torch.cuda.synchronize()

    def _capture_bucket(self, model: nn.Module, bs: int) -> None:
        """Bucket bs's graphs, one a mode, and its short ones where it has them, in the shared pool (the
        first capture makes it)."""
        for mode in self._modes(bs):
            self.graphs[bs, mode] = self._capture_one(model, bs, mode)
            self.pool = self.graphs[bs, mode].pool()
            if bs in self.short_buckets:
                self.short_graphs[bs, mode] = self._capture_one(model, bs, mode, short=True)

    def _capture_one(self, model: nn.Module, bs: int, mode: int, short: bool = False) -> torch.cuda.CUDAGraph:
        """One bucket's graph (over the short tables: short), in the graphs' shared memory pool."""
        set_context(self.context(bs, short))
        try:
            self._forward(model, bs, mode)  # compiles, picks cuBLAS algorithms outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, self.pool):
                self._forward(model, bs, mode)
        finally:
            reset_context()
        return graph

    def set_static_step(self, bs: int, context_len: int, num_blocks: int) -> None:
        """Static inputs of a step that times the graphs, not one of the engine's: bs seqs of context_len
        keys each over distinct cache blocks (block ids wrap at num_blocks), storing nothing (slot -1)."""
        self.context_lens[:bs], self.positions[:bs], self.slot_mapping[:bs] = context_len, context_len - 1, -1
        self.seq_order[:bs] = torch.arange(bs, device=self.device)
        width = self.max_num_blocks
        self.block_tables[:bs] = torch.arange(bs * width, device=self.device).view(bs, width) % num_blocks

    @torch.inference_mode()
    def tune_step(self, model: nn.Module, bs: int, context_len: int, num_blocks: int) -> dict:
        """Tunes the projections of the step of bs seqs by the step's own time (fused_attention_output.
        tune_in_step: what the tuner chose timing each alone is where it starts), with bs seqs of
        context_len keys over distinct cache blocks (nothing is stored: slot -1), then captures the bs
        graphs again with the choices. Returns them."""
        from nanovllm.kernels.fused_attention_output import tune_in_step
        self.set_static_step(bs, context_len, num_blocks)
        stream = torch.cuda.Stream(self.device)

        def step_us() -> float:  # the step at context_len runs the short graph where there is one
            set_context(self.context(bs, short=bs in self.short_buckets))
            try:
                self._forward(model, bs, GREEDY)  # compiles a new tiling outside the capture
                graph = capture_behind(lambda: self._forward(model, bs, GREEDY), stream, pool=self.pool)
            finally:
                reset_context()
            return replay_us(graph, reps=20, rounds=5)

        choices = tune_in_step(self.device, step_us, m=bs)
        self.context_lens.zero_()
        self.block_tables.zero_()
        self._capture_bucket(model, bs)  # the bs graphs with the choices (other buckets: other M)
        torch.cuda.synchronize()
        return choices

    def replay(self, seqs: list[Sequence], temperatures: list[float] | None = None,
               prev_ids: torch.Tensor | None = None, src_rows: list[int] | None = None,
               logits: bool = False, filters: list[tuple[float, float, float]] | None = None,
               keys: list[int] | None = None) -> RingIds:
        """Runs one decode step of seqs (each computes its token at num_computed_tokens), sampling in the
        graph at these per-seq temperatures (0: greedy) or, without them, taking the argmax. With filters,
        each seq's (top_k, top_p, min_p) (off: vocab size or more, 1, 0; can_filter(len(seqs)) must hold), the
        bucket's FILTER graph samples at the temperatures from what they keep. keys: each seq's own Philox
        key (-1: none; layers/sampler.seed_key), by which a seeded row draws at its position. The results
        are in next_tokens[:len(seqs)], and in logits[:len(seqs)] with logits=True (or at tp = 1, always).
        No host sync.

        With prev_ids (the previous step's sampled ids on the device, async scheduling), seq i's input id is
        prev_ids[src_rows[i]]: the host only has a placeholder for it. Where the previous step was a replay
        that sampled in its graph, prev_ids are next_tokens and the graph gathers them itself (feed_back).
        Returns where the ids land in pinned memory (the greedy argmax when logits=True)."""
        n, block_size = len(seqs), self.block_size
        bs = self.bucket[n]
        host = self.host[self.num_replays % len(self.host)]
        ring = RingIds(self, self.num_replays, n)
        self.num_replays += 1
        ids, positions, slots, ring_row, draw_keys = host.np64
        ring_row[0] = ring.slot
        draw_keys[:n] = -1 if keys is None else keys
        draw_keys[n:bs] = -1
        pos = [seq.num_computed_tokens for seq in seqs]
        fed_in_graph = prev_ids is not None and prev_ids.data_ptr() == self.next_tokens.data_ptr()
        if prev_ids is None:
            ids[:n] = [seq.token_ids[p] for seq, p in zip(seqs, pos)]
        else:  # the ids row carries the source rows, resolved on the device; padding reads id 0
            ids[:n] = [-1 - row for row in src_rows] if fed_in_graph else src_rows
            ids[n:bs] = 0
        positions[:n] = pos
        slots[:n] = [seq.block_table[p // block_size] * block_size + p % block_size for seq, p in zip(seqs, pos)]
        slots[n:bs] = -1
        context_lens = host.np32[:self.max_bs]
        context_lens[:n] = positions[:n] + 1
        context_lens[n:bs] = 0
        host.np32[self.max_bs:self.max_bs + bs] = longest_first(context_lens[:bs])
        self._write_block_tables(host, seqs)
        self.dev64.copy_(host.int64, non_blocking=True)
        used = self._int32_used(bs)
        self.dev32[:used].copy_(host.int32[:used], non_blocking=True)
        if prev_ids is not None and not fed_in_graph:  # sampled elsewhere (the full Sampler, an eager step)
            self.input_ids[:n] = prev_ids[self.input_ids[:n]]  # (n,) gathered before the replay overwrites them
        if temperatures is not None:
            host.temps.numpy()[:n] = temperatures
            host.temps.numpy()[n:bs] = 0
            self.temperatures.copy_(host.temps, non_blocking=True)
        if filters is not None:
            host.filters.numpy()[:, :n] = list(zip(*filters))
            host.filters.numpy()[:, n:bs] = [[self.vocab_size], [1.0], [0.0]]
            self.filters.copy_(host.filters, non_blocking=True)
        mode = FILTER if filters is not None else SAMPLE if temperatures is not None else GREEDY
        if self.tp_size > 1:
            send_decode(bs, mode, logits)
            broadcast_decode_inputs(self.dev64, self.dev32[:used], *[self.temperatures[:bs]] * bool(mode))
        short = bs in self.short_buckets and context_lens[:n].max() <= self.short_blocks * block_size
        self._replay(bs, mode, logits, short)
        return ring

    def logprobs(self, ring: RingIds, k: int) -> tuple[torch.Tensor, ...]:
        """After the replay that returned ring, at TP 1: the logprob and rank of each id it sampled, and each
        row's top k (<= 20) logprobs and ids, from its logits (kernels/logprobs.py), by the bucket's logprobs
        graph of the narrowest top width that holds k, which also writes them into ring's row of
        logprob_ring (RingIds.logprobs reads them there). That graph is captured the first time a step asks
        for it (a one-off sync), so engines whose requests never ask pay nothing. As logprobs_ref returns
        them; on CUDA views of buffers the next such replay overwrites. (logprob, rank, top ids, top
        logprobs)."""
        n = ring.n
        bs, width = self.bucket[n], top_width(k)
        ring.width = width
        if not self.graphs:  # uncaptured (CPU tests of the graphs' code path): the Sampler's own, packed eagerly
            out = logprobs_ref(self.logits[:n], self.next_tokens[:n], width)
            pack_ref(*out, self.logprob_ring[ring.slot])
            return out
        if self.logprob_buffers is None:
            self.logprob_buffers = LogprobsBuffers.make(self.max_bs, self.vocab_size, self.device)
        if (bs, width) not in self.logprob_graphs:
            args = (self.logits[:bs], self.next_tokens[:bs], width, self.logprob_buffers,
                    HostOut(self.logprob_ring, self.ring_slot))
            views = logprobs(*args)  # compiles outside the capture; where every replay writes (bs rows)
            # A pool of its own that stays empty (the kernels allocate nothing); thread_local: the serving
            # thread's capture is not spoiled by other threads.
            graph = capture_behind(lambda: logprobs(*args), torch.cuda.Stream(self.device),
                                   capture_error_mode="thread_local")
            self.logprob_graphs[bs, width] = graph, views
        graph, views = self.logprob_graphs[bs, width]
        graph.replay()
        return tuple(t[:n] for t in views)

    def follow(self, bs: int, mode: int, gather_logits: int) -> None:
        """A TP worker's side of rank 0's replay (after its DECODE header): the same inputs, the same graph,
        and its share of the logits' gather when rank 0 asks for them."""
        used = self._int32_used(bs)
        broadcast_decode_inputs(self.dev64, self.dev32[:used], *[self.temperatures[:bs]] * bool(mode))
        self._replay(bs, mode, bool(gather_logits))

    def _int32_used(self, bs: int) -> int:
        """How much of dev32 a replay of bucket bs reads: context_lens, seq_order, bs block tables."""
        return 2 * self.max_bs + bs * self.max_num_blocks

    def _replay(self, bs: int, mode: int, gather_logits: bool = False, short: bool = False) -> None:
        if self.graphs:
            (self.short_graphs if short else self.graphs)[bs, mode].replay()
        else:  # not captured (tests of the padding and the TP protocol on CPU): run the same step eagerly
            set_context(self.context(bs, short))
            try:
                self._forward(self.model, bs, mode)
            finally:
                reset_context()
        if gather_logits and self.tp_size > 1:  # the full Sampler's input: every rank sends its slice
            logits = gather_to_first(self.local_logits[:bs])  # (bs, padded vocab) on rank 0, else None
            if logits is not None:
                self.logits[:bs].copy_(logits[:, :self.vocab_size])

    @staticmethod
    def _write_block_tables(host: _PinnedInputs, seqs: list[Sequence]) -> None:
        # A row is rewritten only when its table changed (a new block, another seq, a prefix-cache swap):
        # comparing Python lists costs far less than converting them. Entries past a row's table are never
        # read (context_lens bounds the kernel).
        row_tables, np_tables = host.row_tables, host.np_tables
        for i, seq in enumerate(seqs):
            table = seq.block_table
            if row_tables[i] != table:
                np_tables[i, :len(table)] = table
                row_tables[i] = list(table)
