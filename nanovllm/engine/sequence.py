"""One generated completion: its tokens, its place in the KV cache and its progress. Torch-free."""
from copy import copy
from enum import Enum, auto
from itertools import count

from nanovllm.sampling_params import SamplingParams

# The token id of a token sampled by a step whose ids are not back on the host yet (async scheduling).
PLACEHOLDER = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    block_size = 16  # set by the engine (and the Scheduler) from Config.block_size
    counter = count()

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams, request_id: str = "",
                 index: int = 0, arrival_time: float = 0.0):
        if not token_ids:
            raise ValueError("A sequence needs at least one prompt token.")
        self.seq_id = next(Sequence.counter)
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.token_ids = copy(token_ids)  # prompt + generated; only ever grown by append_token
        self.num_tokens = len(token_ids)  # len(token_ids), kept as a field: the hot loops read it per seq
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # tokens found in the prefix cache at the last allocation
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hashes of the full blocks, memoized by the BlockManager
        self.sampling_params = sampling_params
        # Set by the engine:
        self.output_logprobs: list = []
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, status={self.status.name}, "
                f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})")

    @property
    def num_completion_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_blocks(self) -> int:
        return (self.num_tokens + self.block_size - 1) // self.block_size

    def block(self, i: int) -> list[int]:
        """The tokens of logical block i."""
        assert 0 <= i < self.num_blocks
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.num_tokens += 1
