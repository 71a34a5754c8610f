"""Scheduler: batching, chunked prefill, prefix caching and preemption, without a model."""
import subprocess
import sys
from random import Random

import pytest
from factories import FakeKVCache, check_invariants, create_seqs, make_scheduler, scheduled, step
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams


def add_all(scheduler, seqs):
    for seq in seqs:
        scheduler.add(seq)
    return seqs


def test_core_modules_do_not_import_torch():
    code = ("import sys, nanovllm.engine.scheduler, nanovllm.engine.block_manager, nanovllm.engine.sequence; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_prefill_then_decode_samples_once_per_step():
    s = make_scheduler()
    a, b = add_all(s, create_seqs(num=2, prompt_len=5))
    assert scheduled(step(s)) == [(a.seq_id, 5), (b.seq_id, 5)]
    assert a.num_computed_tokens == 5 and a.completion_token_ids == [7]
    assert scheduled(step(s)) == [(a.seq_id, 1), (b.seq_id, 1)]
    assert a.num_tokens == 7 and a.num_computed_tokens == 6
    check_invariants(s)


def test_chunked_prefill_splits_a_long_prompt_and_samples_at_the_end():
    s = make_scheduler(max_num_batched_tokens=4)
    (seq,) = add_all(s, create_seqs(prompt_len=10))
    chunks = [scheduled(step(s))[0][1] for _ in range(3)]
    assert chunks == [4, 4, 2]
    assert seq.num_completion_tokens == 1 and seq.num_computed_tokens == 10


def test_mixed_batch_runs_decodes_first_then_chunks_then_new_prompts():
    s = make_scheduler(max_num_batched_tokens=8)
    (a,) = add_all(s, create_seqs(prompt_len=3, seed=1))
    step(s)  # a prefilled: it decodes from now on
    b, c = add_all(s, create_seqs(num=2, prompt_len=12, seed=2))
    assert scheduled(step(s)) == [(a.seq_id, 1), (b.seq_id, 7)]
    assert scheduled(step(s)) == [(a.seq_id, 1), (b.seq_id, 5), (c.seq_id, 2)]
    assert b.num_completion_tokens == 1 and c.num_completion_tokens == 0
    assert scheduled(step(s)) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 6)]
    check_invariants(s)


def test_without_chunking_prompts_wait_until_they_fit_whole():
    s = make_scheduler(max_num_batched_tokens=10, enable_chunked_prefill=False)
    a, b = add_all(s, create_seqs(num=2, prompt_len=6))
    assert scheduled(step(s)) == [(a.seq_id, 6)]
    assert scheduled(step(s)) == [(a.seq_id, 1), (b.seq_id, 6)]


def test_check_prompt_rejects_what_could_never_run():
    s = make_scheduler(max_model_len=32, max_num_batched_tokens=16, enable_chunked_prefill=False)
    s.check_prompt(16)
    with pytest.raises(ValueError, match="empty"):
        s.check_prompt(0)
    with pytest.raises(ValueError, match="max_model_len"):
        s.check_prompt(33)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        s.check_prompt(17)
    make_scheduler(max_model_len=32, max_num_batched_tokens=16).check_prompt(32)  # chunked: fine


def test_max_num_seqs_caps_the_running_seqs():
    s = make_scheduler(max_num_seqs=2)
    seqs = add_all(s, create_seqs(num=3, prompt_len=2))
    step(s)
    assert s.num_running == 2 and s.num_waiting == 1
    s.finish(seqs[0], "stop")
    assert len(step(s)) == 2 and seqs[2].status == SequenceStatus.RUNNING


def test_preemption_drops_the_newest_seq_and_requeues_it_first():
    s = make_scheduler(num_blocks=2, block_size=4, enable_prefix_caching=False)
    a, b, c = add_all(s, create_seqs(num=3, prompt_len=4))
    step(s)  # a and b prefilled, one block each; c waits
    assert s.num_running == 2 and s.num_waiting == 1 and s.block_manager.num_free_blocks == 0
    batch = step(s)  # both need a 2nd block for their 5th token: b is preempted for a
    assert scheduled(batch) == [(a.seq_id, 1)]
    assert s.num_preemptions == 1 and list(s.waiting) == [b, c]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.completion_token_ids == [7]  # kept: recomputed with the prompt
    s.finish(a, "stop")
    assert scheduled(step(s)) == [(b.seq_id, 5)]
    check_invariants(s)


