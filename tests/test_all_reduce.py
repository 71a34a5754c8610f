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
    (torch.float16, 8192, True, False),  # torch's kernels reduce bf16 and fp32 only
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
    comm.max_bytes = max_bytes
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
    assert not ar.symm_mem_supported(3, torch.device("cuda", 0))  # no two-shot kernel for 3 ranks
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: (a, b) != (1, 2))
    assert ar.symm_mem_supported(4, torch.device("cuda", 0))
    assert not ar.symm_mem_supported(4, torch.device("cuda", 1))  # rank 1 cannot read rank 2's memory


@pytest.mark.parametrize("value, expected", [(None, False), ("1", True), ("0", False)])
def test_nanovllm_symm_mem_env_turns_it_on(monkeypatch, value, expected):
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
    small, big, half = torch.ones(8, 16), torch.ones(8, 64), torch.ones(8, 16, dtype=torch.float16)
    assert parallel_state.all_reduce(small) is small and torch.equal(small, torch.full((8, 16), 2.0))
    for x in (big, half):  # 2 KB > the buffer; fp16 is not reduced by the kernels
        assert parallel_state.all_reduce(x) is x
    assert fake.reduced == [small] and collective == [big, half]
    monkeypatch.setattr(parallel_state, "_TP_SIZE", 1)  # one rank: nothing to reduce
    assert parallel_state.all_reduce(small) is small and len(fake.reduced) == 1


def test_one_shot_below_the_threshold_two_shot_above(monkeypatch):
    calls = []
    fake_ops = type("Ops", (), {
        "one_shot_all_reduce_copy_out": staticmethod(lambda symm, x, op, group, out: calls.append("one")),
        "two_shot_all_reduce_out": staticmethod(lambda symm, op, group, out: calls.append("two")),
    })
    monkeypatch.setattr(torch.ops, "symm_mem", fake_ops, raising=False)
    comm = unallocated(ar.ONE_SHOT_MAX_BYTES * 2)
    comm.group_name, comm.buffer = "0", torch.zeros(comm.max_bytes, dtype=torch.uint8)
    small = torch.ones(ar.ONE_SHOT_MAX_BYTES // 2, dtype=torch.bfloat16)
    large = torch.ones(ar.ONE_SHOT_MAX_BYTES // 2 + 2, dtype=torch.bfloat16)
    assert comm(small) is small and comm(large) is large
    assert calls == ["one", "two"]
    assert torch.equal(comm.buffer[:large.numel() * 2].view(torch.bfloat16), large)  # copied in for two-shot
