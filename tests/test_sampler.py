"""The sampler against transformers' logits processors and torch references."""
from dataclasses import dataclass

import pytest
import torch
from transformers.generation import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanovllm.engine.model_runner import graph_sampling
from nanovllm.layers.sampler import (
    Sampler,
    SamplingBatch,
    compute_prompt_logprobs,
    filter_logits,
    gather_logprobs,
)
from nanovllm.sampling_params import SamplingParams

V = 257  # odd vocabulary size, to catch masking and padding bugs
EOS = 3


@dataclass
class FakeSeq:
    """The fields of engine.sequence.Sequence that the sampler reads."""
    sampling_params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    index: int = 0

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def make_seq(prompt=(1, 2), output=(), seed: int | None = None, **params) -> FakeSeq:
    return FakeSeq(SamplingParams(seed=seed, **params), [*prompt, *output], len(prompt))


def random_logits(rows: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def process(logits: torch.Tensor, seqs: list[FakeSeq]) -> torch.Tensor:
    return Sampler.process_logits(logits.clone(), SamplingBatch.build(seqs, "cpu", logits.shape[1], [EOS]))


def sample(logits: torch.Tensor, seqs: list[FakeSeq]):
    return Sampler()(logits, SamplingBatch.build(seqs, "cpu", logits.shape[1], [EOS]))


def assert_same_masked(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.isinf(), expected.isinf())
    finite = ~expected.isinf()
    torch.testing.assert_close(actual[finite], expected[finite])


def test_repetition_penalty_matches_hf():
    seqs = [make_seq(prompt=[5, 9, 9], output=[11, 5, 200], repetition_penalty=1.3),
            make_seq(prompt=[7], output=[], repetition_penalty=0.7),
            make_seq(prompt=[1, 2, 3], output=[4], repetition_penalty=1.0),
            make_seq(prompt=list(range(0, V, 4)), output=[V - 1], repetition_penalty=2.0)]
    logits = random_logits(len(seqs))
    actual = process(logits, seqs)
    for i, seq in enumerate(seqs):
        hf = RepetitionPenaltyLogitsProcessor(seq.sampling_params.repetition_penalty)
        expected = hf(torch.tensor([seq.token_ids]), logits[i:i + 1].clone())[0]
        torch.testing.assert_close(actual[i], expected)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    seqs = [make_seq(prompt=[8, 8, 8], output=[8, 4, 4, 4, 100], frequency_penalty=0.5, presence_penalty=1.5),
            make_seq(prompt=[4], output=[4, 4], frequency_penalty=-1.0),
            make_seq(prompt=[4], output=[4, 9], presence_penalty=0.0)]
    logits = random_logits(len(seqs))
    expected = logits.clone()
    for i, seq in enumerate(seqs):
        p = seq.sampling_params
        for token in set(seq.completion_token_ids):
            count = seq.completion_token_ids.count(token)
            expected[i, token] -= p.frequency_penalty * count + p.presence_penalty
    torch.testing.assert_close(process(logits, seqs), expected)


WARPER_ROWS = [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8), dict(min_p=0.2),
               dict(temperature=0.5, top_k=40, top_p=0.9, min_p=0.05), dict(top_k=V + 10, top_p=0.3),
               dict(temperature=2.0), dict(top_k=1), dict(top_p=1e-6)]


def hf_warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    warpers = [TemperatureLogitsWarper(params.temperature)]
    warpers += [TopKLogitsWarper(params.top_k)] if params.top_k > 0 else []
    warpers += [TopPLogitsWarper(params.top_p)] if params.top_p < 1 else []
    warpers += [MinPLogitsWarper(params.min_p)] if params.min_p > 0 else []
    scores = logits[None].clone()
    for warper in warpers:
        scores = warper(torch.zeros(1, 1, dtype=torch.long), scores)
    return scores[0]


