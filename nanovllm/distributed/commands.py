"""Rank 0 tells the workers what to run: a header through a pipe, the tensors by broadcast from rank 0.

Each command is an int64 header [command, size, size, size, host data...] sent down every worker's pipe,
then its payload, broadcast: the step's inputs for FORWARD, the hidden rows for LOGITS, the CUDA-graph input
buffers for DECODE. Workers run the same call as rank 0 with the same inputs, so their collectives (the
all-reduces of the layers, the LM head's gather) meet rank 0's.

The header travels on the host so that a worker never waits for its GPU to learn the next command: with
async scheduling rank 0 sends step N+1 while step N runs, and the worker queues step N+1 behind step N at
once. (Broadcast over NCCL, a header reached the worker's host only after its GPU had finished step N, and
rank 0's GPU then waited in step N+1's first collective: 0.24 ms of a 7.2 ms step at TP 2 on 2 x H200.)
FORWARD's lengths ride in the header for the same reason: the worker builds its Context without a sync.
"""
from multiprocessing.connection import Connection

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.utils.context import Context, context_from_lengths, cu_seqlens

EXIT, ALLOCATE, FORWARD, LOGITS, DECODE = range(5)
_HEADER_LEN = 4
_PIPES: list[Connection] = []  # rank 0: the write end of each worker's pipe; a worker: the read end of its own


def connect(pipes: list[Connection]) -> None:
    """Where headers go (rank 0: every worker's pipe) or come from (a worker: its own)."""
    _PIPES[:] = pipes


def _send_header(command: int, *sizes: int, host_data: list[int] = ()) -> None:
    header = np.array([command, *sizes, *[0] * (_HEADER_LEN - 1 - len(sizes)), *host_data], dtype=np.int64)
    for pipe in _PIPES:
        pipe.send_bytes(header.tobytes())


def recv_header() -> tuple[int, list[int], np.ndarray]:
    """(command, its three sizes, its host data) as rank 0 sent them; EXIT when rank 0's end is gone."""
    try:
        header = np.frombuffer(_PIPES[0].recv_bytes(), dtype=np.int64)
    except EOFError:
        return EXIT, [0] * (_HEADER_LEN - 1), np.empty(0, dtype=np.int64)
    return int(header[0]), header[1:_HEADER_LEN].tolist(), header[_HEADER_LEN:]


def send_exit() -> None:
    _send_header(EXIT)


def send_allocate(max_model_len: int) -> None:
    _send_header(ALLOCATE, max_model_len)


def send_forward(input_ids: torch.Tensor, positions: torch.Tensor, context: Context) -> None:
    """Header: sizes and the q_lens and context_lens (B each); payload: input_ids, positions, slot_mapping
    (T each) and block_tables."""
    num_seqs, width = context.block_tables.shape
    _send_header(FORWARD, input_ids.numel(), num_seqs, width, host_data=context.q_lens + context.context_lens)
    payload = torch.cat([input_ids, positions, context.slot_mapping, context.block_tables.flatten().long()])
    dist.broadcast(payload, src=0)


def recv_forward(sizes: list[int], lens: np.ndarray,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Context]:
    """(input_ids, positions, Context) of the FORWARD whose header sizes and host data are given."""
    num_tokens, num_seqs, width = sizes
    payload = torch.empty(3 * num_tokens + num_seqs * width, dtype=torch.int64, device=device)
    dist.broadcast(payload, src=0)
    input_ids, positions, slot_mapping, tables = payload.split([num_tokens, num_tokens, num_tokens,
                                                                num_seqs * width])
    q_lens, context_lens = lens[:num_seqs], lens[num_seqs:]
    context = context_from_lengths(q_lens, context_lens, cu_seqlens(q_lens), slot_mapping,
                                   tables.view(num_seqs, width).int(), device)
    return input_ids, positions, context


def send_logits(hidden: torch.Tensor) -> None:
    """hidden (N, hidden_size): the rows whose logits rank 0 is about to compute."""
    _send_header(LOGITS, *hidden.shape)
    dist.broadcast(hidden.contiguous(), src=0)


def recv_logits(sizes: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    hidden = torch.empty(sizes[0], sizes[1], dtype=dtype, device=device)  # (N, hidden_size)
    dist.broadcast(hidden, src=0)
    return hidden


def send_decode(bucket: int, sampling: bool, gather_logits: bool) -> None:
    """Replay the decode graph of this batch-size bucket (the sampling one or the greedy one), then, with
    gather_logits, gather the logits to rank 0; its inputs follow (broadcast_decode_inputs)."""
    _send_header(DECODE, bucket, int(sampling), int(gather_logits))


def broadcast_decode_inputs(*buffers: torch.Tensor) -> None:
    """The decode graphs' static input buffers (temperatures too for a sampling step), rank 0's into every
    rank's (engine/cuda_graph.py)."""
    for buffer in buffers:
        dist.broadcast(buffer, src=0)
