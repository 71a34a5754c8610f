"""Turns a batch of next-token logits into tokens, with vLLM's sampling semantics.

Order: repetition penalty (prompt + output), frequency/presence penalties (output), min_tokens masking,
temperature, top-k, top-p, min-p, then greedy argmax or an exponential race. Logprobs are of the raw model
distribution, as vLLM's default.

A row with a request seed draws by the sampling kernel's Philox numbers, keyed by its seed and the position
it samples at (kernels/sample.py), never by a generator that carries state from step to step. So its numbers do
not depend on the batch, on preemption, or on whether a decode graph or this Sampler drew them (its tokens
then depend only on its logits, which on a GPU a batch of another size may round otherwise): a seeded row
with nothing to do before its filters (no penalties, no pending min_tokens) takes `draw`, what the decode
graphs run, on its raw logits; the others draw by the same numbers from their processed logits.
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nanovllm.engine.sequence import PLACEHOLDER
from nanovllm.kernels import penalties, top_k_top_p
from nanovllm.kernels.sample import Keep, sample, sample_ref


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling state on the device. Optional tensors are None when no row needs that step."""
    temperatures: Tensor  # (B,) float32; 1.0 on greedy rows so one division serves all
    greedy: Tensor  # (B,) bool
    all_greedy: bool
    any_unseeded: bool  # some random row has no seed: it draws from torch's default generator
    raw_draw: "SeededDraw | None" = None  # seeded rows drawn from the raw logits, as the decode graphs draw
    processed_draw: "SeededDraw | None" = None  # seeded rows with penalties or a pending min_tokens
    top_ks: Tensor | None = None  # (B,) int64; vocab_size where off
    max_top_k: int | None = None  # the largest top_k asked, known on the host (no device read to find it)
    top_ps: Tensor | None = None  # (B,) float32
    min_ps: Tensor | None = None  # (B,) float32
    repetition_penalties: Tensor | None = None  # (B,) float32
    seen_ids: Tensor | None = None  # (B, L) int64 prompt + output ids, padded with vocab_size
    frequency_penalties: Tensor | None = None  # (B,) float32
    presence_penalties: Tensor | None = None  # (B,) float32
    output_ids: Tensor | None = None  # (B, L) int64 output ids, padded with vocab_size
    min_tokens_mask: tuple[Tensor, Tensor] | None = None  # (rows, token ids) to set to -inf
    max_num_logprobs: int | None = None  # top-k logprobs to return; None: no logprobs at all

    @classmethod
    def build(cls, seqs: list, device: torch.device | str, vocab_size: int, eos_token_ids: list[int] = (),
              history: tuple[Tensor, list[int | None]] | None = None) -> "SamplingBatch":
        """`vocab_size` must be the logits' width: it pads the id tensors and means "top-k off". history
        (async scheduling: a step launched before the previous one's ids are back) is (ids on the device, each
        seq's row in them or None): a seq whose last token is still a PLACEHOLDER takes its id from there, on
        the device, for the penalties."""
        params = [seq.sampling_params for seq in seqs]

        def tensor(values, dtype=torch.float32) -> Tensor:
            # non_blocking: a blocking copy would wait for every kernel queued before it, among them the
            # step an async-scheduled engine has in flight.
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        greedy = [p.greedy for p in params]
        seeded = [i for i, s in enumerate(seqs) if not greedy[i] and params[i].seed is not None]
        batch = cls(temperatures=tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
                    greedy=tensor(greedy, torch.bool), all_greedy=all(greedy),
                    any_unseeded=len(seeded) < greedy.count(False))
        if processed := [i for i in seeded if changes_logits(seqs[i])]:
            batch.processed_draw = SeededDraw.build([seqs[i] for i in processed], processed, device, vocab_size,
                                                    filters=False)
        if raw := [i for i in seeded if not changes_logits(seqs[i])]:
            batch.raw_draw = SeededDraw.build([seqs[i] for i in raw], raw, device, vocab_size, filters=True)
        if any(p.top_k > 0 for p in params):
            batch.top_ks = tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64)
            batch.max_top_k = max(p.top_k for p in params if p.top_k > 0)
        if any(p.top_p < 1 for p in params):
            batch.top_ps = tensor([p.top_p for p in params])
        if any(p.min_p > 0 for p in params):
            batch.min_ps = tensor([p.min_p for p in params])
        if any(p.repetition_penalty != 1 for p in params):
            batch.repetition_penalties = tensor([p.repetition_penalty for p in params])
            seen = [s.token_ids if p.repetition_penalty != 1 else [] for s, p in zip(seqs, params)]
            batch.seen_ids = _pad(seen, vocab_size, device, history)
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            batch.frequency_penalties = tensor([p.frequency_penalty for p in params])
            batch.presence_penalties = tensor([p.presence_penalty for p in params])
            outputs = [s.completion_token_ids if p.frequency_penalty or p.presence_penalty else []
                       for s, p in zip(seqs, params)]
            batch.output_ids = _pad(outputs, vocab_size, device, history)
        batch.min_tokens_mask = _min_tokens_mask(seqs, eos_token_ids, vocab_size, device)
        requested = [p.logprobs for p in params if p.logprobs is not None]
        batch.max_num_logprobs = max(requested) if requested else None
        return batch

    @property
    def needs_processing(self) -> bool:
        """Some row takes more than an argmax of the raw logits or `draw`."""
        return (self.any_unseeded or self.processed_draw is not None or self.seen_ids is not None
                or self.output_ids is not None or self.min_tokens_mask is not None)