def test_preemption_after_a_prefix_hit_keeps_the_shared_blocks():
    """nano-vllm bug: preempting a seq that had a prefix hit corrupted the blocks it shared."""
    s = make_scheduler(num_blocks=5, block_size=4)
    kv = FakeKVCache(4)
    prompt = list(range(8))
    (a,) = add_all(s, create_seqs(prompt=prompt + [100]))
    step(s, kv=kv)
    (b,) = add_all(s, create_seqs(prompt=prompt + [200]))
    step(s, kv=kv)  # b hits a's 2 prompt blocks
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    shared = a.block_table[:2]
    for _ in range(4):
        step(s, kv=kv)  # a takes the last free block for its 13th token, then b needs one for its 13th
    assert s.num_preemptions == 1 and b.status == SequenceStatus.WAITING
    assert [s.block_manager.blocks[i].ref_count for i in shared] == [1, 1]
    check_invariants(s, kv)
    s.finish(a, "stop")
    step(s, kv=kv)  # b comes back on the cached prompt and its own cached block
    assert b.num_cached_tokens == 12 and b.block_table[:2] == shared
    check_invariants(s, kv)


def test_identical_prompt_computes_at_least_one_token():
    """nano-vllm bug: a 100% prefix hit scheduled nothing to compute, so nothing was sampled."""
    s = make_scheduler(block_size=4)
    prompt = list(range(8))
    (a,) = add_all(s, create_seqs(prompt=prompt))
    step(s)
    (b,) = add_all(s, create_seqs(prompt=prompt))
    assert scheduled(step(s)) == [(a.seq_id, 1), (b.seq_id, 4)]
    assert b.num_cached_tokens == 4 and b.completion_token_ids == [7]


def test_siblings_admitted_together_end_up_sharing_their_prompt():
    s = make_scheduler(num_blocks=16, block_size=4)
    seqs = add_all(s, create_seqs(num=3, prompt=list(range(9)), request_id="r"))
    step(s, sample=lambda seq: seq.index)
    assert len({tuple(seq.block_table[:2]) for seq in seqs}) == 1
    assert s.block_manager.num_free_blocks == 16 - 2 - 3
    check_invariants(s)


def test_length_cap_keeps_the_block_table_within_max_model_len():
    """nano-vllm bug: decoding past max_model_len grew the block table beyond its size."""
    s = make_scheduler(block_size=4, max_model_len=8)
    a, b = add_all(s, [*create_seqs(prompt_len=6), *create_seqs(prompt_len=8, seed=1)])
    finished = []
    for _ in range(4):  # the engine here never stops them: the scheduler's hard limit must
        finished += step(s).finished
        check_invariants(s)
    assert finished == [b, a] and s.is_finished()
    assert a.num_tokens == 8 and b.num_tokens == 9  # a prompt of max_model_len still gets its token
    assert {a.finish_reason, b.finish_reason} == {"length"}
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_seq_larger_than_the_cache_finishes_instead_of_preempting_forever():
    s = make_scheduler(num_blocks=3, block_size=4)
    big, small = add_all(s, [*create_seqs(prompt_len=13), *create_seqs(prompt_len=4, seed=1)])
    batch = step(s)
    assert batch.finished == [big] and big.finish_reason == "length" and big.block_table == []
    assert scheduled(batch) == [(small.seq_id, 4)]
    for _ in range(9):
        batch = step(s)  # small grows to 13 tokens: it fills the cache, then cannot get a 4th block
    assert batch.finished == [small] and small.num_tokens == 13 and s.num_preemptions == 0


def test_abort_removes_every_seq_of_a_request():
    s = make_scheduler(max_num_seqs=2)
    seqs = add_all(s, create_seqs(num=3, prompt=[1, 2, 3, 4, 5], request_id="r"))
    (other,) = add_all(s, create_seqs(prompt_len=3, request_id="o"))
    step(s)
    assert s.abort("r") == seqs and s.abort("r") == [] and s.abort("missing") == []
    assert all(seq.finish_reason == "abort" and seq.is_finished for seq in seqs)
    assert scheduled(step(s)) == [(other.seq_id, 3)]
    check_invariants(s)