@pytest.mark.parametrize("only_top_k", [False, True])
def test_temperature_top_k_top_p_min_p_match_hf(only_top_k):
    rows = [r for r in WARPER_ROWS if "top_p" not in r and "min_p" not in r] if only_top_k else WARPER_ROWS
    seqs = [make_seq(**row) for row in rows]
    logits = random_logits(len(seqs), seed=1)
    actual = process(logits, seqs)
    for i, seq in enumerate(seqs):
        assert_same_masked(actual[i], hf_warp(logits[i], seq.sampling_params))


def graph_filter(logits: torch.Tensor, seqs: list[FakeSeq]) -> torch.Tensor:
    """filter_logits with each row's settings as the engine's FILTER graphs get them."""
    return filter_logits(logits, *torch.tensor([graph_sampling(s, logits.shape[1]) for s in seqs]).T)


def test_filter_logits_masks_match_the_sampler_and_hf():
    """What a FILTER graph does off CUDA (all rows at once, fixed shapes) masks what the eager Sampler and
    HF's warpers mask; greedy rows keep every logit, undivided."""
    seqs = [make_seq(**row) for row in WARPER_ROWS] + [make_seq(temperature=0.0, top_k=2, top_p=0.5)]
    logits = random_logits(len(seqs), seed=4)
    actual = graph_filter(logits, seqs)
    eager = process(logits, seqs)
    for i, seq in enumerate(seqs[:-1]):
        assert_same_masked(actual[i], eager[i])
        assert_same_masked(actual[i], hf_warp(logits[i], seq.sampling_params))
    assert torch.equal(actual[-1], logits[-1])


def test_filter_logits_top_k_and_min_p_hold_at_bf16_ties():
    """bf16 logits tie often; top-k (ties at the k-th value kept) and min-p mask by value, so sorting the bf16
    keys gives the masks of their float32 values whatever order the ties take."""
    seqs = [make_seq(temperature=0.9, top_k=k) for k in (1, 7, 50)] + [make_seq(temperature=0.6, min_p=0.1)]
    logits = random_logits(len(seqs), seed=5).round()  # ~20 values over 257 tokens: ties everywhere
    actual = graph_filter(logits.to(torch.bfloat16), seqs)
    assert_same_masked(actual, process(logits.to(torch.bfloat16).float(), seqs))
    kept = (~actual.isinf()).sum(dim=-1)[:3]
    assert (kept >= torch.tensor([1, 7, 50])).all() and (kept > torch.tensor([1, 7, 50])).any()  # ties kept


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = random_logits(5)
    logits[0, [7, 30, 200]] = 100.0  # a three-way tie
    seqs = [make_seq(temperature=0.0) for _ in range(5)]
    out = sample(logits, seqs)
    assert out.token_ids.tolist() == [7, *logits[1:].argmax(dim=-1).tolist()]
    assert out.logprobs is None  # not asked for


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = random_logits(6, seed=2)
    seqs = [make_seq(temperature=0.0 if i % 2 else 1.5, top_p=0.9) for i in range(6)]
    tokens = sample(logits, seqs).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))


def test_penalties_change_the_greedy_choice():
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11] = 2.0, 1.5
    def greedy_token(**params) -> int:
        return sample(logits, [make_seq(temperature=0, **params)]).token_ids.item()

    assert greedy_token(output=[10]) == 10
    assert greedy_token(output=[10], presence_penalty=1.0) == 11
    assert greedy_token(prompt=[10], repetition_penalty=2.0) == 11


def test_sampler_leaves_the_logits_alone():
    logits = random_logits(3)
    before = logits.clone()
    sample(logits, [make_seq(temperature=0), make_seq(top_k=3, repetition_penalty=1.5, output=[1]),
                    make_seq(top_p=0.5, min_p=0.1)])
    assert torch.equal(logits, before)


def sample_steps(seqs: list[FakeSeq], row: int, steps: int = 30) -> list[int]:
    """Tokens of one row over several steps: it sees the same logits wherever it sits; the others vary."""
    tokens = []
    for step in range(steps):
        logits = random_logits(len(seqs), seed=500 + step)
        logits[row] = random_logits(1, seed=100 + step)[0]
        tokens.append(sample(logits, seqs).token_ids[row].item())
    return tokens


