"""The symmetric-memory all-reduce's choices, without a GPU: which messages go through the buffer, which
algorithm, when it is set up at all, and that everything else keeps the plain collective."""
import pytest
import torch

from nanovllm.distributed import all_reduce as ar
from nanovllm.distributed import parallel_state

MAX = ar.MAX_BYTES


@pytest.mark.parametrize("dtype, nbytes, contiguous, expected", [
    (torch.bfloat16, 8192, True, True),  # one token of a 4096-wide model
    (torch.float32, 16384, True, True),
    (torch.float16, 8192, True, True),
    (torch.int32, 8192, True, False),  # the kernels sum floats
    (torch.bfloat16, 0, True, False),
    (torch.bfloat16, 2, True, False),  # one bf16: under the kernels' 4-byte vector
    (torch.bfloat16, 6, True, False),
    (torch.bfloat16, 4, True, True),
    (torch.bfloat16, MAX, True, True),  # the largest message the default engine sends (8192 x 4096)
    (torch.bfloat16, MAX + 4, True, False),  # over the buffer: NCCL
    (torch.bfloat16, 8192, False, False),
])
def test_which_messages_fit_the_buffer(dtype, nbytes, contiguous, expected):
    assert ar.fits(dtype, nbytes, contiguous) is expected


def unallocated(max_bytes: int = 1 << 20) -> ar.SymmMemAllReduce:
    comm = ar.SymmMemAllReduce.__new__(ar.SymmMemAllReduce)  # no buffer: fits() reads only max_bytes
    comm.max_bytes, comm.slots = max_bytes, torch.zeros(2, 0, dtype=torch.uint8)  # empty slots hold nothing
    return comm


def test_a_view_must_start_aligned_like_the_buffer():
    comm = unallocated()
    x = torch.zeros(4, 4096, dtype=torch.bfloat16)
    assert comm.fits(x) and comm.fits(x[1:3])  # rows start at multiples of 8 KB
    assert not comm.fits(x.view(-1)[1:4097])  # 2 bytes in: the kernels' vectors would straddle
    assert not comm.fits(x[:, :8])  # not dense
    assert not comm.fits(torch.zeros(1 << 20, dtype=torch.bfloat16))  # 2 MB > this buffer's 1 MB


def test_symm_mem_needs_cuda_ranks_of_a_supported_count(monkeypatch):
    assert not ar.symm_mem_supported(2, torch.device("cpu"))
    assert not ar.symm_mem_supported(3, torch.device("cuda", 0))  # the flags' vector needs a power of two
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: (a, b) != (1, 2))
    assert ar.symm_mem_supported(4, torch.device("cuda", 0))
    assert not ar.symm_mem_supported(4, torch.device("cuda", 1))  # rank 1 cannot read rank 2's memory
    monkeypatch.setattr(ar, "torch_maps_symmetric_memory", lambda: False)  # a torch without it
    assert not ar.symm_mem_supported(4, torch.device("cuda", 0))


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("0", False)])
def test_symm_mem_is_on_unless_nanovllm_symm_mem_is_0(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("NANOVLLM_SYMM_MEM", raising=False)
    else:
        monkeypatch.setenv("NANOVLLM_SYMM_MEM", value)
    assert ar.symm_mem_requested() is expected


class FakeSymmMem:
    """Stands in for the buffer: records what it reduced, fits what ar.fits accepts under 1 KB."""

    def __init__(self):
        self.reduced = []

    def fits(self, x):
        return ar.fits(x.dtype, x.numel() * x.element_size(), x.is_contiguous(), 1024)

    def __call__(self, x):
        self.reduced.append(x)
        return x.mul_(2)  # what a sum over 2 equal ranks gives


def test_all_reduce_routes_fitting_messages_to_the_buffer_and_the_rest_to_the_collective(monkeypatch):
    fake, collective = FakeSymmMem(), []
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 2)
    monkeypatch.setattr(parallel_state, "_SYMM_MEM", fake)
    monkeypatch.setattr(parallel_state.dist, "all_reduce", lambda x: collective.append(x))
    small, big, ints = torch.ones(8, 16), torch.ones(8, 64), torch.ones(8, 16, dtype=torch.int32)
    assert parallel_state.all_reduce(small) is small and torch.equal(small, torch.full((8, 16), 2.0))
    for x in (big, ints):  # 2 KB > the buffer; integers are not summed by the kernels
        assert parallel_state.all_reduce(x) is x
    assert fake.reduced == [small] and collective == [big, ints]
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 1)  # one rank: nothing to reduce
    assert parallel_state.all_reduce(small) is small and len(fake.reduced) == 1


