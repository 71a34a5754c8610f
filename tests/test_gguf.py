"""GGUF loading: the real default model against transformers' own GGUF loader, and tiny synthetic files
written with gguf.GGUFWriter for each quant type, architecture and error."""
import math

import gguf
import numpy as np
import pytest
import torch
from conftest import default_gguf
from gguf import GGMLQuantizationType as Q

from nanovllm.utils.gguf import iter_gguf_weights, load_gguf_config, read_gguf, unpermute_qk


@pytest.fixture(scope="session")
def smollm_weights() -> dict[str, torch.Tensor]:
    return dict(iter_gguf_weights(default_gguf()))


def test_default_model_config():
    config = load_gguf_config(default_gguf())
    assert (config.architecture, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (1536, 9, 3)
    assert (config.head_dim, config.vocab_size, config.max_position_embeddings) == (64, 49152, 8192)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5 and config.rope_scaling is None
    assert config.tie_word_embeddings and not config.attention_bias
    assert (config.bos_token_id, config.eos_token_ids) == (1, [2])


def test_config_matches_transformers(hf_smollm):
    ours, hf = load_gguf_config(default_gguf()), hf_smollm.config
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)


def test_weights_equal_transformers(smollm_weights, hf_smollm):
    hf_state = hf_smollm.state_dict()
    assert set(smollm_weights) == set(hf_state) - {"lm_head.weight"}  # tied: the embedding is the head
    for name, weight in smollm_weights.items():
        assert weight.dtype == torch.float32 and weight.is_contiguous(), name
        if not torch.equal(weight, hf_state[name]):  # both dequantize with gguf; allow for fp32 rounding
            torch.testing.assert_close(weight, hf_state[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unpermute_matters(smollm_weights):
    # Guards the comparison above: the file's own Q/K layout differs from HF's, the other weights do not.
    tensors = read_gguf(default_gguf()).tensors
    raw_q = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, Q.Q4_1)
    raw_v = gguf.quants.dequantize(tensors["blk.0.attn_v.weight"].data, Q.Q4_1)
    assert not np.array_equal(raw_q, smollm_weights["model.layers.0.self_attn.q_proj.weight"].numpy())
    assert np.array_equal(raw_v, smollm_weights["model.layers.0.self_attn.v_proj.weight"].numpy())


def test_weights_are_writable_copies(smollm_weights):
    norm = smollm_weights["model.layers.0.input_layernorm.weight"]  # F32 in the file: memory-mapped there
    assert norm.numpy().flags.writeable
    norm.add_(0)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, HF layout -> GGUF layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 2, 3), (3, 8, 5), (4, 64, 1)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, cols):
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w[:, 0], n_head), n_head), w[:, 0])  # bias


# ---- errors -------------------------------------------------------------------------------------------

def test_truncated_file_is_a_clear_error(tmp_path):
    data = open(default_gguf(), "rb").read(5_000_000)  # header and part of the first tensor
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="truncated.gguf.*not a readable GGUF"):
        load_gguf_config(str(path))


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 100])
def test_garbage_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.gguf"):
        list(iter_gguf_weights(str(path)))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf_config(str(tmp_path / "nope.gguf"))


# ---- synthetic files -------------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 96, 40


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, Q]], **metadata) -> str:
    """A GGUF with tiny `arch` hyperparameters (`metadata` adds or overrides GGUFWriter.add_<key> values);
    `tensors` maps GGUF names to (HF-layout float32, or raw uint8 blocks; type)."""
    metadata = dict(block_count=1, context_length=256, embedding_length=HIDDEN, feed_forward_length=FFN,
                    head_count=HEADS, head_count_kv=KV_HEADS, rope_freq_base=10000.0, layer_norm_rms_eps=1e-6,
                    bos_token_id=1, eos_token_id=2) | metadata
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if value is not None:
            getattr(writer, f"add_{key}")(value)
    for name, (array, qtype) in tensors.items():
        data = array if array.dtype == np.uint8 else gguf.quants.quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def random(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def model_tensors(qtype: Q = Q.F32, qk_norm: bool = False, bias: bool = False, head: bool = False) -> dict:
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,),
              "blk.0.attn_norm.weight": (HIDDEN,), "blk.0.ffn_norm.weight": (HIDDEN,),
              "blk.0.attn_q.weight": (q_rows, HIDDEN), "blk.0.attn_k.weight": (kv_rows, HIDDEN),
              "blk.0.attn_v.weight": (kv_rows, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, q_rows),
              "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    if qk_norm:
        shapes |= {"blk.0.attn_q_norm.weight": (HEAD_DIM,), "blk.0.attn_k_norm.weight": (HEAD_DIM,)}
    if bias:
        shapes |= {f"blk.0.attn_{x}.bias": (n,) for x, n in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))}
    if head:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    # Quantize the matrices only, as llama.cpp does: norms and biases stay F32.
    return {name: (random(*shape, seed=i), qtype if len(shape) == 2 else Q.F32)
            for i, (name, shape) in enumerate(shapes.items())}


