"""Prefill and mixed steps replayed from CUDA graphs: one graph of the model's forward per token bucket.

A step with prompt tokens in it runs eagerly, and launching its 28 layers' kernels from Python can take
longer than the GPU takes to run them: on a slow host the throughput benchmark's 8,192-token prefill steps
spent 19-56 ms launching ~21 ms of kernels (benchmarks/NOTES-gpu.md, session 29). Here such a step's
forward (embedding, layers, final norm; not the LM head or the sampler, which take only the sampled rows)
is captured once per token bucket and replayed.

Every input has a fixed shape: tokens are padded to the bucket (id 0, position 0, slot -1, so a padded token
stores nothing, and no seq owns it: attention leaves its row unwritten, and only padded rows are computed
from it; nothing reads them), seqs to
max_num_seqs (empty seqs: their cu_seqlens repeat the total, context length 0, and the prefill kernel's
program for each exits at once), block tables to max_model_len's block count. The varlen attention kernel
reads all of them from device memory, so one graph serves every mix of prompts, chunks and decodes of up to
its bucket's tokens. Buckets: 256, 512, then every 1,024 up to max_num_batched_tokens or MAX_TOKENS, so
no step pads past the next power of two and the projections' tuned configurations (chosen per power-of-two
M) are those of the eager step. Larger steps run eagerly: from ~8k tokens their kernels take as long as the
host takes to launch them, and more buckets would cost capture time. Only one process (no TP) and steps
without prompt logprobs take them.
"""
import numpy as np
import torch
from torch import nn

from nanovllm.utils.context import Context, cu_seqlens, reset_context, set_context, token_slots

SMALLEST = 256  # the first bucket: smaller steps are padded up to it
MAX_TOKENS = 8192  # the largest bucket; steps of more tokens run eagerly


def token_buckets(max_tokens: int) -> list[int]:
    """256, 512, 1024, 2048, 3072, ... up to max_tokens, which is the last (a bucket of its own if it is not
    a multiple of 1,024)."""
    buckets = [b for b in (SMALLEST, 2 * SMALLEST) if b < max_tokens]
    buckets += range(1024, max_tokens, 1024)
    return [*buckets, max_tokens]


