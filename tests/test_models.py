"""Our Llama / Qwen2 / Qwen3 against transformers' own implementation, on tiny random checkpoints."""
import copy
import json
import os
from contextlib import contextmanager

import pytest
import torch
from tiny_models import LLAMA3_ROPE, make_tiny_hf_model, tiny_hf_config

from nanovllm.kernels.fused_attention_output import rmsnorm_project_ref
from nanovllm.layers.attention import Attention
from nanovllm.layers.rotary_embedding import compute_inv_freq
from nanovllm.models import get_model, load_model
from nanovllm.models.qwen3 import Qwen3AttentionFused
from nanovllm.utils.context import make_context, reset_context, set_context
from nanovllm.utils.loader import load_model_config, model_config_from_hf

# name -> (tiny_models arch, config overrides): together they cover tied and untied heads, llama3 rope
# scaling, Qwen2's qkv bias, Llama's optional attention/MLP biases and Qwen3's q/k norm.
VARIANTS = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "llama3": ("llama3", dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict()),
}
PROMPT_LENS = [5, 1, 17, 9]
NUM_DECODE = 4
ATOL = 1e-4


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    """(our model, the HF model, folder) for one variant, fp32 on CPU."""
    arch, overrides = VARIANTS[request.param]
    hf_model = make_tiny_hf_model(arch, **overrides)
    path = str(tmp_path_factory.mktemp(request.param))
    hf_model.save_pretrained(path)
    model, _ = load_model(path, torch.float32, "cpu")
    return model, hf_model, path