def block_error_bound(x: np.ndarray, qtype: Q) -> np.ndarray:
    """Largest round-trip error per element of llama.cpp's 32-wide block quantizers: half a step (a whole
    step for Q4_0, whose levels reach -8 steps but only +7), plus the fp16 rounding of scale and min."""
    blocks = x.reshape(-1, 32)
    amax, lo, hi = np.abs(blocks).max(1), blocks.min(1), blocks.max(1)
    step, rounding, levels, offset = {Q.Q8_0: (amax / 127, amax / 254, 127, 0),
                                      Q.Q4_0: (amax / 8, amax / 8, 8, 0),
                                      Q.Q4_1: ((hi - lo) / 15, (hi - lo) / 30, 15, np.abs(lo))}[qtype]
    bound = rounding + (levels * step + offset) * 2 ** -11 + 1e-7
    return np.repeat(bound, 32).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quant_types_round_trip(tmp_path, qtype):
    x = random(HIDDEN * 3, HIDDEN, seed=1)  # (192, 64): rows of two 32-blocks, as HF (out, in)
    path = write_gguf(tmp_path / "m.gguf", "qwen3", model_tensors() | {"blk.0.ffn_up.weight": (x, qtype)})
    y = dict(iter_gguf_weights(path))["model.layers.0.mlp.up_proj.weight"].numpy()
    assert y.shape == x.shape and y.dtype == np.float32
    if qtype == Q.F32:
        np.testing.assert_array_equal(y, x)
    elif qtype in (Q.F16, Q.BF16):
        np.testing.assert_allclose(y, x, rtol=2 ** -11 if qtype == Q.F16 else 2 ** -8, atol=0)
    else:
        err = np.abs(y - x)
        assert (err <= block_error_bound(x, qtype)).all()
        assert err.max() > 0  # really quantized


def test_llama_names_shapes_and_unpermute(tmp_path):
    tensors = model_tensors(head=True)
    hf_q, hf_k = tensors["blk.0.attn_q.weight"][0], tensors["blk.0.attn_k.weight"][0]
    tensors["blk.0.attn_q.weight"] = (llama_cpp_permute(hf_q, HEADS), Q.F32)
    tensors["blk.0.attn_k.weight"] = (llama_cpp_permute(hf_k, KV_HEADS), Q.F32)
    weights = dict(iter_gguf_weights(write_gguf(tmp_path / "llama.gguf", "llama", tensors)))
    expected = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                "lm_head.weight": (VOCAB, HIDDEN), "model.layers.0.input_layernorm.weight": (HIDDEN,),
                "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
                "model.layers.0.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
                "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
                "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
                "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
                "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
                "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN)}
    assert {name: tuple(w.shape) for name, w in weights.items()} == expected
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"].numpy(), hf_q)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.k_proj.weight"].numpy(), hf_k)
    config = load_gguf_config(str(tmp_path / "llama.gguf"))
    assert not config.tie_word_embeddings and config.head_dim == HIDDEN // HEADS