def test_finish_frees_blocks_once_and_postprocess_skips_aborted_seqs():
    s = make_scheduler()
    (a,) = add_all(s, create_seqs(prompt_len=5))
    batch = s.schedule()
    s.finish(a, "abort")
    s.finish(a, "stop")
    s.postprocess(batch, {a.seq_id: 1})
    assert a.finish_reason == "abort" and a.num_tokens == 5 and s.is_finished()
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


# --- Property test: random engines drive the scheduler; the invariants hold after every step ---------------

MAX_MODEL_LEN = 24
prompts = st.lists(st.integers(0, 2), min_size=1, max_size=MAX_MODEL_LEN)  # tiny vocab: many prefix hits


class SchedulerMachine(RuleBasedStateMachine):
    """A fake engine: adds requests (n of them share the prompt), steps with random samples, stops seqs at
    max_tokens or at random (EOS), aborts requests. It never stops at max_model_len: the scheduler must."""

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4]),
                max_num_seqs=st.integers(1, 4), max_num_batched_tokens=st.integers(1, 16),
                caching=st.booleans(), chunking=st.booleans(), bad_hash=st.booleans(),
                seed=st.integers(0, 99))
    def setup(self, num_blocks, block_size, max_num_seqs, max_num_batched_tokens, caching, chunking, bad_hash,
              seed):
        self.s = make_scheduler(num_blocks, block_size, MAX_MODEL_LEN, max_num_seqs, max_num_batched_tokens,
                                caching, chunking)
        if bad_hash:  # every block of a position collides: hits must still be exact
            self.s.block_manager.compute_hash = lambda parent, token_ids: 0 if parent is None else parent + 1
        self.kv = FakeKVCache(block_size)
        self.rng = Random(seed)
        self.max_tokens: dict[int, int | None] = {}
        self.num_requests = 0

    @rule(prompt=prompts, n=st.integers(1, 3), max_tokens=st.none() | st.integers(1, 8))
    def add(self, prompt, n, max_tokens):
        try:
            self.s.check_prompt(len(prompt))
        except ValueError:
            assert not self.s.enable_chunked_prefill and len(prompt) > self.s.max_num_batched_tokens
            return
        self.num_requests += 1
        for i in range(n):
            seq = Sequence(prompt, SamplingParams(), request_id=str(self.num_requests), index=i)
            self.max_tokens[seq.seq_id] = max_tokens
            self.s.add(seq)

    @rule()
    def step(self):
        s = self.s
        before = {seq.seq_id for seq in s.running}
        batch = s.schedule()
        assert batch.seqs or s.is_finished(), "work is left but nothing was scheduled"
        assert len(batch) <= s.max_num_seqs and batch.num_batched_tokens <= s.max_num_batched_tokens
        assert len({seq.seq_id for seq in batch.seqs}) == len(batch)
        assert all(seq.finish_reason == "length" and not seq.block_table for seq in batch.finished)
        is_old = [seq.seq_id in before for seq in batch.seqs]
        assert is_old == sorted(is_old, reverse=True), "new seqs must come after running ones"
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.num_computed_tokens + n <= s.max_model_len
            whole = seq.num_computed_tokens + n == seq.num_tokens
            assert whole or s.enable_chunked_prefill or seq.num_tokens > s.max_num_batched_tokens
        self.kv.write(batch, s.block_manager)
        s.postprocess(batch, {seq.seq_id: self.rng.randrange(3) for seq in batch.seqs})
        for seq in list(s.running):
            max_tokens = self.max_tokens[seq.seq_id]
            if max_tokens is not None and seq.num_completion_tokens >= max_tokens:
                s.finish(seq, "length")
            elif seq.num_completion_tokens and self.rng.random() < 0.05:
                s.finish(seq, "stop")

    @rule(data=st.data())
    def abort(self, data):
        if self.num_requests:
            request_id = str(data.draw(st.integers(1, self.num_requests)))
            assert all(seq.request_id == request_id and seq.is_finished for seq in self.s.abort(request_id))

    @invariant()
    def consistent(self):
        check_invariants(self.s, self.kv)

    def teardown(self):
        # Everything finishes within a bounded number of steps, and every block comes back.
        for _ in range(2000):
            if self.s.is_finished():
                break
            self.step()
            check_invariants(self.s, self.kv)
        assert self.s.is_finished(), "the scheduler stopped making progress"
        bm = self.s.block_manager
        assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                              derandomize=True, suppress_health_check=[HealthCheck.too_slow])