@pytest.fixture(scope="module")
def sequences():
    """Prompt + NUM_DECODE continuation tokens per seq, fed teacher-forced so every step is comparable."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 1000, (n + NUM_DECODE,), generator=gen) for n in PROMPT_LENS]


@torch.no_grad()
def hf_logits(hf_model, token_ids: torch.Tensor) -> torch.Tensor:
    return hf_model(token_ids[None]).logits[0]  # (L, vocab)


@torch.no_grad()
def our_logits(model, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model.compute_logits(model(token_ids, positions))


@contextmanager
def paged_kv_cache(model, num_blocks: int, block_size: int):
    """Gives every Attention layer a cache filled with large garbage, so reading a slot that this test
    did not write shows in the logits; takes the caches away afterwards (the model fixture is shared)."""
    gen = torch.Generator().manual_seed(2)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = 100 * torch.randn(shape, generator=gen)
        layer.v_cache = 100 * torch.randn(shape, generator=gen)
    try:
        yield
    finally:
        reset_context()
        for layer in layers:
            layer.k_cache = layer.v_cache = torch.tensor([])


def test_cacheless_forward_matches_hf(tiny, sequences):
    model, hf_model, _ = tiny
    for seq in sequences:
        expected = hf_logits(hf_model, seq)
        logits = our_logits(model, seq, torch.arange(len(seq)))
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_cacheless_batch_matches_hf(tiny, sequences):
    """Several prompts flattened into one step without a cache: each attends only to itself."""
    model, hf_model, _ = tiny
    lens = [len(s) for s in sequences]
    tables = [list(range(n)) for n in lens]  # slots are computed but never used: there is no cache
    set_context(make_context(lens, lens, tables, block_size=1))
    try:
        logits = our_logits(model, torch.cat(sequences), torch.cat([torch.arange(n) for n in lens]))
    finally:
        reset_context()
    expected = torch.cat([hf_logits(hf_model, s) for s in sequences])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def chunk_plans() -> list[list[int]]:
    """Per seq, the tokens computed at each step: the prompt in two chunks (when it has two tokens),
    then one token per decode step. Plans of different lengths make mixed prefill + decode steps."""
    plans = []
    for n in PROMPT_LENS:
        prefill = [n] if n == 1 else [(n + 1) // 2, n // 2]
        plans.append(prefill + [1] * NUM_DECODE)
    return plans


def check_paged_steps_match_hf(model, hf_model, sequences, block_size: int, num_blocks: int) -> None:
    """Runs the chunk plans through a paged cache with shuffled block tables; every step's logits must
    match HF's logits at the same positions."""
    gen = torch.Generator().manual_seed(3)
    free = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous, shuffled block ids
    tables = [[free.pop() for _ in range(-(-len(s) // block_size))] for s in sequences]
    expected = [hf_logits(hf_model, s) for s in sequences]
    plans, computed = chunk_plans(), [0] * len(sequences)
    saw_mixed = saw_decode = False
    with paged_kv_cache(model, num_blocks, block_size):
        for step in range(max(len(p) for p in plans)):
            batch = [i for i, plan in enumerate(plans) if step < len(plan)]
            q_lens = [plans[i][step] for i in batch]
            ctx_lens = [computed[i] + q for i, q in zip(batch, q_lens)]
            context = make_context(q_lens, ctx_lens, [tables[i] for i in batch], block_size)
            saw_decode |= context.is_decode
            saw_mixed |= 1 in q_lens and not context.is_decode
            set_context(context)
            ids = torch.cat([sequences[i][ctx - q:ctx] for i, q, ctx in zip(batch, q_lens, ctx_lens)])
            positions = torch.cat([torch.arange(ctx - q, ctx) for q, ctx in zip(q_lens, ctx_lens)])
            logits = our_logits(model, ids, positions)
            want = torch.cat([expected[i][ctx - q:ctx] for i, q, ctx in zip(batch, q_lens, ctx_lens)])
            torch.testing.assert_close(logits, want, atol=ATOL, rtol=0, msg=lambda m: f"step {step}: {m}")
            for i, ctx in zip(batch, ctx_lens):
                computed[i] = ctx
    assert saw_mixed and saw_decode


def test_paged_cache_chunked_prefill_and_decode_match_hf(tiny, sequences):
    model, hf_model, _ = tiny
    check_paged_steps_match_hf(model, hf_model, sequences, block_size=4, num_blocks=32)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU run of the Triton kernels")
def test_triton_paged_attention_matches_hf(tiny, sequences):
    """The `use_triton` seam calls nanovllm.kernels.paged_attention with the right arguments."""
    pytest.importorskip("triton")
    model, hf_model, _ = tiny
    if hf_model.config.model_type != "qwen3":
        pytest.skip("one architecture is enough for the seam; the interpreter is slow")
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer.use_triton = True
    try:
        check_paged_steps_match_hf(model, hf_model, sequences, block_size=16, num_blocks=8)
    finally:
        for layer in layers:
            layer.use_triton = False


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU run of the Triton kernels")
@torch.inference_mode()  # as the runner runs steps: the graphs' buffers are inference tensors
def test_prefill_graph_steps_on_the_triton_path(tiny, sequences):
    """The prefill graphs' padded step (engine/prefill_graphs.py, uncaptured here) through the model's
    Triton path (RoPE + store kernel, varlen attention, Triton norms) gives the unpadded step's hidden
    states and leaves the same KV cache: padded tokens store nothing, padded seqs attend to nothing."""
    pytest.importorskip("triton")
    from nanovllm.engine.prefill_graphs import PrefillGraphs
    from nanovllm.models import set_use_triton
    model, hf_model, _ = tiny
    if hf_model.config.model_type != "qwen3":
        pytest.skip("one architecture is enough for the padding; the interpreter is slow")
    a, b = sequences[2], sequences[3]  # 21 and 13 tokens
    tables, block_size = [[3, 0], [5, 1]], 16
    steps = [([a[:12], b[:9]], [12, 9]), ([a[12:13], b[9:13]], [13, 13])]  # prompts, then a decode + a chunk
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    set_use_triton(model, True)
    try:
        results = []
        for padded in (False, True):
            graphs = PrefillGraphs(model, 32, 4, 2, block_size, torch.device("cpu"), capture=False)
            hidden, caches = [], []
            with paged_kv_cache(model, num_blocks=8, block_size=block_size):
                for chunks, ctx_lens in steps:
                    q_lens = [len(c) for c in chunks]
                    ids = torch.cat(chunks)
                    positions = torch.cat([torch.arange(c - q, c) for q, c in zip(q_lens, ctx_lens)])
                    if padded:
                        bucket = graphs.write_inputs(ids.tolist(), positions.tolist(), q_lens, ctx_lens, tables)
                        hidden.append(graphs.run(bucket)[:len(ids)].clone())
                    else:
                        set_context(make_context(q_lens, ctx_lens, tables, block_size))
                        hidden.append(model(ids, positions))
                        reset_context()
                caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in layers]
            results.append((hidden, caches))
    finally:
        set_use_triton(model, False)
    (eager, eager_caches), (graphed, graphed_caches) = results
    for x, y in zip(graphed, eager):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    for (k1, v1), (k2, v2) in zip(graphed_caches, eager_caches):
        torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)


def test_fused_output_gives_identical_logits(tiny, sequences):
    model, hf_model, path = tiny
    fused, _ = load_model(path, torch.float32, "cpu", use_fused_output=True)
    assert all(layer.self_attn.fuses_residual for layer in fused.model.layers)
    for seq in sequences:
        positions = torch.arange(len(seq))
        assert torch.equal(our_logits(fused, seq, positions), our_logits(model, seq, positions))


@pytest.mark.parametrize("use_fused_output", [False, True], ids=["unfused", "fused"])
def test_norm_folded_into_projections_matches_hf(tiny, sequences, use_fused_output, monkeypatch):
    """The fold's seam at one token: the decoder layers hand their norms (and the residual stream) to
    qkv_proj and gate_up_proj, which call rmsnorm_project (its torch form here: the dispatcher's CUDA
    condition forced true) with the right stream, fused output path on or off; gate_up_proj's call also
    folds SiLU-and-mul (gated). Token by token through a paged cache, every step one token, so every
    projection folds."""
    from nanovllm.kernels import fused_attention_output as fao
    from nanovllm.layers import linear
    model, hf_model, path = tiny
    if use_fused_output:
        model, _ = load_model(path, torch.float32, "cpu", use_fused_output=True)
    calls, gated = [], []
    monkeypatch.setattr(linear, "dispatches", lambda x: x.dim() == 2 and x.shape[0] == 1)
    monkeypatch.setattr(fao, "rmsnorm_project",
                        lambda *a: calls.append(a[5] is None) or gated.append(a[6]) or rmsnorm_project_ref(*a))
    norms = [layer.input_layernorm for layer in model.model.layers]
    norms += [layer.post_attention_layernorm for layer in model.model.layers]
    for norm in norms:  # the Triton norm's rounding, which the fold reproduces (never run here: M = 1)
        monkeypatch.setattr(norm, "use_triton", True)
    for layer in model.model.layers:  # and SiLU-and-mul's, folded into gate_up_proj (gated=True)
        monkeypatch.setattr(layer.mlp.act_fn, "use_triton", True)
    seq, block_size = sequences[0], 4
    expected = hf_logits(hf_model, seq)
    with paged_kv_cache(model, num_blocks=8, block_size=block_size):
        for pos in range(len(seq)):
            set_context(make_context([1], [pos + 1], [[5, 2, 7]], block_size))
            logits = our_logits(model, seq[pos:pos + 1], torch.tensor([pos]))
            torch.testing.assert_close(logits[0], expected[pos], atol=ATOL, rtol=0, msg=lambda m: f"{pos}: {m}")
    num_layers = len(model.model.layers)
    assert len(calls) == 2 * num_layers * len(seq)
    # Unfused, every norm but the first layer's input norm adds a residual; fused, none does.
    assert sum(calls) == len(seq) * (2 * num_layers if use_fused_output else 1)
    assert sum(gated) == len(calls) // 2  # gate_up_proj's, each with SiLU-and-mul


def test_qwen3_fused_attention_class(tiny):
    model, _, path = tiny
    fused, config = load_model(path, torch.float32, "cpu", use_fused_output=True)
    if config.architecture == "qwen3":
        assert all(type(layer.self_attn) is Qwen3AttentionFused for layer in fused.model.layers)


def test_bfloat16_load(tiny, sequences):
    """Weights land in bf16 directly (the rope table stays fp32); logits near HF's own bf16 model's, whose
    distance from fp32 is of the same size (~0.05 here: bf16 keeps 8 bits)."""
    model, hf_model, path = tiny
    bf16, _ = load_model(path, torch.bfloat16, "cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.model.layers[0].self_attn.rotary_emb.cos_sin_cache.dtype == torch.float32
    seq = sequences[2]
    logits = our_logits(bf16, seq, torch.arange(len(seq))).float()
    expected = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), seq).float()
    torch.testing.assert_close(logits, expected, atol=0.1, rtol=0)


def test_tied_embeddings_share_one_tensor(tiny):
    model, hf_model, _ = tiny
    tied = hf_model.config.tie_word_embeddings
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    torch.testing.assert_close(model.lm_head.weight, hf_model.lm_head.weight, atol=0, rtol=0)


def test_llama3_inv_freq_matches_hf():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = tiny_hf_config("llama3")
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    ours = compute_inv_freq(16, 10000.0, scaling)
    assert not torch.equal(ours, compute_inv_freq(16, 10000.0))  # the scaling really changes something
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


def test_unsupported_rope_type():
    with pytest.raises(ValueError, match="yarn.*default, linear, llama3"):
        compute_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def to_old_config_form(config: dict) -> dict:
    """config.json as transformers 4 wrote it: top-level rope_theta, rope_scaling with `type`, torch_dtype."""
    old = dict(config)
    rope = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    old["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    old["torch_dtype"] = old.pop("dtype")
    old.pop("head_dim")  # hidden_size / num_attention_heads gives the same 16
    return old


def test_old_and_new_config_forms_load_the_same(tiny, tmp_path):
    _, hf_model, path = tiny
    with open(os.path.join(path, "config.json")) as f:
        new = json.load(f)
    assert "rope_parameters" in new and "dtype" in new  # transformers 5 writes the new form
    configs = {}
    for form, config in (("new", new), ("old", to_old_config_form(new))):
        os.makedirs(tmp_path / form)
        (tmp_path / form / "config.json").write_text(json.dumps(config))
        configs[form] = load_model_config(str(tmp_path / form))
    assert configs["old"] == configs["new"] == load_model_config(path)
    is_llama3 = hf_model.config.rope_parameters["rope_type"] == "llama3"
    assert (configs["new"].rope_scaling is not None) == is_llama3


def test_generation_config_adds_eos_ids(tmp_path):
    config = json.loads(tiny_hf_config("llama", eos_token_id=[2, 5]).to_json_string())
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    model_config = load_model_config(str(tmp_path))
    assert model_config.eos_token_ids == [2, 5, 7]
    assert model_config.bos_token_id == 1


def test_get_model_rejects_unknown_architecture():
    config = model_config_from_hf(json.loads(tiny_hf_config("llama").to_json_string()))
    config.architecture = "gpt2"
    with pytest.raises(ValueError, match="gpt2.*llama, qwen2, qwen3"):
        get_model(config, torch.float32, "cpu")


# The default model's chat prompt ("What is the capital of France?" in SmolLM2's ChatML template with its
# default system message) and its greedy fp32 answer "The capital of France is Paris.<|im_end|>"; our
# logits on this prompt were checked against transformers' own GGUF load (max |diff| 8e-5, same argmax).
SMOLLM2_PROMPT = [1, 9690, 198, 2683, 314, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
                  407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520,
                  9531, 198]
SMOLLM2_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30, 2]


def test_default_gguf_model_greedy_through_paged_cache():
    from nanovllm.utils.default_model import default_model_path
    try:
        path = default_model_path()
        pytest.importorskip("nanovllm.utils.gguf")
    except ValueError as e:
        pytest.skip(str(e))
    model, config = load_model(path, torch.float32, "cpu")
    assert config.architecture == "llama" and config.tie_word_embeddings
    block_size, tokens = 16, list(SMOLLM2_PROMPT)
    table = [5, 2, 7, 0]  # shuffled blocks: room for 64 tokens
    with paged_kv_cache(model, num_blocks=8, block_size=block_size):
        num_computed = 0
        while len(tokens) < len(SMOLLM2_PROMPT) + len(SMOLLM2_ANSWER):
            new = tokens[num_computed:]
            set_context(make_context([len(new)], [len(tokens)], [table], block_size))
            logits = our_logits(model, torch.tensor(new), torch.arange(num_computed, len(tokens)))
            num_computed = len(tokens)
            tokens.append(int(logits[-1].argmax()))
    assert tokens[len(SMOLLM2_PROMPT):] == SMOLLM2_ANSWER