def test_seeded_row_is_independent_of_the_batch():
    def seeded():
        return make_seq(seed=1234, temperature=1.0, top_p=0.95)

    alone = sample_steps([seeded()], row=0)
    batched = sample_steps([make_seq(), seeded(), make_seq(seed=7), make_seq(temperature=0)], row=1)
    moved = sample_steps([make_seq(seed=99), make_seq(), make_seq(top_k=4), seeded()], row=3)
    assert alone == batched == moved
    assert sample_steps([make_seq(seed=1235, temperature=1.0, top_p=0.95)], row=0) != alone


def test_seeded_row_draws_the_same_numbers_with_and_without_a_min_tokens():
    """At one position: a seeded row with a min_tokens to reach takes the processed logits (here nothing is
    masked: ignore_eos, no stop ids), the same row without one the raw ones; at temperature 1 and no filters
    both draw by the same numbers from the same scores, so the same tokens, and not the argmax."""
    def tokens(**extra):
        seq = make_seq(seed=21, temperature=1.0, ignore_eos=True, **extra)
        return [sample(random_logits(1, seed=40 + step) * 0.3, [seq]).token_ids.item() for step in range(12)]
    pending = tokens(min_tokens=5)
    assert pending == tokens()
    assert pending != [random_logits(1, seed=40 + step)[0].argmax().item() for step in range(12)]