def test_qwen3_keeps_qk_layout_and_reads_head_dim(tmp_path):
    tensors = model_tensors(qk_norm=True)
    path = write_gguf(tmp_path / "qwen3.gguf", "qwen3", tensors, key_length=HEAD_DIM, value_length=HEAD_DIM)
    weights = dict(iter_gguf_weights(path))
    # llama.cpp converts Qwen2/Qwen3 without permuting: they use NeoX (rotate_half) rope like HF.
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"].numpy(),
                                  tensors["blk.0.attn_q.weight"][0])
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.k_norm.weight"].numpy(),
                                  tensors["blk.0.attn_k_norm.weight"][0])
    config = load_gguf_config(path)
    assert (config.architecture, config.head_dim, config.vocab_size) == ("qwen3", HEAD_DIM, VOCAB)
    assert config.tie_word_embeddings and not config.attention_bias


def test_qwen2_biases_and_eos_ids(tmp_path):
    tensors = model_tensors(qtype=Q.Q8_0, bias=True)
    path = write_gguf(tmp_path / "qwen2.gguf", "qwen2", tensors, eot_token_id=7)
    weights = dict(iter_gguf_weights(path))
    assert weights["model.layers.0.self_attn.k_proj.bias"].shape == (KV_HEADS * HEAD_DIM,)
    config = load_gguf_config(path)
    assert config.attention_bias and config.eos_token_ids == [2, 7] and config.bos_token_id == 1


def test_yarn_rope_scaling(tmp_path):
    yarn = dict(rope_scaling_type=gguf.RopeScalingType.YARN, rope_scaling_factor=4.0,
                rope_scaling_orig_ctx_len=32768)
    path = write_gguf(tmp_path / "yarn.gguf", "qwen2", model_tensors(), **yarn)
    assert load_gguf_config(path).rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 32768}


def llama_cpp_rope_freqs(theta: float, dim: int, factor: float, low: float, high: float, old_len: int):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.generate_extra_tensors for rope_type llama3."""
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    theta, head_dim = 500000.0, 128
    freqs = llama_cpp_rope_freqs(theta, head_dim, factor=32.0, low=1.0, high=4.0, old_len=8192)
    assert freqs.min() == 1.0 and freqs.max() == 32.0 and ((freqs > 1) & (freqs < 32)).any()  # all 3 regimes
    tensors = model_tensors() | {"rope_freqs.weight": (freqs, Q.F32)}
    path = write_gguf(tmp_path / "llama3.gguf", "llama", tensors, rope_freq_base=theta, key_length=head_dim)
    assert load_gguf_config(path).rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(iter_gguf_weights(path))
    odd = tensors | {"rope_freqs.weight": (np.sqrt(freqs), Q.F32)}
    path = write_gguf(tmp_path / "odd.gguf", "llama", odd, rope_freq_base=theta, key_length=head_dim)
    with pytest.raises(ValueError, match="rope_freqs"):
        load_gguf_config(path)


def test_unsupported_quant_type_is_named(tmp_path):
    # gguf cannot quantize to Q2_K; random blocks of the right size suffice to be refused.
    block_bytes = gguf.GGML_QUANT_SIZES[Q.Q2_K][1]
    raw = np.random.default_rng(0).integers(0, 255, (FFN, HIDDEN * 4 // 256 * block_bytes), dtype=np.uint8)
    path = write_gguf(tmp_path / "q2k.gguf", "llama", {"blk.0.ffn_up.weight": (raw, Q.Q2_K)})
    with pytest.raises(ValueError, match=r"Q2_K; supported types: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        list(iter_gguf_weights(path))


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "gemma.gguf", "gemma", model_tensors())
    for load in (load_gguf_config, lambda p: list(iter_gguf_weights(p))):
        with pytest.raises(ValueError, match="'gemma' is not supported; supported: llama, qwen2, qwen3"):
            load(path)


def test_missing_metadata_is_named(tmp_path):
    path = write_gguf(tmp_path / "bare.gguf", "llama", model_tensors(), feed_forward_length=None)
    with pytest.raises(ValueError, match="lacks metadata llama.feed_forward_length"):
        load_gguf_config(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "moe.gguf", "qwen3", model_tensors() | {"blk.0.ffn_gate_inp.weight":
                                                                        (random(4, HIDDEN), Q.F32)})
    with pytest.raises(ValueError, match="blk.0.ffn_gate_inp.weight"):
        list(iter_gguf_weights(path))