def two_ranks(numel: int, dtype: torch.dtype, signal_ints: int = 64):
    """Two ranks' buffers as two halves of one CPU tensor: [signal | slot] each; rank r's offsets point
    at the other half, as a peer's mapping would."""
    region = signal_ints * 4 + -(-numel * dtype.itemsize // 64) * 64
    memory = torch.zeros(2 * region, dtype=torch.uint8)
    signal = [memory[r * region:r * region + signal_ints * 4].view(torch.int32) for r in range(2)]
    slot = [memory[r * region + signal_ints * 4:][:numel * dtype.itemsize].view(dtype) for r in range(2)]
    offsets = [torch.tensor([(q - r) * region for q in range(2)]) for r in range(2)]
    return signal, slot, offsets


@pytest.mark.parametrize("numel, dtype, max_programs", [
    (1, torch.float32, 128), (3000, torch.bfloat16, 128), (4099, torch.float32, 128), (5000, torch.float16, 128),
    (5000, torch.bfloat16, 1),  # one program, three rounds of BLOCK elements
])
def test_one_shot_kernel_sums_both_ranks_slots_and_leaves_the_flags_clean(numel, dtype, max_programs):
    """Rank 0 runs while rank 1 is 'already waiting' (its flags set), then rank 1 runs: both store the
    rank-order sum, and each kernel leaves exactly its own flags on the other rank for the next call."""
    from nanovllm.kernels.all_reduce import BLOCK, all_reduce_ref, one_shot_all_reduce
    signal, slot, offsets = two_ranks(numel, dtype)
    gen = torch.Generator().manual_seed(numel)
    parts = [torch.randn(numel, generator=gen).to(dtype) for _ in range(2)]
    for r in range(2):
        slot[r].copy_(parts[r])
    programs = min(max_programs, -(-numel // BLOCK))
    signal[0][1:2 * programs:2] = 1  # flag (b, rank 1) on rank 0's side: rank 1 has arrived
    outs = [one_shot_all_reduce(slot[r], torch.empty_like(slot[r]), signal[r], offsets[r], r, 2, max_programs)
            for r in range(2)]
    expected = all_reduce_ref(parts)
    assert torch.equal(outs[0], expected) and torch.equal(outs[1], expected)
    # Rank 0 took rank 1's flags and its own; rank 1 took rank 0's and its own, and left its flags on rank 0.
    assert signal[1].sum() == 0
    assert signal[0][1:2 * programs:2].tolist() == [1] * programs and signal[0].sum() == programs


def two_rank_buffers(half_bytes: int, signal_ints: int = 64) -> list[ar.SymmMemAllReduce]:
    """Two ranks' buffers as two halves of one CPU tensor, without slots: [first part, two halves | signal]."""
    region = 2 * half_bytes + signal_ints * 4
    memory = torch.zeros(2 * region, dtype=torch.uint8)
    comms = []
    for r in range(2):
        comm = ar.SymmMemAllReduce.__new__(ar.SymmMemAllReduce)
        comm.buffer, comm.max_bytes, comm.turn, comm.timeout_s = memory[r * region:][:region], 2 * half_bytes, 0, 1.0
        comm.signal, comm.slots = comm.buffer[2 * half_bytes:].view(torch.int32), torch.zeros(2, 0, dtype=torch.uint8)
        comm.rank, comm.world_size, comm.offsets = r, 2, torch.tensor([(q - r) * region for q in range(2)])
        comms.append(comm)
    return comms


def test_copied_in_messages_take_the_two_halves_in_turn_and_are_summed_in_place():
    """A message outside the slots (the embedding's rows) is copied into a half of the buffer's first part
    and summed by the one-shot kernel into the caller's tensor. Consecutive messages take the two halves in
    turn, so a rank that runs ahead writes the half its peer is not reading. Rank 1 is 'already waiting'
    (its copy made, its flags set) when rank 0 runs; then rank 1 runs."""
    from nanovllm.kernels.all_reduce import all_reduce_ref
    comms = two_rank_buffers(half_bytes=1024)
    gen = torch.Generator().manual_seed(0)
    sent = []
    for call in range(3):
        parts = [torch.randn(5, 100, generator=gen).bfloat16() for _ in range(2)]
        assert all(comm.fits(part) for comm, part in zip(comms, parts))
        half = comms[1].buffer[call % 2 * 1024:][:1000].view(torch.bfloat16).view(5, 100)
        half.copy_(parts[1])
        comms[0].signal[1] = 1  # flag (program 0, rank 1) on rank 0's side: rank 1 has arrived
        outs = [comm(part.clone()) for comm, part in zip(comms, parts)]
        assert torch.equal(outs[0], all_reduce_ref(parts)) and torch.equal(outs[1], all_reduce_ref(parts))
        assert comms[0].signal.sum() == 1 and comms[1].signal.sum() == 0  # rank 1's own flag waits on rank 0
        comms[0].signal.zero_()
        sent.append(parts)
    for r in range(2):  # halves 0, 1, 0: the first call's message was overwritten by the third's, not the second's
        halves = comms[r].buffer[:2048].view(torch.bfloat16).view(2, 512)[:, :500]
        assert torch.equal(halves[0], sent[2][r].view(-1)) and torch.equal(halves[1], sent[1][r].view(-1))
    assert not comms[0].fits(torch.zeros(513, dtype=torch.bfloat16))  # 1026 bytes: over a half, NCCL's


@pytest.mark.parametrize("fresh", [True, False])
def test_a_group_with_a_rank_that_was_in_one_before_takes_nccl(monkeypatch, fresh):
    """torch's rendezvous would hang a second symmetric-memory group in one process; the ranks agree on the
    fallback (the smallest of their answers) before any enters it."""
    built = []
    monkeypatch.setattr(parallel_state, "_SYMM_MEM", None)
    monkeypatch.setattr(parallel_state, "symm_mem_fresh", lambda: fresh)
    monkeypatch.setattr(parallel_state, "min_over_ranks", lambda n, device: n)  # the peers are fresh
    monkeypatch.setattr(parallel_state, "SymmMemAllReduce", lambda *args, **kw: built.append(kw) or "buffer")
    monkeypatch.setattr(parallel_state.dist, "group", type("G", (), {"WORLD": type("W", (), {"group_name": "0"})}))
    monkeypatch.setattr(parallel_state.dist, "get_world_size", lambda: 2)
    if fresh:
        parallel_state._init_symm_mem(torch.device("cuda", 0), 7.0)
        assert built == [{"timeout_s": 7.0}] and parallel_state._SYMM_MEM == "buffer"
    else:
        with pytest.warns(UserWarning, match="takes NCCL"):
            parallel_state._init_symm_mem(torch.device("cuda", 0), 7.0)
        assert built == [] and parallel_state._SYMM_MEM is None


def test_only_a_process_that_never_entered_a_rendezvous_is_fresh(monkeypatch):
    monkeypatch.setattr(ar, "_RENDEZVOUS_TRIED", False)
    assert ar.symm_mem_fresh()
    monkeypatch.setattr(ar, "_RENDEZVOUS_TRIED", True)
    assert not ar.symm_mem_fresh()


class OneRankBuffer(ar.SymmMemAllReduce):
    """The real buffer class over CPU memory, without a rendezvous: a group of one rank, its kernels run by
    the interpreter; records which slot each message took."""

    def __init__(self, slot_bytes: int = ar.ONE_SHOT_SLOT_MAX_BYTES):
        self.max_bytes, self.rank, self.world_size, self.used = 0, 0, 1, []  # max_bytes 0: nothing copies in
        self.timeout_s = ar.TIMEOUT_S
        self.slots = torch.zeros(2, slot_bytes, dtype=torch.uint8)
        self.signal, self.offsets = torch.zeros(64, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
        self.set_inbox(torch.zeros(2 * slot_bytes, dtype=torch.uint8))

    def slot(self, index, shape, dtype):
        self.used.append(index)
        slot = super().slot(index, shape, dtype)
        return slot if slot is None else slot.fill_(float("nan"))  # the projection must overwrite it


@pytest.mark.parametrize("use_fused_output, triton_norms", [(False, False), (True, False), (True, True)])
def test_row_parallel_layers_alternate_slots_and_the_all_reduce_adds_and_normalizes(monkeypatch, use_fused_output,
                                                                                     triton_norms):
    """The one-shot kernel has no end barrier, so consecutive all-reduces must not share a slot: in every
    decoder layer o_proj takes slot 0 and down_proj slot 1, step after step. The projections land in the
    slots; with the fused output the all-reduce kernel adds the residual (and, with Triton norms, applies
    the next RMSNorm), and the model computes the very bits it computes without tensor parallelism."""
    from nanovllm.config import ModelConfig
    from nanovllm.layers.layernorm import RMSNorm
    from nanovllm.models.llama import LlamaForCausalLM
    config = ModelConfig("llama", 100, 48, 96, 3, num_attention_heads=6, num_key_value_heads=3, head_dim=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config, use_fused_output)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.use_triton = triton_norms
    ids, positions = torch.tensor([3, 14, 15, 92]), torch.arange(4)
    expected = model(ids, positions)
    buffer = OneRankBuffer()
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 2)  # the layers were built at 1: rank 0 of a 'group'
    monkeypatch.setattr(parallel_state, "_SYMM_MEM", buffer)
    for _ in range(2):
        torch.testing.assert_close(model(ids, positions), expected, rtol=0, atol=0)
    assert buffer.used == [0, 1] * 3 * 2
    assert buffer.signal.sum() == 0  # one rank meets itself: every flag it set, it took back


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_all_reduce_add_rmsnorm_kernel_on_two_ranks(dtype):
    """Both ranks store the rank-order sum + residual and its RMSNorm, as all_reduce then add_rmsnorm
    round them; an odd width, a strided residual, and more rows than programs (2, from the flags' room)."""
    from nanovllm.kernels import all_reduce as kernels
    from nanovllm.kernels.add_rmsnorm import add_rmsnorm
    rows, n, programs = 5, 200, 2
    signal, slot, offsets = two_ranks(rows * n, dtype, signal_ints=2 * programs)
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(rows, n, generator=gen).to(dtype) for _ in range(2)]
    residual = torch.randn(rows, 2 * n, generator=gen).to(dtype)[:, :n]  # row stride 2n
    weight = torch.rand(n, generator=gen) + 0.5
    for r in range(2):
        slot[r].copy_(parts[r].view(-1))
    signal[0][1::2] = 1  # rank 1 has arrived
    expected = kernels.all_reduce_add_rmsnorm_ref(parts, residual, weight, 1e-6)
    for r in range(2):
        stream, normed = kernels.one_shot_all_reduce_add_rmsnorm(slot[r].view(rows, n), residual, weight, 1e-6,
                                                                 signal[r], offsets[r], r, 2)
        assert torch.equal(stream, expected[0])
        if dtype == torch.float32:  # the add_rmsnorm kernel's very bits (the interpreter truncates bf16 casts)
            assert torch.equal(normed, add_rmsnorm(kernels.all_reduce_ref(parts), residual.clone(), weight, 1e-6)[0])
        else:
            torch.testing.assert_close(normed, expected[1], rtol=1e-2, atol=1e-2)
    stream, normed = kernels.one_shot_all_reduce_add_rmsnorm(slot[0].view(rows, n), None, None, 1e-6, signal[0],
                                                             offsets[0], 0, 2)
    assert normed is None and torch.equal(stream, kernels.all_reduce_ref(parts))


def test_slots_take_what_fits_and_know_their_own():
    comm = OneRankBuffer(slot_bytes=1024)
    assert comm.slot(0, (0, 4096), torch.bfloat16) is None  # nothing to send
    assert comm.slot(1, (513,), torch.bfloat16) is None  # 1026 bytes: over the slot, copied in instead
    whole, small = comm.slot(1, (512,), torch.bfloat16), comm.slot(0, (8,), torch.float32)
    assert comm.in_slot(whole) and comm.in_slot(small) and whole.data_ptr() == small.data_ptr() + 1024
    assert not comm.in_slot(torch.zeros(8)) and not comm.in_slot(comm.slots[1, 1024:])  # past the end: empty



@pytest.mark.parametrize("rows, n, num_calls", [(5, 200, 2), (2, 64, 4), (1, 33, 128)])
def test_push_kernel_fills_the_peer_inbox_empties_its_own_and_alternates_halves(rows, n, num_calls):
    """The push variant on two ranks' inboxes (two halves of one CPU tensor), two calls in a row. The
    interpreter runs one rank at a time, so rank 1's push into rank 0's inbox is staged first; each kernel
    must then leave the peer's inbox holding its partial (its -0.0s as +0.0s, never EMPTY), its own inbox
    EMPTY again, every entry of its count of calls one up, and store the pull kernel's bits (which a
    -0.0 in both partials does not change)."""
    from nanovllm.kernels import all_reduce as kernels
    m = -(-rows * n // 8) * 8 + 8  # inbox elements per message, a little over the message
    memory = torch.full((2, 2, 2, m), kernels.EMPTY_BITS, dtype=torch.int16)  # (rank, half, source, m)
    offsets = [torch.tensor([(q - r) * memory[0].numel() * 2 for q in range(2)]) for r in range(2)]
    calls = [torch.zeros(num_calls, dtype=torch.int32) for _ in range(2)]
    gen = torch.Generator().manual_seed(rows)
    residual, weight = torch.randn(rows, n, generator=gen).bfloat16(), torch.rand(n, generator=gen) + 0.5
    for call in range(2):
        parts = [torch.randn(rows, n, generator=gen).bfloat16() for _ in range(2)]
        parts[0][0, :3], parts[1][0, :2] = -0.0, -0.0  # both -0.0 at 0 and 1, -0.0 + x at 2
        sent = [p.view(torch.int16).masked_fill(p.view(torch.int16) == kernels.EMPTY_BITS, 0).view(-1) for p in parts]
        memory[0, call, 1, :rows * n] = sent[1]  # rank 1 has pushed
        expected = kernels.all_reduce_add_rmsnorm_ref(parts, residual, weight, 1e-6)
        for r in range(2):
            stream, normed = kernels.push_all_reduce_add_rmsnorm(parts[r], residual, weight, 1e-6, memory[r],
                                                                 calls[r], offsets[r], r, 2)
            assert torch.equal(stream, expected[0])
            torch.testing.assert_close(normed, expected[1], rtol=1e-2, atol=1e-2)
            assert torch.equal(memory[1 - r, call, r, :rows * n], sent[r])  # in the peer's inbox, this half
            assert calls[r].tolist() == [call + 1] * num_calls
            if r == 0:  # rank 0 read what rank 1 staged, and emptied it
                assert (memory[0] == kernels.EMPTY_BITS).all()
        memory[0, call, 1] = kernels.EMPTY_BITS  # rank 1's real push: the one rank 0 read above
        assert (memory[1] == kernels.EMPTY_BITS).all() and (memory[0] == kernels.EMPTY_BITS).all()
    alone = torch.full((2, 1, m), kernels.EMPTY_BITS, dtype=torch.int16)  # one rank: no peer to wait on
    stream, normed = kernels.push_all_reduce_add_rmsnorm(parts[0], None, None, 1e-6, alone, calls[0],
                                                         offsets[0][:1], 0, 1)
    assert normed is None and torch.equal(stream, parts[0])


def test_add_rmsnorm_pushes_16_bit_messages_that_fit_the_inbox_and_pulls_the_rest(monkeypatch):
    from nanovllm.kernels import all_reduce as kernels
    calls = []
    monkeypatch.setattr(kernels, "push_all_reduce_add_rmsnorm", lambda slot, *a, **kw: calls.append("push"))
    monkeypatch.setattr(kernels, "one_shot_all_reduce_add_rmsnorm", lambda slot, *a, **kw: calls.append("pull"))
    comm = OneRankBuffer(slot_bytes=4096)  # an inbox of 2 x 1 x 4096 bytes
    residual, weight = torch.zeros(4, 512), torch.ones(512)
    for shape, dtype in [((1, 8), torch.bfloat16), ((4, 512), torch.float16), ((4, 512), torch.float32),
                         ((5, 512), torch.bfloat16)]:  # the last: 5120 bytes, over the inbox
        comm.add_rmsnorm(torch.zeros(shape, dtype=dtype), residual, weight, 1e-6)
    comm.push_max_bytes = 0  # NANOVLLM_PUSH_MAX_BYTES=0
    comm.add_rmsnorm(torch.zeros(1, 8, dtype=torch.bfloat16), residual, weight, 1e-6)
    assert calls == ["push", "push", "pull", "pull", "pull"]