def seed_key(seq) -> int:
    """A seeded seq's Philox key: its request's seed plus its index among the request's n completions, so
    that they differ, in [0, 2^63); -1 without a seed."""
    seed = seq.sampling_params.seed
    return -1 if seed is None else (seed + seq.index) % 2**63


def reads_history(seq) -> bool:
    """Sampling seq reads its token ids (penalties), the last one perhaps still in flight."""
    p = seq.sampling_params
    return p.repetition_penalty != 1 or bool(p.frequency_penalty or p.presence_penalty)


def changes_logits(seq) -> bool:
    """seq's logits change before its filters: penalties, or a min_tokens still to reach. Such a row takes the
    Sampler in every step (model_runner.needs_sampler), so a seeded one draws the same way in all of them."""
    return reads_history(seq) or seq.num_completion_tokens < seq.sampling_params.min_tokens


@dataclass(slots=True)
class SeededDraw:
    """Seeded rows of a batch, drawn by their own Philox key at their position (kernels/sample.py)."""
    rows: Tensor  # (S,) int64: where they are in the batch
    keys: tuple[Tensor, Tensor]  # (S,) int64 each: the key, the position sampled at
    temperatures: Tensor  # (S,) float32
    filters: Tensor | None  # (3, S) float32 top_k (vocab size: off), top_p, min_p; None: no row filters

    @classmethod
    def build(cls, seqs: list, rows: list[int], device, vocab_size: int, filters: bool) -> "SeededDraw":
        """filters=False: rows of processed logits, already divided by their temperatures and filtered."""
        params, n = [seq.sampling_params for seq in seqs], len(seqs)
        filtered = filters and any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params)
        # Rows of 4k entries: every row starts 16-byte aligned, as the graphs' buffers do, so the kernels
        # run the variants the graphs compiled (Triton specializes on pointer alignment).
        ints, floats = np.zeros((3, -(-n // 4) * 4), dtype=np.int64), np.zeros((4, -(-n // 4) * 4), dtype=np.float32)
        ints[:, :n] = rows, [seed_key(seq) for seq in seqs], [len(seq.token_ids) - 1 for seq in seqs]
        floats[:, :n] = ([p.temperature if filters else 1.0 for p in params],
                         [p.top_k if p.top_k > 0 else vocab_size for p in params], [p.top_p for p in params],
                         [p.min_p for p in params])
        ints = torch.from_numpy(ints).to(device, non_blocking=True)[:, :n]
        floats = torch.from_numpy(floats).to(device, non_blocking=True)[:, :n]
        return cls(ints[0], (ints[1], ints[2]), floats[0], floats[1:] if filtered else None)

    def __call__(self, logits: Tensor) -> Tensor:
        """The rows' tokens (S,) from the batch's logits (B, V)."""
        return draw(logits[self.rows], self.temperatures, self.keys, self.filters)


def draw(logits: Tensor, temperatures: Tensor, keys: tuple[Tensor, Tensor] | None = None,
         filters: Tensor | None = None, seed: Tensor | None = None, out: Tensor | None = None,
         workspace: Tensor | None = None, filter_workspace: "top_k_top_p.FilterWorkspace | None" = None,
         host_out=None) -> Tensor:
    """What a decode graph samples (engine/cuda_graph.py), and the Sampler's seeded rows: logits (B, V) raw in
    the model dtype, temperatures (B,) float32 (0: the argmax), keys as kernels/sample.sample's, filters (3,
    B) float32 (top_k, top_p, min_p; off: >= V, 1, 0), seed (1,) int64 the key of rows without one of their
    own. On CUDA the sampling kernels, top-k and top-p by kernels/top_k_top_p.py's thresholds where the
    logits are 16-bit; elsewhere filter_logits and sample_ref. Workspaces, out and host_out: where a CUDA
    graph's replays keep them (allocated here when None). Returns out (B,) int64."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device) if out is None else out
    keep = None
    if filters is not None:
        top_k, top_p, min_p = filters
        if logits.is_cuda and top_k_top_p.supports(logits.dtype):
            ws = filter_workspace or top_k_top_p.FilterWorkspace.make(rows, vocab, logits.device)
            ws = top_k_top_p.thresholds(logits, temperatures, top_k, top_p, ws)
            keep = Keep(ws.keep, ws.row_max, min_p, ws.hist)
        else:  # the filtered logits, divided by the temperatures
            # The draw's new temperatures come first: a PDL kernel reads them before its wait, so they must
            # not come from the kernel just before it (kernels/pdl.py).
            temperatures, divided = (temperatures > 0).float(), temperatures
            logits = filter_logits(logits, divided, top_k, top_p, min_p)
    if not logits.is_cuda:
        return sample_ref(logits, temperatures, out, keys)
    seed = _unused_seed(logits.device) if seed is None else seed
    return sample(logits, temperatures, seed, out, workspace, host_out, keep, keys)


@functools.cache
def _unused_seed(device: torch.device) -> Tensor:
    """A seed for draws whose rows all have their own keys, made once: a kernel writing it just before the
    draw would race the draw's read of it before its PDL wait (kernels/pdl.py)."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def _pad(rows: list[list[int]], pad_id: int, device, history: tuple[Tensor, list[int | None]] | None = None) -> Tensor:
    """rows as one (B, L) tensor padded with pad_id; a PLACEHOLDER (a row's last id, not back yet) takes its id
    from history (see SamplingBatch.build) on the device."""
    out = np.full((len(rows), max(1, max(map(len, rows)))), pad_id, dtype=np.int64)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = ids
    holes = [(i, len(ids) - 1) for i, ids in enumerate(rows) if ids and ids[-1] == PLACEHOLDER]
    if not holes:
        return torch.from_numpy(out).to(device, non_blocking=True)
    rows_, cols = zip(*holes)
    if history is None or any(history[1][i] is None for i in rows_):
        raise ValueError("a placeholder id with no step in flight to take it from")
    ids, sources = history
    out[rows_, cols] = pad_id
    padded = torch.from_numpy(out).to(device, non_blocking=True)
    where = torch.tensor([rows_, cols, [sources[i] for i in rows_]], dtype=torch.int64).to(device, non_blocking=True)
    padded[where[0], where[1]] = ids[where[2]]
    return padded


def _min_tokens_mask(seqs: list, eos_token_ids: list[int], vocab_size: int,
                     device) -> tuple[Tensor, Tensor] | None:
    """(row, token) pairs of the ids that would stop a sequence that has not reached min_tokens yet."""
    rows, ids = [], []
    for i, seq in enumerate(seqs):
        p = seq.sampling_params
        if seq.num_completion_tokens < p.min_tokens:
            # With ignore_eos EOS does not stop the sequence, so it needs no masking (as in vLLM).
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            stop_ids = sorted(t for t in stop_ids if t < vocab_size)  # a larger id can never be sampled
            rows += [i] * len(stop_ids)
            ids += stop_ids
    if not rows:
        return None
    return (torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True),
            torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True))


@dataclass(slots=True)
class SamplerOutput:
    token_ids: Tensor  # (B,) int64
    logprobs: Tensor | None = None  # (B,) float32 logprob of each token in token_ids
    ranks: Tensor | None = None  # (B,) int64 rank of each token in token_ids, 1 = most likely
    top_ids: Tensor | None = None  # (B, k) int64, most likely first
    top_logprobs: Tensor | None = None  # (B, k) float32


class Sampler:

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: (B, V) raw model logits, in the model dtype. Does not modify them."""
        if batch.needs_processing:
            processed = self.process_logits(logits.to(torch.float32, copy=True), batch, raw=logits)
            token_ids = self.sample(processed, batch)
        else:  # greedy rows, and seeded rows that draw below
            token_ids = logits.argmax(dim=-1)
        if batch.raw_draw is not None:
            token_ids[batch.raw_draw.rows] = batch.raw_draw(logits)
        if batch.max_num_logprobs is None:
            return SamplerOutput(token_ids)
        return gather_logprobs(logits, token_ids, batch.max_num_logprobs)

    @staticmethod
    def process_logits(logits: Tensor, batch: SamplingBatch, raw: Tensor | None = None) -> Tensor:
        """Applies penalties, min_tokens, temperature, top-k, top-p and min-p, in place where possible. raw:
        the logits before the float32 copy, if the caller has them (the penalties kernel reads them)."""
        logits = apply_penalties(logits, batch, raw)
        if batch.min_tokens_mask is not None:
            logits[batch.min_tokens_mask] = -float("inf")
        if batch.all_greedy:
            return logits  # the filters below never change the argmax
        logits.div_(batch.temperatures[:, None])
        logits = apply_top_k_top_p(logits, batch.top_ks, batch.top_ps, batch.max_top_k)
        if batch.min_ps is not None:
            logits = apply_min_p(logits, batch.min_ps)
        return logits

    @staticmethod
    def sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
        """logits: (B, V) processed. Greedy rows take the argmax (ties: lowest id), unseeded rows race, seeded
        rows with penalties or a min_tokens draw by their keys (the raw ones are left to the caller)."""
        token_ids = logits.argmax(dim=-1)  # (B,)
        if batch.any_unseeded:
            # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks i with probability p_i.
            probs = logits.softmax(dim=-1)  # (B, V)
            q = torch.empty_like(probs).exponential_()
            # Exp(1) can return 0; a floor keeps masked tokens at 0 / q = 0 instead of NaN.
            random_ids = probs.div_(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)
            token_ids = torch.where(batch.greedy, token_ids, random_ids)
        if batch.processed_draw is not None:
            token_ids[batch.processed_draw.rows] = batch.processed_draw(logits)
        return token_ids


def apply_penalties(logits: Tensor, batch: SamplingBatch, raw: Tensor | None = None) -> Tensor:
    """Repetition penalty (HF: divide positive logits, multiply negative ones) over prompt + output tokens;
    frequency and presence penalties (OpenAI: subtract per occurrence / once) over output tokens. On CUDA,
    with raw (logits' values in the model dtype), one kernel launch (kernels/penalties.py), the same bits."""
    if raw is not None and logits.is_cuda and penalties.triton is not None:
        return penalties.apply_penalties(logits, raw, batch.seen_ids, batch.repetition_penalties, batch.output_ids,
                                         batch.frequency_penalties, batch.presence_penalties)
    B, V = logits.shape
    if batch.seen_ids is not None:
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen = seen.scatter_(1, batch.seen_ids, True)[:, :V]  # (B, V); column V takes the padding
        penalty = batch.repetition_penalties[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if batch.output_ids is not None:
        counts = torch.zeros(B, V + 1, device=logits.device)
        counts = counts.scatter_add_(1, batch.output_ids, torch.ones_like(counts))[:, :V]  # (B, V)
        logits = (logits - batch.frequency_penalties[:, None] * counts
                  - batch.presence_penalties[:, None] * (counts > 0))
    return logits


def apply_top_k_top_p(logits: Tensor, k: Tensor | None, p: Tensor | None, max_k: int | None = None) -> Tensor:
    """Masks to -inf what top-k (ties at the k-th value kept) and top-p (smallest set whose mass reaches p)
    remove, with the same tie rules as transformers' TopKLogitsWarper and TopPLogitsWarper. max_k: the
    largest k below the vocabulary size, if the caller knows it (else it is read from the device)."""
    if p is None:
        return logits if k is None else _apply_top_k_only(logits, k, max_k)
    V = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending, (B, V)
    if k is not None:
        kth_value = sorted_logits.gather(1, (V - k)[:, None].clamp(0, V - 1))  # (B, 1)
        sorted_logits.masked_fill_(sorted_logits < kth_value, -float("inf"))
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop = cum_probs <= 1 - p[:, None]
    drop[:, -1] = False  # always keep the most likely token
    sorted_logits.masked_fill_(drop, -float("inf"))
    return logits.scatter_(1, order, sorted_logits)


def _apply_top_k_only(logits: Tensor, k: Tensor, max_k: int | None = None) -> Tensor:
    # topk over the largest k asked is much cheaper than a full sort of the vocabulary.
    V = logits.shape[1]
    off = k >= V
    k = k.masked_fill(off, 1)
    max_k = int(k.max()) if max_k is None else min(max_k, V)
    top_values = logits.topk(max_k, dim=-1).values  # (B, max_k), descending
    kth_value = top_values.gather(1, (k - 1)[:, None]).masked_fill_(off[:, None], -float("inf"))  # (B, 1)
    return logits.masked_fill_(logits < kth_value, -float("inf"))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drops tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)  # (B, V)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    return logits.masked_fill_(probs < threshold, -float("inf"))


def filter_logits(logits: Tensor, temperatures: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Sampler.process_logits' temperature, top-k, top-p and min-p for every row at once, with fixed shapes and
    no read on the host: the reference of the FILTER graphs' kernels (kernels/top_k_top_p.py), and what
    those graphs run off CUDA or on float32 logits. logits (B, V) raw, in any float dtype; temperatures (B,)
    float32 (0: a greedy row, left undivided); top_k (B,) in any dtype (>= V: off), top_p (B,) (1: off) and
    min_p (B,) (0: off). Returns the processed logits, (B, V) float32.

    The masks are apply_top_k_top_p's and apply_min_p's but for ties: every filter keeps or drops tokens of
    equal logits together (top-p keeps a value when the mass of the larger ones is below p), where the eager
    path's sort may split them at a boundary. Dividing by a positive temperature keeps the order, so one
    sort of the raw logits serves all three."""
    V = logits.shape[1]
    sorted_raw, order = logits.sort(dim=-1)  # ascending, (B, V)
    sorted_logits = sorted_raw.float() / torch.where(temperatures > 0, temperatures, 1.0)[:, None]
    kth_value = sorted_logits.gather(1, (V - top_k.long())[:, None].clamp(0, V - 1))  # (B, 1)
    sorted_logits.masked_fill_(sorted_logits < kth_value, -float("inf"))
    drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p[:, None]  # (B, V)
    drop[:, -1] = False  # always keep the most likely token
    lowest_kept = sorted_logits.masked_fill(drop, float("inf")).amin(dim=-1, keepdim=True)  # (B, 1)
    sorted_logits.masked_fill_(sorted_logits < lowest_kept, -float("inf"))  # its ties stay
    probs = sorted_logits.softmax(dim=-1)  # the last column is the most likely token's
    sorted_logits.masked_fill_(probs < min_p[:, None] * probs[:, -1:], -float("inf"))
    return torch.empty_like(sorted_logits).scatter_(1, order, sorted_logits)


def gather_logprobs(logits: Tensor, token_ids: Tensor, k: int) -> SamplerOutput:
    """logits: (N, V) raw; token_ids: (N,). Logprobs and ranks of token_ids, plus the top-k per row. Ranks and
    top lists compare the raw logits, which order as the logprobs do, where log_softmax's rounding can make
    two neighbours equal (as kernels/logprobs.py, which the decode graphs run)."""
    logits = logits.float()
    logprobs = logits.log_softmax(dim=-1)  # (N, V)
    ranks = (logits > logits.gather(1, token_ids[:, None])).sum(dim=-1) + 1  # (N,)
    top_ids = logits.topk(k, dim=-1).indices  # (N, k)
    return SamplerOutput(token_ids, logprobs.gather(1, token_ids[:, None]).squeeze(1), ranks, top_ids,
                         logprobs.gather(1, top_ids))


def compute_prompt_logprobs(logits: Tensor, target_ids: Tensor, k: int,
                            chunk_size: int = 1024) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits: (N, V) at prompt positions 0..N-1; target_ids: (N,) the prompt tokens 1..N they predict.
    Returns logprobs (N,) and ranks (N,) of the targets, top_ids (N, k) and top_logprobs (N, k).
    Works in chunks of rows so a long prompt never holds a second (N, V) float32 copy."""
    parts = [gather_logprobs(logits[i:i + chunk_size], target_ids[i:i + chunk_size], k)
             for i in range(0, max(logits.shape[0], 1), chunk_size)]  # one empty part when N = 0
    return tuple(torch.cat([getattr(p, name) for p in parts])
                 for name in ("logprobs", "ranks", "top_ids", "top_logprobs"))
