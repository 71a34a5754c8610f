"""BlockManager: paged allocation, ref counts and the prefix cache, driven directly (no scheduler)."""
import pytest

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

BS = 4


def compute(bm: BlockManager, seq: Sequence, n: int | None = None) -> None:
    """What a step does to seq's KV: n more tokens computed (default: all), full blocks cached."""
    seq.num_computed_tokens += seq.num_tokens - seq.num_computed_tokens if n is None else n
    bm.cache_full_blocks(seq)


def admit(bm: BlockManager, token_ids: list[int], params: SamplingParams | None = None) -> Sequence:
    seq = Sequence(token_ids, params or SamplingParams())
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    return seq


def test_allocate_and_deallocate_count_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = admit(bm, list(range(9)))  # 3 blocks, the last one partial
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.deallocate(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_can_allocate_and_append_respect_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=BS)
    big = Sequence(list(range(13)), SamplingParams())  # needs 4 blocks
    assert not bm.can_allocate(big)
    seq = admit(bm, list(range(8)))  # 2 full blocks
    compute(bm, seq)
    seq.append_token(99)
    assert bm.can_append(seq, 1)
    bm.append_slots(seq, 1)  # the 9th token needs a 3rd block
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 0
    bm.append_slots(seq, 1)  # already there: no-op
    assert len(seq.block_table) == 3
    assert not bm.can_append(seq, 5)


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(10))
    a = admit(bm, prompt)
    compute(bm, a)
    b = admit(bm, prompt + [42, 43])
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert (bm.prefix_queries, bm.prefix_hits) == (10 + 12, 0 + 8)


def test_full_prompt_hit_still_computes_the_last_token():
    """nano-vllm bug: a prompt made of cached full blocks was a 100% hit, leaving nothing to compute."""
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(8))
    compute(bm, admit(bm, prompt))
    b = admit(bm, prompt)
    assert b.num_computed_tokens == 4  # the block holding the last token is recomputed
    c = admit(bm, prompt + [8])
    assert c.num_computed_tokens == 8 and c.num_tokens - c.num_computed_tokens == 1


def test_hit_only_on_computed_blocks():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(12))
    a = admit(bm, prompt)
    compute(bm, a, 6)  # a chunk: block 0 full and computed, block 1 half
    b = admit(bm, prompt)
    assert b.num_computed_tokens == 4 and b.block_table[0] == a.block_table[0]


def test_freed_cached_blocks_are_revived_and_evicted_last():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(9))
    a = admit(bm, prompt)
    compute(bm, a)
    cached = a.block_table[:2]
    bm.deallocate(a)
    assert bm.num_free_blocks == 4
    # A plain block is reused before the cached ones.
    other = admit(bm, [100])
    assert other.block_table[0] not in cached
    b = Sequence(prompt, SamplingParams())
    assert bm.can_allocate(b)  # 2 revived + 1 new = the 3 free blocks
    bm.allocate(b)
    assert b.block_table[:2] == cached and b.num_computed_tokens == 8
    assert bm.num_free_blocks == 0


def test_can_allocate_counts_revived_blocks_as_taken():
    bm = BlockManager(num_blocks=3, block_size=BS)
    prompt = list(range(9))
    a = admit(bm, prompt)
    compute(bm, a)
    bm.deallocate(a)
    blocker = admit(bm, [100])  # takes the free block that was not cached
    assert bm.num_free_blocks == 2
    b = Sequence(prompt, SamplingParams())
    assert not bm.can_allocate(b)  # 2 hits on free blocks + 1 new block > 2 free
    bm.deallocate(blocker)
    assert bm.can_allocate(b)


def test_reused_block_drops_its_stale_hash():
    """nano-vllm bug: a cached block reused for other content stayed findable under its old hash."""
    bm = BlockManager(num_blocks=2, block_size=BS)
    prompt = list(range(5))
    a = admit(bm, prompt)
    compute(bm, a)
    bm.deallocate(a)
    other = admit(bm, [7, 7, 7, 7, 7])  # needs both blocks: evicts the cached one
    compute(bm, other, 2)  # its block 0 is not full: it must not be found as the old content
    assert bm.hash_to_block_id == {}
    bm.deallocate(other)
    b = admit(bm, prompt)
    assert b.num_computed_tokens == 0 and bm.prefix_hits == 0


def test_same_content_computed_twice_in_one_step_is_deduplicated():
    """nano-vllm bug: the n seqs of a request admitted together each kept their own copy of the prompt."""
    bm = BlockManager(num_blocks=12, block_size=BS)
    prompt = list(range(9))
    seqs = [admit(bm, prompt) for _ in range(3)]  # no hit yet: nothing is computed
    assert bm.num_free_blocks == 12 - 9
    for seq in seqs:
        compute(bm, seq)
    shared = seqs[0].block_table[:2]
    assert all(seq.block_table[:2] == shared for seq in seqs)
    assert [bm.blocks[b].ref_count for b in shared] == [3, 3]
    assert len({seq.block_table[2] for seq in seqs}) == 3  # the partial blocks stay private
    assert bm.num_free_blocks == 12 - 5


def test_hash_collision_never_reuses_other_tokens(monkeypatch):
    """With every hash equal, only the stored tokens and parent tell blocks apart: hits must stay exact."""
    monkeypatch.setattr(BlockManager, "compute_hash", staticmethod(lambda parent, token_ids: 0))
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = admit(bm, [1, 2, 3, 4, 1, 2, 3, 4, 9])  # block 1 = block 0's tokens, after another parent
    compute(bm, a)
    assert a.block_table[0] != a.block_table[1]
    b = admit(bm, [5, 5, 5, 5, 1])  # same hash as a's block 0, other tokens
    assert b.num_computed_tokens == 0
    c = admit(bm, [1, 2, 3, 4, 1, 2, 3, 4, 0])
    assert c.num_computed_tokens == 4 and c.block_table[0] == a.block_table[0]  # block 1 collides: not cached
    compute(bm, b)
    compute(bm, c)
    for seq in (a, b, c):
        for i, block_id in enumerate(seq.block_table[:2]):
            block = bm.blocks[block_id]
            assert block.hash is None or block.token_ids == seq.token_ids[i * BS:(i + 1) * BS]


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = admit(bm, list(range(9)))
    compute(bm, a)
    b = admit(bm, list(range(9)))
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert (bm.prefix_queries, bm.prefix_hits, bm.hash_to_block_id) == (0, 0, {})



def test_seq_with_prompt_logprobs_computes_its_whole_prompt():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = admit(bm, list(range(9)))
    compute(bm, a)
    b = admit(bm, list(range(9)), SamplingParams(prompt_logprobs=0))
    assert b.num_computed_tokens == 0 and bm.prefix_queries == 9  # no lookup, not counted
    compute(bm, b)  # once computed, its full blocks are shared all the same
    assert b.block_table[:2] == a.block_table[:2]