class PrefillGraphs:
    """Captures `model`'s forward for steps of up to max_tokens (at most MAX_TOKENS) tokens and max_seqs
    seqs, and runs a step's forward by replaying its bucket's graph. The inputs are device buffers written by
    host-to-device copies from pageable memory (staged by the driver at once, so the host may reuse its
    arrays while a step is in flight); each bucket's graph writes its hidden states (bucket, hidden_size) to
    its own output tensor, rows [0, T) those of a T-token step."""

    @torch.inference_mode()
    def __init__(self, model: nn.Module, max_tokens: int, max_seqs: int, max_num_blocks: int, block_size: int,
                 device: torch.device, capture: bool = True):
        max_tokens = min(max_tokens, MAX_TOKENS)
        self.buckets = token_buckets(max_tokens)
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.block_size, self.max_num_blocks = block_size, max_num_blocks
        self.dev64 = torch.zeros(3, max_tokens, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.dev64  # (max_tokens,) each
        self.dev32 = torch.zeros(2 * max_seqs + 1 + max_seqs * max_num_blocks, dtype=torch.int32, device=device)
        self.cu_seqlens_q = self.dev32[:max_seqs + 1]
        self.context_lens = self.dev32[max_seqs + 1:2 * max_seqs + 1]
        self.block_tables = self.dev32[2 * max_seqs + 1:].view(max_seqs, max_num_blocks)
        self.slot_mapping.fill_(-1)
        self.model, self.device = model, device
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.host_lists: tuple[list[int], list[int]] = ([], [])  # q_lens, context_lens: the torch path's
        if capture:
            self._capture()

    def fits(self, num_tokens: int, num_seqs: int, max_q_len: int) -> bool:
        """A step of this many tokens and seqs with prompt tokens in it (max_q_len > 1) can replay a graph."""
        return max_q_len > 1 and num_tokens <= self.max_tokens and num_seqs <= self.max_seqs

    def bucket(self, num_tokens: int) -> int:
        return next(b for b in self.buckets if b >= num_tokens)

    def context(self, num_tokens: int) -> Context:
        # max_q_len > 1 sends every layer down the varlen path (RoPE + store kernel, then the prefill kernel),
        # whatever the step's own mix; the host lists serve only the torch path (CPU, uncaptured).
        q_lens, context_lens = self.host_lists
        return Context(q_lens=q_lens, context_lens=context_lens, cu_seqlens_q=self.cu_seqlens_q,
                       context_lens_t=self.context_lens, slot_mapping=self.slot_mapping[:num_tokens],
                       block_tables=self.block_tables, max_q_len=max(num_tokens, 2),
                       max_context_len=self.max_num_blocks * self.block_size, is_decode=False)

    def _forward(self, num_tokens: int) -> torch.Tensor:
        set_context(self.context(num_tokens))
        try:
            return self.model(self.input_ids[:num_tokens], self.positions[:num_tokens])
        finally:
            reset_context()

    def _capture(self) -> None:
        # Warm-up and capture really run: slot -1 and no seqs (context 0) keep them away from the KV cache.
        pool = None
        for num_tokens in reversed(self.buckets):  # the largest first, so the shared pool is sized once
            self._forward(num_tokens)  # compiles, picks cuBLAS algorithms outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.outputs[num_tokens] = self._forward(num_tokens)
            self.graphs[num_tokens], pool = graph, graph.pool()
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()  # the buffers are inference tensors
    def write_inputs(self, input_ids: list[int], positions: list[int], q_lens: list[int],
                     context_lens: list[int], block_tables: list[list[int]]) -> int:
        """Writes a step's inputs into the device buffers, padded to its bucket; returns the bucket. The
        caller may then overwrite input_ids[:T] on the device (async scheduling's placeholders) before run()."""
        num_tokens, num_seqs, max_seqs = len(input_ids), len(q_lens), self.max_seqs
        bucket = self.bucket(num_tokens)
        # int32 [cu_seqlens (empty seqs past the step's repeat the total) | context lengths (0 past the step's)
        # | the step's block tables]: one copy. Rows of the tables past the step's are never read.
        q, ctx = np.asarray(q_lens, dtype=np.int64), np.asarray(context_lens, dtype=np.int64)
        host32 = np.zeros(2 * max_seqs + 1 + num_seqs * self.max_num_blocks, dtype=np.int32)
        host32[:max_seqs + 1] = num_tokens
        host32[:num_seqs + 1] = cu_seqlens(q)
        host32[max_seqs + 1:max_seqs + 1 + num_seqs] = ctx
        tables = host32[2 * max_seqs + 1:].reshape(num_seqs, self.max_num_blocks)
        for row, table in zip(tables, block_tables):
            row[:len(table)] = table
        # int64 [ids; positions; slots], padded: id 0, position 0, slot -1.
        host64 = np.zeros((3, bucket), dtype=np.int64)
        host64[2] = -1
        host64[0, :num_tokens], host64[1, :num_tokens] = input_ids, positions
        host64[2, :num_tokens] = token_slots(tables, q, ctx, self.block_size)
        self.dev32[:host32.size].copy_(torch.from_numpy(host32), non_blocking=True)
        self.dev64[:, :bucket].copy_(torch.from_numpy(host64), non_blocking=True)
        self.host_lists = (list(q_lens), list(context_lens))
        return bucket

    def run(self, bucket: int) -> torch.Tensor:
        """The forward of the step write_inputs wrote: hidden states (bucket, hidden_size), the step's rows
        first. No host sync."""
        if self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket]
        return self._forward(bucket)  # uncaptured (CPU tests of the padding): the same step, eagerly
