"""Turns a batch of next-token logits into tokens, with vLLM's sampling semantics.

Order: repetition penalty (prompt + output), frequency/presence penalties (output), min_tokens masking,
temperature, top-k, top-p, min-p, then greedy argmax or an exponential race. Logprobs are of the raw model
distribution, as vLLM's default.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nanovllm.engine.sequence import PLACEHOLDER


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling state on the device. Optional tensors are None when no row needs that step."""
    temperatures: Tensor  # (B,) float32; 1.0 on greedy rows so one division serves all
    greedy: Tensor  # (B,) bool
    all_greedy: bool
    seeded_rows: list[tuple[int, torch.Generator]]  # random rows that draw from their own generator
    any_unseeded: bool  # some random row draws from torch's default generator
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
        seeded = [(i, s.generator) for i, s in enumerate(seqs) if not greedy[i] and s.generator is not None]
        batch = cls(temperatures=tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)]),
                    greedy=tensor(greedy, torch.bool), all_greedy=all(greedy), seeded_rows=seeded,
                    any_unseeded=len(seeded) < greedy.count(False))
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
    def is_plain_greedy(self) -> bool:
        """Nothing to do but an argmax."""
        return (self.all_greedy and self.seen_ids is None and self.output_ids is None
                and self.min_tokens_mask is None)


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
        """logits: (B, V) raw model logits. Does not modify them."""
        if batch.is_plain_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            processed = self.process_logits(logits.to(torch.float32, copy=True), batch)
            token_ids = self.sample(processed, batch)
        if batch.max_num_logprobs is None:
            return SamplerOutput(token_ids)
        return gather_logprobs(logits, token_ids, batch.max_num_logprobs)

    @staticmethod
    def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
        """Applies penalties, min_tokens, temperature, top-k, top-p and min-p, in place where possible."""
        logits = apply_penalties(logits, batch)
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
        """logits: (B, V) processed. Greedy rows take the argmax (ties: lowest id), others race."""
        greedy_ids = logits.argmax(dim=-1)  # (B,)
        if batch.all_greedy:
            return greedy_ids
        # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) picks i with probability p_i, and lets a
        # seeded row draw its q from its own generator, independent of the rest of the batch.
        probs = logits.softmax(dim=-1)  # (B, V)
        q = torch.empty_like(probs)
        if batch.any_unseeded:
            q.exponential_()
        for i, generator in batch.seeded_rows:
            q[i].exponential_(generator=generator)
        # Exp(1) can return 0; a floor keeps masked tokens at 0 / q = 0 instead of NaN.
        random_ids = probs.div_(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)
        return torch.where(batch.greedy, greedy_ids, random_ids)


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition penalty (HF: divide positive logits, multiply negative ones) over prompt + output tokens;
    frequency and presence penalties (OpenAI: subtract per occurrence / once) over output tokens."""
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