test_scheduler_state_machine = SchedulerMachine.TestCase


def test_blocks_filled_by_chunks_and_decodes_are_cached_as_they_fill():
    s = make_scheduler(block_size=4, max_num_batched_tokens=5)
    a, *_ = add_all(s, create_seqs(num=3, prompt_len=7))
    rng = Random(0)
    bm = s.block_manager
    for _ in range(20):
        step(s, sample=lambda seq: rng.randrange(1000))
        for seq in s.running:
            for block_id in seq.block_table[:seq.num_computed_tokens // 4]:
                assert bm.hash_to_block_id.get(bm.blocks[block_id].hash) == block_id
    assert a.num_completion_tokens > 8  # its output fills blocks
    # A prompt repeating a's prompt and output finds all of it but the last token in the cache.
    (again,) = add_all(s, [Sequence(a.token_ids, SamplingParams())])
    s.schedule()
    assert again.num_cached_tokens == (a.num_tokens - 1) // 4 * 4


# --- Async scheduling: step n+1 is scheduled before step n's ids are back ------------------------------------

def start_async(s, seqs):
    """Prefills seqs (sync steps), then schedules their first decode and advances it as if launched."""
    add_all(s, seqs)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in seqs):
        step(s)
    batch = s.schedule()
    assert s.can_overlap(batch)
    s.advance(batch)
    return batch


def test_async_step_computes_placeholders_and_resolves_them():
    s = make_scheduler()
    a, b = create_seqs(num=2, prompt_len=5)
    prev = start_async(s, [a, b])
    assert a.token_ids[-1] == PLACEHOLDER and a.num_tokens == 7 and a.num_computed_tokens == 6
    batch = s.schedule_overlapped()
    assert scheduled(batch) == [(a.seq_id, 1), (b.seq_id, 1)]  # each computes its placeholder
    s.resolve(prev, {a.seq_id: 11, b.seq_id: 12})
    assert a.completion_token_ids == [7, 11] and b.completion_token_ids == [7, 12]
    s.advance(batch)
    assert a.token_ids[-2:] == [11, PLACEHOLDER] and a.num_computed_tokens == 7
    check_invariants(s)


def test_async_drains_for_what_needs_a_normal_step():
    s = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=3)
    seqs = create_seqs(num=2, prompt_len=3)
    start_async(s, seqs)  # the placeholders (token 4) need a second block each
    free = s.block_manager.num_free_blocks
    s.add(Sequence([1, 2, 3], SamplingParams(prompt_logprobs=1)))
    assert s.schedule_overlapped() is None  # a prompt to admit whose logprobs only a synchronous step gives
    s.waiting.clear()
    s.block_manager.free_block_ids.clear()  # no block for the placeholders' new block: preemption ahead
    assert s.schedule_overlapped() is None
    assert all(len(seq.block_table) == 1 for seq in seqs) and free == 4  # nothing was allocated


def test_async_goes_on_with_penalties():
    """A seq with penalties decodes in an overlapped step: its sampler takes the placeholder's id on the device
    (SamplingBatch.build's history), so nothing drains for it."""
    s = make_scheduler()
    seqs = [Sequence([1, 2, 3], SamplingParams(repetition_penalty=1.2, max_tokens=8)),
            Sequence([4, 5], SamplingParams(presence_penalty=0.5, frequency_penalty=0.5, max_tokens=8))]
    start_async(s, seqs)
    batch = s.schedule_overlapped()
    assert batch.seqs == seqs and batch.num_new_tokens == [1, 1] and s.can_overlap(batch)
    assert all(seq.token_ids[-1] == PLACEHOLDER for seq in seqs)


