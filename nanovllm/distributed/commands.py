"""Rank 0 tells the workers what to run, with torch.distributed broadcasts from rank 0.

Each command is a small int64 header [command, size, size, size], then its payload: the step's inputs for
FORWARD, the hidden rows for LOGITS, the CUDA-graph input buffers for DECODE. Workers run the same call
as rank 0 with the same inputs, so their collectives (the all-reduces of the layers, the LM head's gather)
meet rank 0's. Tensors only, no pickles: on CUDA these are NCCL broadcasts between GPUs.
"""
import torch
import torch.distributed as dist

from nanovllm.utils.context import Context

EXIT, ALLOCATE, FORWARD, LOGITS, DECODE = range(5)
_HEADER_LEN = 4


def _send_header(command: int, *sizes: int, device: torch.device) -> None:
    header = torch.tensor([command, *sizes] + [0] * (_HEADER_LEN - 1 - len(sizes)), dtype=torch.int64,
                          pin_memory=device.type == "cuda")
    # Not a blocking copy: that would wait for every kernel queued before it, among them the step an
    # async-scheduled engine has in flight. The pinned block is reused only after the copy (torch's host
    # allocator records it on the stream).
    dist.broadcast(header.to(device, non_blocking=True), src=0)


def recv_header(device: torch.device) -> list[int]:
    """[command, size, size, size], as rank 0 sent it."""
    header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    return header.tolist()


def send_exit(device: torch.device) -> None:
    _send_header(EXIT, device=device)


def send_allocate(max_model_len: int, device: torch.device) -> None:
    _send_header(ALLOCATE, max_model_len, device=device)


def send_forward(input_ids: torch.Tensor, positions: torch.Tensor, context: Context) -> None:
    """One payload: input_ids, positions, slot_mapping (T each), q_lens, context_lens (B each), block_tables."""
    (num_seqs, width), device = context.block_tables.shape, input_ids.device
    _send_header(FORWARD, input_ids.numel(), num_seqs, width, device=device)
    lens = torch.tensor(context.q_lens + context.context_lens, dtype=torch.int64).to(device, non_blocking=True)
    payload = torch.cat([input_ids, positions, context.slot_mapping, lens, context.block_tables.flatten().long()])
    dist.broadcast(payload, src=0)


def recv_forward(sizes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Context]:
    """(input_ids, positions, Context) of the FORWARD whose header sizes are given."""
    num_tokens, num_seqs, width = sizes
    payload = torch.empty(3 * num_tokens + 2 * num_seqs + num_seqs * width, dtype=torch.int64, device=device)
    dist.broadcast(payload, src=0)
    input_ids, positions, slot_mapping, lens, tables = payload.split(
        [num_tokens, num_tokens, num_tokens, 2 * num_seqs, num_seqs * width])
    q_lens, context_lens = lens[:num_seqs], lens[num_seqs:]
    cu_seqlens_q = torch.zeros(num_seqs + 1, dtype=torch.int32, device=device)
    cu_seqlens_q[1:] = q_lens.cumsum(0)
    q_list, ctx_list = q_lens.tolist(), context_lens.tolist()
    context = Context(
        q_lens=q_list, context_lens=ctx_list, cu_seqlens_q=cu_seqlens_q,
        context_lens_t=context_lens.int(), slot_mapping=slot_mapping,
        block_tables=tables.view(num_seqs, width).int(), max_q_len=max(q_list, default=0),
        max_context_len=max(ctx_list, default=0), is_decode=all(q == 1 for q in q_list))
    return input_ids, positions, context


def send_logits(hidden: torch.Tensor) -> None:
    """hidden (N, hidden_size): the rows whose logits rank 0 is about to compute."""
    _send_header(LOGITS, *hidden.shape, device=hidden.device)
    dist.broadcast(hidden.contiguous(), src=0)


def recv_logits(sizes: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    hidden = torch.empty(sizes[0], sizes[1], dtype=dtype, device=device)  # (N, hidden_size)
    dist.broadcast(hidden, src=0)
    return hidden


def send_decode(bucket: int, sampling: bool, gather_logits: bool, device: torch.device) -> None:
    """Replay the decode graph of this batch-size bucket (the sampling one or the greedy one), then, with
    gather_logits, gather the logits to rank 0; its inputs follow (broadcast_decode_inputs)."""
    _send_header(DECODE, bucket, int(sampling), int(gather_logits), device=device)


def broadcast_decode_inputs(*buffers: torch.Tensor) -> None:
    """The decode graphs' static input buffers (temperatures too for a sampling step), rank 0's into every
    rank's (engine/cuda_graph.py)."""
    for buffer in buffers:
        dist.broadcast(buffer, src=0)