def assert_matches_distribution(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson's chi-square over the tokens that have probability, plus no draw of an impossible token."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0
    expected = probs.double() * tokens.numel()
    support = probs > 0
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert chi2 < 30.0, (chi2, counts, expected)  # df <= 7: p < 1e-4 under the null


@pytest.mark.parametrize("seeded", [False, True, "processed"])
def test_sampling_frequencies_match_the_distribution(seeded):
    """Unseeded rows, seeded ones (drawn as the graphs draw, from the raw logits) and seeded ones with a
    min_tokens to reach (drawn from the processed logits, already divided by the temperature)."""
    torch.manual_seed(0)
    draws = 20000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, 1.5, -3.0, 0.2])
    params = dict(temperature=0.7, top_k=6)
    if seeded == "processed":
        params.update(min_tokens=1, ignore_eos=True)  # nothing masked, but the processed path
    seqs = [make_seq(seed=i if seeded else None, **params) for i in range(draws)]
    tokens = sample(base.expand(draws, -1).contiguous(), seqs).token_ids
    kept = base.clone()
    kept[base < base.topk(6).values[-1]] = -float("inf")
    assert_matches_distribution(tokens, (kept / 0.7).softmax(dim=-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = random_logits(16, seed=3)
    argmax = logits.argmax(dim=-1)
    assert torch.equal(sample(logits, [make_seq(top_k=1, temperature=1.5)] * 16).token_ids, argmax)
    assert torch.equal(sample(logits, [make_seq(top_p=1e-6, temperature=1.5)] * 16).token_ids, argmax)


def test_min_p_keeps_only_tokens_near_the_top():
    torch.manual_seed(0)
    base = torch.tensor([3.0, 2.9, 2.5, 1.0, 0.0, -1.0])  # probs relative to the top: 1, .90, .61, .14, ...
    draws = 2000
    tokens = sample(base.expand(draws, -1).contiguous(), [make_seq(min_p=0.5)] * draws).token_ids
    assert set(tokens.tolist()) == {0, 1, 2}
    kept = base.clone()
    kept[3:] = -float("inf")
    assert_matches_distribution(tokens, kept.softmax(dim=-1))


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.full((4, V), -30.0)  # leaves nothing else to sample
    logits[:, EOS], logits[:, 9], logits[:, 20] = 10.0, 9.0, 8.0
    seqs = [make_seq(output=[5], min_tokens=2, temperature=0, stop_token_ids=[9]),
            make_seq(output=[5, 6], min_tokens=2, temperature=0, stop_token_ids=[9]),
            make_seq(output=[], min_tokens=1, temperature=0, ignore_eos=True, stop_token_ids=[9]),
            make_seq(output=[], min_tokens=1, top_k=2, stop_token_ids=[9, V + 5])]
    processed = process(logits, seqs)
    assert processed[0, [EOS, 9]].isinf().all() and processed[1, [EOS, 9]].isfinite().all()
    assert processed[2, EOS] == 10.0 and processed[2, 9].isinf()  # ignore_eos: EOS does not stop, no mask
    assert sample(logits, seqs).token_ids.tolist() == [20, EOS, EOS, 20]


def test_logprobs_are_of_the_raw_distribution_with_ranks():
    logits = random_logits(4, seed=4)
    seqs = [make_seq(temperature=0.5, top_k=3, logprobs=5, seed=1), make_seq(temperature=0, logprobs=0),
            make_seq(top_p=0.5, logprobs=2, seed=2), make_seq(repetition_penalty=1.5, output=[3], logprobs=1)]
    out = sample(logits, seqs)
    expected = logits.log_softmax(dim=-1)
    rows = torch.arange(4)
    torch.testing.assert_close(out.logprobs, expected[rows, out.token_ids])
    ranks = [1 + int((expected[i] > expected[i, t]).sum()) for i, t in enumerate(out.token_ids.tolist())]
    assert out.ranks.tolist() == ranks
    assert out.ranks[1] == 1  # greedy takes the top token
    top = expected.sort(dim=-1, descending=True)
    assert out.top_ids.shape == (4, 5)  # k = the most any row asked for
    assert torch.equal(out.top_ids, top.indices[:, :5])
    torch.testing.assert_close(out.top_logprobs, top.values[:, :5])


def test_compute_prompt_logprobs_in_chunks():
    logits = random_logits(7, seed=5)
    targets = torch.tensor([0, 5, 256, 3, 3, 100, 17])
    whole = gather_logprobs(logits, targets, 3)
    chunked = compute_prompt_logprobs(logits, targets, 3, chunk_size=3)
    for actual, name in zip(chunked, ("logprobs", "ranks", "top_ids", "top_logprobs")):
        torch.testing.assert_close(actual, getattr(whole, name))
    torch.testing.assert_close(whole.logprobs, logits.log_softmax(dim=-1)[torch.arange(7), targets])
    logprobs, ranks, top_ids, top_logprobs = compute_prompt_logprobs(logits[:0], targets[:0], 2)
    assert logprobs.shape == ranks.shape == (0,) and top_ids.shape == top_logprobs.shape == (0, 2)


# ---- the in-graph sampling kernel (kernels/sample.py; Triton's interpreter on CPU, compiled on CUDA) ----
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_sample_kernel_draws_do_not_depend_on_the_chunking(monkeypatch):
    """Each (row, vocabulary index) has its own Philox number, so splitting a row over more programs
    changes no draw (so the one-chunk chi-square test in test_triton_kernels.py covers every chunking);
    greedy rows take the argmax with ties to the lowest index, here across chunks."""
    from nanovllm.kernels import sample as kernel
    rows, vocab, device = 4, 2500, KERNEL_DEVICE  # 2500: a partial last chunk at every chunk size below
    logits = random_logits(rows, vocab, seed=2)
    logits[0, [300, 2200]] = 50.0  # a tie across chunks: the lower index wins
    logits, temps = logits.to(device), torch.tensor([0.0, 0.7, 1.0, 2.0], device=device)
    seed = torch.tensor([123], dtype=torch.int64, device=device)
    out = lambda: torch.empty(rows, dtype=torch.int64, device=device)  # noqa: E731
    draws = {}
    for chunk in (4096, 1024, 512):
        monkeypatch.setattr(kernel, "chunk_size", lambda rows, chunk=chunk: chunk)
        workspace = kernel.sample_workspace(rows, vocab, device)
        assert workspace.shape == (rows, 2, -(-vocab // chunk))
        draws[chunk] = kernel.sample(logits, temps, seed, out(), workspace)
    assert draws[4096][0] == 300
    assert torch.equal(draws[4096], draws[1024]) and torch.equal(draws[4096], draws[512])
    other = kernel.sample(logits, temps, seed + 1, out())
    assert other[0] == 300 and not torch.equal(other[1:], draws[512][1:])  # a new seed, new draws



def test_sample_kernel_chunks_by_batch():
    """A few rows take narrow chunks, many rows wide ones (chunk_size); one workspace, made for the graphs'
    largest batch, serves both, and a smaller batch's draws are the rows' own whatever the chunking."""
    from nanovllm.kernels import sample as kernel
    assert kernel.chunk_size(1) == kernel.chunk_size(32) == kernel.SMALL_CHUNK < kernel.CHUNK == kernel.chunk_size(33)
    rows, vocab, device = 40, 5000, KERNEL_DEVICE  # 5 narrow chunks or 2 wide ones a row
    logits = random_logits(rows, vocab, seed=4).to(device)
    temps = torch.linspace(0.0, 2.0, rows, device=device)
    seed = torch.tensor([9], dtype=torch.int64, device=device)
    workspace = kernel.sample_workspace(rows, vocab, device)
    assert workspace.shape == (rows, 2, -(-vocab // kernel.SMALL_CHUNK))
    many = kernel.sample(logits, temps, seed, torch.empty(rows, dtype=torch.int64, device=device), workspace)
    few = kernel.sample(logits[:3], temps[:3], seed, torch.empty(3, dtype=torch.int64, device=device), workspace)
    assert torch.equal(few, many[:3]) and many[0] == logits[0].argmax()


def test_seeded_rows_draw_the_references_numbers_wherever_they_sit():
    """A row with a key of its own draws by Philox(key; index // 4, position, 1): the kernel and sample_ref
    (philox_uniforms, the same Philox in torch) pick the same token at each of 16 positions of a flat row,
    where any other number would pick another; the same key and position give the same token in any row of
    any batch, under any batch seed; another key gives other tokens; a greedy row keeps the argmax."""
    from nanovllm.kernels import sample as kernel
    vocab, device = 2501, KERNEL_DEVICE  # an odd vocabulary: its last group of 4 is partial
    row = random_logits(1, vocab, seed=8)[0].to(device)
    logits = row.expand(18, vocab).contiguous()
    temps = torch.full((18,), 40.0, device=device)  # nearly flat: each draw is up to its numbers
    temps[16] = 0.0
    keys = torch.tensor([2**62 + 3] * 16 + [2**62 + 3, 11], device=device)
    positions = torch.tensor([*range(16), 5, 0], device=device)
    seed = torch.tensor([1], dtype=torch.int64, device=device)
    out = lambda n: torch.empty(n, dtype=torch.int64, device=device)  # noqa: E731
    drawn = kernel.sample(logits, temps, seed, out(18), keys=(keys, positions))
    ref = kernel.sample_ref(logits, temps, out(18), keys=(keys, positions))
    assert torch.equal(drawn, ref) and drawn[16] == row.argmax()
    assert len(set(drawn[:16].tolist())) >= 14
    # Row 5 (position 5) again: alone, third in a smaller batch of other rows, under other batch seeds.
    alone = kernel.sample(logits[:1], temps[:1], seed + 1, out(1), keys=(keys[5:6], positions[5:6]))
    mixed = torch.stack([random_logits(1, vocab, seed=9)[0].to(device), row, row, row])
    mixed_keys = torch.tensor([-1, 4, 2**62 + 3, -1], device=device), torch.tensor([5, 5, 5, 5], device=device)
    moved = kernel.sample(mixed, temps[:4], seed + 2, out(4), keys=mixed_keys)
    assert alone[0] == moved[2] == drawn[5]
    other_key = kernel.sample(logits[:16], temps[:16], seed, out(16), keys=(keys[:16] + 1, positions[:16]))
    assert (other_key != drawn[:16]).sum() >= 12


def test_sample_ref_draws_from_torchs_generator_only_for_the_rows_that_race():
    """sample_ref (the CPU draw): greedy rows take the argmax and rows with keys their Philox draw, neither
    touching torch's generator; the unseeded rows at a temperature race over exponentials drawn for them
    alone, so a batch of them draws what they would draw by themselves."""
    from nanovllm.kernels import sample as kernel
    logits = random_logits(5, 300, seed=4)
    temps = torch.tensor([0.0, 0.8, 1.5, 0.0, 0.6])
    keys = torch.tensor([-1, 7, -1, 9, -1]), torch.arange(5) + 3
    torch.manual_seed(0)
    state = torch.get_rng_state()
    no_race = kernel.sample_ref(logits[:2], temps[:2], torch.empty(2, dtype=torch.int64),
                                keys=(keys[0][:2], keys[1][:2]))
    assert torch.equal(torch.get_rng_state(), state) and no_race[0] == logits[0].argmax()
    torch.manual_seed(1)
    drawn = kernel.sample_ref(logits, temps, torch.empty(5, dtype=torch.int64), keys=keys)
    torch.manual_seed(1)
    alone = kernel.sample_ref(logits[[2, 4]], temps[[2, 4]], torch.empty(2, dtype=torch.int64))
    assert torch.equal(drawn[[2, 4]], alone) and drawn[1] == no_race[1] and drawn[3] == logits[3].argmax()


def test_sample_kernel_over_vocabulary_slices_equals_the_whole_row(monkeypatch):
    """Tensor parallelism: each rank's first pass over its slice (the last one short), then the second pass
    over the ranks' gathered pairs, draws exactly what one pass over the whole row draws, rows with their own
    keys included."""
    from nanovllm.kernels import sample as kernel
    monkeypatch.setattr(kernel, "CHUNK", 512)
    rows, vocab, tp, device = 8, 2501, 2, KERNEL_DEVICE
    # 1251: rank 1 holds 1250 tokens and a padding column, and starts at an index that is not a multiple of
    # 4, so its random numbers come one Philox call per token (rank 0's: one per 4 tokens), the same ones.
    width = -(-vocab // tp)
    logits = random_logits(rows, vocab, seed=3)
    logits[0, [100, 1300]] = 50.0  # a greedy tie across ranks: rank 0's index wins
    logits, temps = logits.to(device), torch.tensor([0.0, 0.5, 1.0, 3.0, 0.7, 1.5, 2.0, 5.0], device=device)
    seed = torch.tensor([77], dtype=torch.int64, device=device)
    keys = (torch.tensor([-1, 3, -1, 8, 2**40, -1, 3, -1], device=device), torch.arange(rows, device=device) + 30)
    workspaces = torch.stack([kernel.sample_workspace(rows, width, device, kernel.CHUNK)  # (tp, B, 2, C)
                              for _ in range(tp)])
    for rank in range(tp):
        part = logits[:, rank * width:(rank + 1) * width]
        kernel.chunk_bests(part, temps, seed, workspaces[rank], rank * width, keys=keys)
    sharded = kernel.pick_bests(workspaces, torch.empty(rows, dtype=torch.int64, device=device))
    whole = kernel.sample(logits, temps, seed, torch.empty(rows, dtype=torch.int64, device=device), keys=keys)
    assert sharded[0] == 100 and torch.equal(sharded, whole)
    seeded = [1, 3, 4, 6]
    ref = kernel.sample_ref(logits, temps, torch.empty(rows, dtype=torch.int64, device=device), keys=keys)
    assert torch.equal(whole[seeded], ref[seeded])


@pytest.mark.parametrize("dtype,vocab,step", [(torch.bfloat16, 3000, None), (torch.float16, 3000, None),
                                             (torch.bfloat16, 3000, (2, 64))] + (
    [(torch.bfloat16, 151936, None)] if KERNEL_DEVICE == "cuda" else []))  # Qwen3's vocabulary on a GPU
def test_top_k_top_p_kernels_keep_what_filter_logits_keeps(dtype, vocab, step, monkeypatch):
    """The histogram thresholds (kernels/top_k_top_p.py) plus the draw's min-p keep exactly what
    filter_logits keeps, ties included; the draw takes a kept token (the argmax on greedy rows) and leaves
    the histogram zeroed for the next step. step: a walk of 2 x 64 keys a step, which takes many steps."""
    from nanovllm.kernels import sample as kernel
    from nanovllm.kernels import top_k_top_p
    if step:
        monkeypatch.setattr(top_k_top_p, "_ROWS", step[0])
        monkeypatch.setattr(top_k_top_p, "_TILE", step[1])
    device = KERNEL_DEVICE  # 3000: three chunks of the first pass, the last one partial
    rows = [(0.0, vocab, 1.0, 0.0), (0.8, 1, 1.0, 0.0), (0.8, 40, 1.0, 0.0), (1.3, vocab, 0.6, 0.0),
            (0.5, 25, 0.9, 0.05), (1.0, vocab, 0.97, 0.0), (0.7, vocab, 1.0, 0.2), (1.0, vocab - 1, 1e-6, 0.0),
            (2.0, 700, 0.999, 0.0), (1.0, vocab + 5, 1.0, 0.0)]
    temps, top_k, top_p, min_p = torch.tensor(rows, device=device).T.contiguous()
    logits = (random_logits(len(rows), vocab, seed=6) * 0.7).to(device=device, dtype=dtype)  # ties: 16 bits
    logits[5] = (logits[5] * 8).round() / 8  # many ties
    ws = top_k_top_p.FilterWorkspace.make(len(rows), vocab, device)
    top_k_top_p.thresholds(logits, temps, top_k, top_p, ws)
    assert torch.equal(ws.row_max, logits.float().amax(dim=-1))
    keep = kernel.Keep(ws.keep, ws.row_max, min_p, ws.hist)
    kept = keep.mask_ref(logits, temps)
    expected = filter_logits(logits, temps, top_k, top_p, min_p).isfinite()
    assert torch.equal(kept, expected), (kept.sum(-1), expected.sum(-1))
    fortieth = logits[2].float().topk(40).values[-1]
    assert kept.sum(dim=-1).tolist()[:2] == [vocab, 1] and kept[5].sum() > 1
    assert kept[2].sum() == (logits[2] >= fortieth).sum() >= 40  # ties at the 40th value stay
    counted = [vocab if t > 0 and (k < vocab or p < 1) else 0 for t, k, p, _ in rows]  # rows with thresholds
    assert ws.hist.sum(dim=-1).tolist() == counted and counted.count(0) == 3
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    out = torch.empty(len(rows), dtype=torch.int64, device=device)
    for i in range(3):
        kernel.sample(logits, temps, seed + i, out, keep=keep)
        assert kept[torch.arange(len(rows)), out].all()
        assert out[0] == logits[0].float().argmax() and out[1] == logits[1].float().argmax()
    assert not ws.hist.any()


def test_penalty_history_fills_each_placeholder_from_its_own_row():
    """In an overlapped step a seq's last id is a PLACEHOLDER; build() takes it from the step in flight's ids
    on the device, each seq from its own row there (not in order), for both penalty tensors. A seq not in
    that step has no placeholder; a placeholder with no row to take it from is a clear error."""
    from nanovllm.engine.sequence import PLACEHOLDER, Sequence
    vocab = 50
    seqs = [Sequence([1, 2], SamplingParams(repetition_penalty=1.5)),
            Sequence([3], SamplingParams(presence_penalty=1.0)),
            Sequence([4, 5, 6], SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5))]
    for seq, tokens in zip(seqs, ([7, PLACEHOLDER], [PLACEHOLDER], [8])):
        for t in tokens:
            seq.append_token(t)
    in_flight = torch.tensor([11, 22, 33])
    batch = SamplingBatch.build(seqs, "cpu", vocab, history=(in_flight, [2, 0, None]))
    assert batch.seen_ids.tolist() == [[1, 2, 7, 33], [vocab] * 4, [4, 5, 6, 8]]
    assert batch.output_ids.tolist() == [[vocab], [11], [8]]
    with pytest.raises(ValueError, match="placeholder"):
        SamplingBatch.build(seqs, "cpu", vocab, history=(in_flight, [None, 0, None]))
    with pytest.raises(ValueError, match="placeholder"):
        SamplingBatch.build(seqs, "cpu", vocab)
