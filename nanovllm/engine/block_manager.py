"""Paged KV-cache blocks with ref counts and a prefix cache over full, computed blocks. Torch-free."""
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import xxhash

from nanovllm.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    epoch: int = 0  # bumped on every reuse, so (block_id, epoch) names one content of the block
    # Set once the block is full and computed (prefix caching only), to verify a hash hit:
    hash: int | None = None
    token_ids: list[int] = field(default_factory=list)
    parent: tuple[int, int] | None = None  # key of the block before it; None for a first block

    @property
    def key(self) -> tuple[int, int]:
        return self.block_id, self.epoch


class BlockManager:
    """Hands out KV blocks to sequences and shares full blocks of identical prefixes between them.

    A full, computed block is registered under a 128-bit hash of (parent hash, its tokens); a hit also checks
    the stored tokens and parent, so a collision never reuses the wrong KV. When its last user frees a cached
    block, it goes to the LRU end of the free list and stays findable until it is reused for other content.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block_id: dict[int, int] = {}
        # Free blocks in eviction order: plain ones first, cached ones from least to most recently freed.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # tokens looked up on admission
        self.prefix_hits = 0  # tokens found

    @staticmethod
    def compute_hash(parent: int | None, token_ids: list[int]) -> int:
        """128 bits: a collision is never expected, and a hit checks the tokens and parent anyway."""
        h = xxhash.xxh3_128()
        if parent is not None:
            h.update(parent.to_bytes(16, "little"))
        h.update(array("q", token_ids).tobytes())
        return h.intdigest()

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._find_cached_blocks(seq)
        # A hit on a free cached block takes it off the free list just like a new block does.
        num_revived = sum(self.blocks[block_id].ref_count == 0 for block_id in hits)
        num_new = self.blocks_needed(seq.num_tokens) - len(hits)
        return num_new + num_revived <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Gives seq blocks for all its tokens, reusing cached prefix blocks; sets num_computed_tokens."""
        assert not seq.block_table, f"{seq} already has blocks"
        hits = self._find_cached_blocks(seq)
        for block_id in hits:  # before any new block is taken, which could evict a hit from the free list
            self._take(block_id)
        num_new = self.blocks_needed(seq.num_tokens) - len(hits)
        seq.block_table = hits + [self._allocate_block() for _ in range(num_new)]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        if self._may_hit(seq):
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += seq.num_cached_tokens

    def can_append(self, seq: Sequence, n: int) -> bool:
        return self._num_missing_blocks(seq, n) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, n: int) -> None:
        """Ensures seq has blocks for num_computed_tokens + n tokens."""
        for _ in range(self._num_missing_blocks(seq, n)):
            seq.block_table.append(self._allocate_block())

    def deallocate(self, seq: Sequence) -> None:
        """Frees seq's blocks (its KV is gone, so num_computed_tokens drops to 0)."""
        # Tail blocks first: they reach the front of the LRU order, so shared prefixes outlive them.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free(block)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers seq's blocks that became full and computed since the last call."""
        if not self.enable_prefix_caching:
            return
        end = seq.num_computed_tokens // self.block_size
        hashes = self._full_block_hashes(seq, end)
        start = end  # blocks registered earlier (or found in the cache) carry their hash already
        while start > 0 and self.blocks[seq.block_table[start - 1]].hash is None:
            start -= 1
        for i in range(start, end):
            self._cache_block(seq, i, hashes[i])

    def _cache_block(self, seq: Sequence, i: int, block_hash: int) -> None:
        block = self.blocks[seq.block_table[i]]
        token_ids = self._block_tokens(seq, i)
        parent_key = self.blocks[seq.block_table[i - 1]].key if i > 0 else None
        cached_id = self.hash_to_block_id.get(block_hash)
        if cached_id is not None and self._holds(cached_id, parent_key, token_ids):
            # The same content was computed twice (e.g. the n siblings of a request admitted in one step):
            # keep the cached copy and give this one back.
            assert block.ref_count == 1, "an uncached block cannot be shared"
            self._take(cached_id)
            seq.block_table[i] = cached_id
            block.ref_count = 0
            self._free(block)
            return
        block.hash, block.token_ids, block.parent = block_hash, token_ids, parent_key
        if cached_id is None:  # else a hash collision: the block stays private
            self.hash_to_block_id[block_hash] = block.block_id

    def _find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Ids of the cached blocks holding seq's leading tokens. The last token is never looked up: at least
        one token must be computed to get logits to sample from."""
        if not self._may_hit(seq):
            return []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._full_block_hashes(seq, num_blocks)
        hits: list[int] = []
        for i in range(num_blocks):
            block_id = self.hash_to_block_id.get(hashes[i])
            parent_key = self.blocks[hits[-1]].key if hits else None
            if block_id is None or not self._holds(block_id, parent_key, self._block_tokens(seq, i)):
                break
            hits.append(block_id)
        return hits

    def _holds(self, block_id: int, parent_key: tuple[int, int] | None, token_ids: list[int]) -> bool:
        """Whether a cached block holds the KV of token_ids after that parent. Checking the parent as well as
        the tokens makes a hit exact even if hashes collide: the whole prefix matches, block by block."""
        block = self.blocks[block_id]
        return block.parent == parent_key and block.token_ids == token_ids

    def _may_hit(self, seq: Sequence) -> bool:
        # Prompt logprobs need the logits of every prompt position: such seqs compute them all, as in vLLM.
        return self.enable_prefix_caching and seq.sampling_params.prompt_logprobs is None

    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Hashes of seq's first num_blocks blocks (full ones), memoized on seq. Only blocks whose tokens
        are all known are ever hashed: under async scheduling the last token may still be a placeholder."""
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(self.compute_hash(hashes[-1] if hashes else None, self._block_tokens(seq, i)))
        return hashes

    def _block_tokens(self, seq: Sequence, i: int) -> list[int]:
        return seq.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def _num_missing_blocks(self, seq: Sequence, n: int) -> int:
        return max(0, self.blocks_needed(seq.num_computed_tokens + n) - len(seq.block_table))

    def _is_cached(self, block: Block) -> bool:
        return block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id

    def _take(self, block_id: int) -> None:
        """Adds a user to a cached block, reviving it from the free list if it had none."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _allocate_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if self._is_cached(block):  # its KV is about to be overwritten: drop the stale hash
            del self.hash_to_block_id[block.hash]
        block.ref_count, block.epoch = 1, block.epoch + 1
        block.hash, block.token_ids, block.parent = None, [], None
        return block_id

    def _free(self, block: Block) -> None:
        self.free_block_ids[block.block_id] = None  # LRU end: evicted last
        if not self._is_cached(block):
            self.free_block_ids.move_to_end(block.block_id, last=False)  # nothing worth keeping: reuse first
