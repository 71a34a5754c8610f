"""Picks the tokens each step computes: decodes, prefill chunks and new prompts in one batch. Torch-free."""
from collections import deque
from dataclasses import dataclass, field

from nanovllm.config import Config
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: seqs[i] computes num_new_tokens[i] tokens from its num_computed_tokens on, and is
    sampled iff that reaches its last token."""
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # finished by schedule() ("length"): report them
    num_batched_tokens: int = 0

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        assert 0 < num_new_tokens <= seq.num_tokens - seq.num_computed_tokens
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.num_batched_tokens += num_new_tokens

    def add_decode(self, seq: Sequence) -> None:
        """add(seq, 1) without the check, for the one hot loop whose caller has just checked it."""
        self.seqs.append(seq)
        self.num_new_tokens.append(1)
        self.num_batched_tokens += 1

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """FCFS continuous batching with chunked prefill, prefix caching and preemption by recompute.

    `running` holds the admitted seqs in admission order, partial prefills included; `waiting` the others,
    preempted ones at the front. Admission allocates blocks for all of a seq's tokens, so a chunked prefill
    never stalls half-way for memory and only decodes ever need to preempt.
    """

    def __init__(self, config: Config, num_blocks: int):
        if not isinstance(config.max_model_len, int):
            raise ValueError("config.max_model_len must be resolved to an int before building the Scheduler.")
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.enable_chunked_prefill = config.enable_chunked_prefill
        Sequence.block_size = config.block_size
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        # No seq may exceed max_model_len, nor need more blocks than the whole cache holds.
        self.max_seq_tokens = min(self.max_model_len, num_blocks * config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def check_prompt(self, num_tokens: int) -> None:
        """Raises ValueError for a prompt this scheduler could never run; the engine calls it before add()."""
        if num_tokens < 1:
            raise ValueError("The prompt is empty: it needs at least one token.")
        if num_tokens > self.max_model_len:
            raise ValueError(f"The prompt ({num_tokens} tokens) is longer than max_model_len "
                             f"({self.max_model_len}).")
        if not self.enable_chunked_prefill and num_tokens > self.max_num_batched_tokens:
            raise ValueError(f"The prompt ({num_tokens} tokens) is longer than max_num_batched_tokens "
                             f"({self.max_num_batched_tokens}) and chunked prefill is off: enable it or "
                             f"raise max_num_batched_tokens.")

    def add(self, seq: Sequence) -> None:
        assert seq.status == SequenceStatus.WAITING and not seq.block_table
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Running decodes first, then continuing prefills, then waiting seqs (FCFS).

        Empty only when there is nothing left to run. Seqs that hit a hard limit are finished with "length"
        and listed in `batch.finished`."""
        batch = ScheduledBatch()
        self._schedule_decodes(batch)
        self._schedule_prefill_chunks(batch)
        self._schedule_waiting(batch)
        return batch

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int] | None) -> None:
        """Records the computed tokens, appends each sampled token (sampled: seq_id -> token id; None: the
        ids are not back yet, see advance) and caches the blocks that became full."""
        block_size = self.block_manager.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is SequenceStatus.FINISHED:  # aborted since schedule()
                continue
            num_computed = seq.num_computed_tokens = seq.num_computed_tokens + n
            if num_computed == seq.num_tokens:
                seq.append_token(PLACEHOLDER if sampled is None else sampled[seq.seq_id])
            # Every earlier step's full blocks are cached already: look only when this chunk filled one.
            if num_computed // block_size != (num_computed - n) // block_size:
                self.block_manager.cache_full_blocks(seq)

    def reached_length(self, seq: Sequence) -> bool:
        """Whether seq's last token (maybe still a placeholder) is its last one: max_tokens or max_model_len.
        The engine finishes such a seq; async scheduling does not schedule it again."""
        max_tokens = seq.sampling_params.max_tokens or self.max_model_len
        return seq.num_completion_tokens >= max_tokens or seq.num_tokens >= self.max_model_len

    # ---- async scheduling: step n+1 is scheduled while step n runs --------------------------------------
    # advance(batch) is postprocess without the sampled ids: each sampled seq gets a PLACEHOLDER token, whose
    # input id the runner takes from step n's ids on the device; resolve() writes the real ids once they are
    # back. Between two engine steps no placeholder is left, so everything else sees real tokens only.
    # A seq that finishes (or is aborted) while a step holding it runs is freed at once, not after that step:
    # the step writes its KV only into blocks of the seq that hold no computed token yet, so none is in the
    # prefix cache, and any later user of a freed block runs after it on the one CUDA stream.

    def can_overlap(self, batch: ScheduledBatch) -> bool:
        """Whether the next step could be scheduled before this batch's ids are back: no seq in it needs its
        tokens on the host (see _needs_host). Prefill chunks and new prompts may be in it."""
        return bool(batch.seqs) and not any(self._needs_host(seq) for seq in batch.seqs)

    @staticmethod
    def _needs_host(seq: Sequence) -> bool:
        """Whether a step of seq must run synchronously: its next chunk yields prompt logprobs (the synchronous
        run computes those). Penalties read the token history, placeholder included: the runner takes its id
        on the device (layers/sampler.py: SamplingBatch.build's history)."""
        return (seq.sampling_params.prompt_logprobs is not None
                and seq.num_computed_tokens < seq.num_prompt_tokens - 1)

    def advance(self, batch: ScheduledBatch) -> None:
        """postprocess() for a launched step whose sampled ids are not known yet: sampled seqs get a
        placeholder. Only computed tokens are hashed into the prefix cache, and those are all real."""
        self.postprocess(batch, None)

    def resolve(self, batch: ScheduledBatch, sampled: dict[int, int]) -> None:
        """Replaces the placeholders advance() appended with the sampled ids."""
        for seq in batch.seqs:
            if seq.status is not SequenceStatus.FINISHED and seq.seq_id in sampled:
                assert seq.token_ids[-1] == PLACEHOLDER
                seq.token_ids[-1] = sampled[seq.seq_id]

    def schedule_overlapped(self) -> ScheduledBatch | None:
        """The next step while the previous one (already advanced) still runs, as schedule() picks it: the
        decodes (a seq sampled last step decodes its placeholder, whose id the runner takes on the device),
        then the prefill chunks, then new prompts. None when the step must wait for the previous one's ids
        (a drain), before anything changes: a seq whose tokens the host needs (_needs_host), a waiting head
        that needs them and could be admitted, too few free blocks for the decodes (preemption would have to
        recompute a placeholder), too many decodes for the token budget, or nothing to run. The batch may come
        back without seqs: then it only lists the waiting seqs it finished ("length": `finished`)."""
        slots = self.block_manager.block_size
        decodes, new_blocks = [], 0
        for seq in self.running:
            if self._needs_host(seq) or seq.num_tokens > self.max_seq_tokens:
                return None
            if seq.num_tokens - seq.num_computed_tokens == 1 and not self.reached_length(seq):
                decodes.append(seq)  # else a prefill chunk, or a seq the engine finishes when its ids are back
                new_blocks += seq.num_computed_tokens == slots * len(seq.block_table)
        if len(decodes) > self.max_num_batched_tokens or new_blocks > self.block_manager.num_free_blocks:
            return None
        if self.waiting and self._needs_host(self.waiting[0]) and self._may_admit(self.waiting[0], len(decodes)):
            return None  # a head that cannot be admitted now does not stop the pipeline (nor is it overtaken)
        batch = ScheduledBatch()
        for seq in decodes:
            if seq.num_computed_tokens == slots * len(seq.block_table):
                self.block_manager.append_slots(seq, 1)
            batch.add_decode(seq)
        self._schedule_prefill_chunks(batch)
        self._schedule_waiting(batch, overlapped=True)
        return batch if batch.seqs or batch.finished else None

    def _may_admit(self, seq: Sequence, num_decodes: int) -> bool:
        """Whether a normal step after these decodes might admit (or finish) the waiting head seq, as
        _schedule_waiting decides (it also counts the prefill chunks, so it admits no more than this)."""
        budget = self.max_num_batched_tokens - num_decodes
        return self._beyond_limits(seq) or (
            budget > 0 and num_decodes < self.max_num_seqs and self._fits_budget(seq, budget)
            and self.block_manager.can_allocate(seq))

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends seq ("stop", "length" or "abort") and frees its blocks; a no-op if already finished."""
        if seq.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def abort(self, request_id: str) -> list[Sequence]:
        """Finishes every seq of the request with "abort"; returns them (empty if none is left)."""
        seqs = [seq for seq in [*self.running, *self.waiting] if seq.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        """Schedules the running seqs with one token left (decodes, last 1-token chunks), oldest first."""
        slots = self.block_manager.block_size  # KV slots of a seq: block_size * len(block_table)
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed_tokens != 1:
                continue  # preempted just now, or a prefill that is scheduled next
            if self._beyond_limits(seq):
                self._finish_length(seq, batch)
            elif batch.num_batched_tokens == self.max_num_batched_tokens:
                break
            elif seq.num_computed_tokens < slots * len(seq.block_table):  # the common case: a free slot
                batch.add_decode(seq)
            elif self._make_room(seq):
                self.block_manager.append_slots(seq, 1)
                batch.add_decode(seq)

    def _schedule_prefill_chunks(self, batch: ScheduledBatch) -> None:
        for seq in self.running:  # their blocks were allocated at admission
            budget = self.max_num_batched_tokens - batch.num_batched_tokens
            num_left = seq.num_tokens - seq.num_computed_tokens
            if budget == 0:
                break
            if num_left > 1:
                batch.add(seq, min(num_left, budget))

    def _schedule_waiting(self, batch: ScheduledBatch, overlapped: bool = False) -> None:
        """Admits waiting seqs in order while they fit; overlapped (schedule_overlapped): none from the first
        that needs its tokens on the host on, which a synchronous step admits."""
        while self.waiting:
            seq = self.waiting[0]
            if self._beyond_limits(seq):
                self._finish_length(seq, batch)
                continue
            if overlapped and self._needs_host(seq):
                break
            budget = self.max_num_batched_tokens - batch.num_batched_tokens
            if (budget == 0 or len(self.running) == self.max_num_seqs or not self._fits_budget(seq, budget)
                    or not self.block_manager.can_allocate(seq)):
                break  # FCFS: nothing overtakes the head
            self.waiting.popleft()
            self.block_manager.allocate(seq)  # may hit the prefix cache: num_computed_tokens > 0
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))

    def _fits_budget(self, seq: Sequence, budget: int) -> bool:
        """Without chunked prefill a seq waits until it fits whole (counted without prefix hits, which only
        allocation finds), except one that never could: a preempted seq with a long output is still chunked
        rather than cut short (check_prompt keeps prompts within the budget)."""
        return (self.enable_chunked_prefill or seq.num_tokens <= budget
                or seq.num_tokens > self.max_num_batched_tokens)

    def _make_room(self, seq: Sequence) -> bool:
        """Frees blocks for seq's next token by preempting the most recently admitted seqs, maybe seq itself.
        Returns False if seq was preempted."""
        while not self.block_manager.can_append(seq, 1):
            victim = self.running[-1]  # never scheduled yet this step: decodes are scheduled oldest first
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: the KV is dropped and the whole token list is prefilled again later."""
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _beyond_limits(self, seq: Sequence) -> bool:
        """The hard stops the engine may not have applied. As vLLM, prompt + output stops at max_model_len (a
        prompt of exactly max_model_len still gets its one token), so no KV position reaches max_model_len.
        And a seq that needs more blocks than the whole cache can never run."""
        num_tokens = seq.num_tokens
        return num_tokens > self.max_seq_tokens or (
            num_tokens >= self.max_model_len and num_tokens > seq.num_prompt_tokens)

    def _finish_length(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.finish(seq, "length")
        batch.finished.append(seq)