def test_async_never_schedules_a_seq_past_its_last_token():
    s = make_scheduler(max_model_len=16)
    short = Sequence([1, 2, 3], SamplingParams(max_tokens=2))
    long_prompt = Sequence(list(range(14)), SamplingParams())  # max_model_len: 16 tokens in all
    other = Sequence([4, 5], SamplingParams(max_tokens=5))
    start_async(s, [short, long_prompt, other])
    assert s.reached_length(short) and s.reached_length(long_prompt) and not s.reached_length(other)
    assert scheduled(s.schedule_overlapped()) == [(other.seq_id, 1)]
    s.running = [short, long_prompt]
    assert s.schedule_overlapped() is None  # nothing left to run: drain


def test_async_block_filled_by_a_placeholder_is_cached_once_real():
    s = make_scheduler(block_size=4)
    (seq,) = create_seqs(prompt_len=2)
    prev = start_async(s, [seq])  # token 3 (a placeholder) fills block 0
    bm = s.block_manager
    block = bm.blocks[seq.block_table[0]]
    batch = s.schedule_overlapped()
    assert block.hash is None and len(seq.block_hashes) == 0
    s.resolve(prev, {seq.seq_id: 42})
    s.advance(batch)  # block 0 is now computed, with the real id
    assert block.token_ids == seq.token_ids[:4] and seq.token_ids[3] == 42
    assert block.hash == bm.compute_hash(None, seq.token_ids[:4])


def test_async_pipeline_makes_the_same_tokens_as_sync_steps():
    """Sync steps and the async pipeline (advance, schedule_overlapped or drain, then resolve) on random
    workloads with prefix sharing, preemption and chunks: the same tokens per seq, invariants after each step.
    Each token is a function of the tokens before it, as a model's would be, and 0 is EOS."""
    overlapped = 0
    for seed in range(12):
        tokens = [run_pipeline(seed, overlap=False)[0], run_pipeline(seed, overlap=True)]
        assert tokens[0] == tokens[1][0], f"seed {seed}"
        overlapped += tokens[1][1]
    assert overlapped > 50


def run_pipeline(seed: int, overlap: bool) -> tuple[list[list[int]], int]:
    """Runs a random workload to the end; returns each seq's tokens and the number of overlapped steps."""
    def sample(prefix):
        return (sum(prefix) * 7 + len(prefix)) % 13

    def finish_done(s, batch, sampled):
        for seq in batch.seqs:
            if seq.seq_id in sampled and not seq.is_finished and (seq.last_token == 0 or s.reached_length(seq)):
                s.finish(seq, "stop")

    rng = Random(seed)
    s = make_scheduler(num_blocks=rng.randint(8, 24), block_size=2, max_model_len=32, max_num_seqs=6,
                       max_num_batched_tokens=rng.randint(6, 16))
    seqs = add_all(s, [Sequence([rng.randrange(3) for _ in range(rng.randint(1, 12))],
                                SamplingParams(max_tokens=rng.randint(1, 20))) for _ in range(6)])
    inflight, overlapped = None, 0  # (batch, its sampled ids, computed at launch as a GPU would)
    for _ in range(500):
        if inflight is None:
            if s.is_finished():
                break
            batch = s.schedule()
            sampled = {seq.seq_id: sample(seq.token_ids) for seq, n in zip(batch.seqs, batch.num_new_tokens)
                       if seq.num_computed_tokens + n == seq.num_tokens}
            if overlap and s.can_overlap(batch):
                inflight = batch, sampled
            else:
                s.postprocess(batch, sampled)
                finish_done(s, batch, sampled)
        else:
            prev, prev_sampled = inflight
            s.advance(prev)
            batch, inflight = s.schedule_overlapped(), None
            if batch is not None and batch.seqs:  # decodes, prefill chunks and prompts alike

                def history(seq):  # as the GPU sees it: a decode's placeholder is its id from prev
                    return seq.token_ids[:-1] + [prev_sampled[seq.seq_id]] if seq.seq_id in prev_sampled else \
                        seq.token_ids
                overlapped += 1
                inflight = batch, {seq.seq_id: sample(history(seq)) for seq, n in zip(batch.seqs, batch.num_new_tokens)
                                   if seq.num_computed_tokens + n == seq.num_tokens}
            s.resolve(prev, prev_sampled)
            finish_done(s, prev, prev_sampled)
        check_invariants(s)
    assert s.is_finished() and inflight is None
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    return [seq.completion_token_ids for seq in seqs], overlapped
