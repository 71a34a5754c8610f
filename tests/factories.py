"""Small factories and checks for the torch-free engine core: no model, no torch."""
from collections import Counter
from random import Random

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import ScheduledBatch, Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_model_len: int = 128, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, enable_prefix_caching: bool = True,
                   enable_chunked_prefill: bool = True) -> Scheduler:
    config = Config(max_model_len=max_model_len, block_size=block_size, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_num_batched_tokens,
                    enable_prefix_caching=enable_prefix_caching,
                    enable_chunked_prefill=enable_chunked_prefill)
    return Scheduler(config, num_blocks)


def create_seqs(num: int = 1, prompt_len: int = 8, prompt: list[int] | None = None,
                request_id: str | None = None, seed: int = 0) -> list[Sequence]:
    """num seqs with distinct random prompts, or all with `prompt` (as the n completions of one request)."""
    rng = Random(seed)
    seqs = []
    for i in range(num):
        token_ids = prompt if prompt is not None else [rng.randrange(1000) for _ in range(prompt_len)]
        rid = request_id if request_id is not None else f"req-{seed}-{i}"
        seqs.append(Sequence(token_ids, SamplingParams(), request_id=rid, index=i if request_id else 0))
    return seqs


class FakeKVCache:
    """Stands in for the model: each written slot records the token prefix its KV would depend on, so a test
    can check that every seq reads exactly the KV of its own tokens."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def slot(self, seq: Sequence, pos: int) -> tuple[int, int]:
        return seq.block_table[pos // self.block_size], pos % self.block_size

    def write(self, batch: ScheduledBatch, block_manager: BlockManager) -> None:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            self.check(seq)  # what attention reads this step
            for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
                block = block_manager.blocks[self.slot(seq, pos)[0]]
                assert block.ref_count == 1, f"{seq} writes into block {block.block_id} shared with others"
                assert block.hash is None, f"{seq} overwrites the computed block {block.block_id}"
                self.slots[self.slot(seq, pos)] = tuple(seq.token_ids[:pos + 1])

    def check(self, seq: Sequence) -> None:
        for pos in range(seq.num_computed_tokens):
            assert self.slots.get(self.slot(seq, pos)) == tuple(seq.token_ids[:pos + 1]), \
                f"{seq} would read wrong KV at position {pos}"


def step(scheduler: Scheduler, sample=lambda seq: 7, kv: FakeKVCache | None = None) -> ScheduledBatch:
    """One engine step without a model: schedule, (fake) compute, sample with `sample(seq)`, postprocess."""
    batch = scheduler.schedule()
    if kv is not None:
        kv.write(batch, scheduler.block_manager)
    sampled = {seq.seq_id: sample(seq) for seq, n in zip(batch.seqs, batch.num_new_tokens)
               if seq.num_computed_tokens + n == seq.num_tokens}
    scheduler.postprocess(batch, sampled)
    return batch


def scheduled(batch: ScheduledBatch) -> list[tuple[int, int]]:
    return [(seq.seq_id, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]


def check_invariants(scheduler: Scheduler, kv: FakeKVCache | None = None) -> None:
    bm = scheduler.block_manager
    bs = bm.block_size
    refs = Counter(block_id for seq in scheduler.running for block_id in seq.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id], f"block {block.block_id}: ref count {block.ref_count}"
    assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    assert bm.num_free_blocks + len(refs) == bm.num_blocks
    for block_hash, block_id in bm.hash_to_block_id.items():
        assert bm.blocks[block_id].hash == block_hash
    assert len(scheduler.running) <= scheduler.max_num_seqs
    max_blocks = bm.blocks_needed(scheduler.max_model_len)
    for seq in scheduler.running:
        assert seq.status == SequenceStatus.RUNNING
        assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} holds a block twice"
        # Blocks for every token, but maybe not yet for the token sampled last step.
        num_blocks = len(seq.block_table)
        assert num_blocks in (bm.blocks_needed(seq.num_tokens), bm.blocks_needed(seq.num_tokens - 1))
        assert num_blocks <= max_blocks, f"{seq} overflows the block table"
        assert seq.num_computed_tokens < seq.num_tokens
        for i, block_id in enumerate(seq.block_table):
            block = bm.blocks[block_id]
            if block.hash is not None:
                assert block.token_ids == seq.token_ids[i * bs:(i + 1) * bs]
        if kv is not None:
            kv.check(seq)
    for seq in scheduler.waiting:
        assert seq.status == SequenceStatus.WAITING and not seq.block_table and seq.num_computed_tokens == 0
