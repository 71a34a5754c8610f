"""The HF checkpoint loader: sharded files, and a clear error for each way a checkpoint can be broken."""
import json
import os
import shutil
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_model

from nanovllm.models import load_model
from nanovllm.utils.loader import iter_weights, load_model_config


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> str:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    return make_tiny_model("qwen2", tmp_path_factory.mktemp("sharded"), max_shard_size="100KB")


@pytest.fixture
def broken(single, tmp_path) -> str:
    """A private copy of the single-file checkpoint for a test to damage."""
    return shutil.copytree(single, tmp_path / "model")


def shard_files(path: str) -> list[str]:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def edit_json(path: str, name: str, **changes) -> None:
    file = os.path.join(path, name)
    with open(file) as f:
        data = json.load(f)
    with open(file, "w") as f:
        json.dump({**data, **changes}, f)


def edit_weights(path: str, drop: tuple[str, ...] = (), add: dict | None = None) -> None:
    file = os.path.join(path, "model.safetensors")
    tensors = {k: v for k, v in load_file(file).items() if k not in drop}
    save_file({**tensors, **(add or {})}, file)


def test_sharded_loads_equal_to_single(single, sharded):
    assert len(shard_files(sharded)) > 2
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    names = [name for name, _ in iter_weights(sharded)]
    assert len(names) == len(set(names)) == len(load_file(os.path.join(single, "model.safetensors")))
    a, _ = load_model(single, torch.float32, "cpu")
    b, _ = load_model(sharded, torch.float32, "cpu")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_missing_shard(sharded, tmp_path):
    path = shutil.copytree(sharded, tmp_path / "model")
    gone = shard_files(path)[1]
    os.remove(path / gone)
    with pytest.raises(FileNotFoundError, match=f"index.json names shard files that are missing: .*{gone}"):
        load_model(str(path), torch.float32, "cpu")


def test_truncated_shard(sharded, tmp_path):
    path = shutil.copytree(sharded, tmp_path / "model")
    victim = path / shard_files(path)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"Cannot read safetensors file .*{victim.name}.*truncated"):
        load_model(str(path), torch.float32, "cpu")


def test_garbage_safetensors(broken):
    with open(os.path.join(broken, "model.safetensors"), "wb") as f:
        f.write(os.urandom(1000))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(str(broken), torch.float32, "cpu")


def test_missing_config(broken):
    os.remove(os.path.join(broken, "config.json"))
    with pytest.raises(FileNotFoundError, match="No config.json in .*model"):
        load_model(str(broken), torch.float32, "cpu")


def test_invalid_config_json(broken):
    with open(os.path.join(broken, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_model_config(str(broken))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"), torch.float32, "cpu")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither an HF model folder nor a .gguf file"):
        load_model_config(str(tmp_path / "weights.bin"))


def test_no_safetensors_files(broken):
    os.remove(os.path.join(broken, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="No \\*.safetensors file"):
        load_model(str(broken), torch.float32, "cpu")


def test_unsupported_architecture(broken):
    edit_json(broken, "config.json", architectures=["MistralForCausalLM"], model_type="mistral")
    supported = "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    with pytest.raises(ValueError, match=f"MistralForCausalLM.*{supported}"):
        load_model_config(str(broken))


def test_unsupported_activation(broken):
    edit_json(broken, "config.json", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        load_model_config(str(broken))


def test_unsupported_rope_scaling(broken):
    edit_json(broken, "config.json", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type 'yarn'; supported: default, linear, llama3"):
        load_model_config(str(broken))


@pytest.mark.parametrize("name", [
    "model.layers.1.self_attn.v_proj.weight", "model.layers.0.self_attn.q_proj.bias", "model.norm.weight",
    "lm_head.weight"])
def test_missing_weight(broken, name):
    edit_weights(broken, drop=(name,))
    with pytest.raises(ValueError, match=f"provides no weight for {name}"):
        load_model(str(broken), torch.float32, "cpu")


def test_unexpected_weight(broken):
    edit_weights(broken, add={"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="'model.layers.0.mlp.extra.weight', which matches no parameter"):
        load_model(str(broken), torch.float32, "cpu")


def test_weight_of_wrong_shape(broken):
    edit_json(broken, "config.json", intermediate_size=96)
    pattern = r"'model\.layers\.0\.mlp\.\w+_proj\.weight': shape mismatch: the model expects \(\d+, \d+\), "
    with pytest.raises(ValueError, match=pattern + r"the checkpoint has \((128, 64|64, 128)\)"):
        load_model(str(broken), torch.float32, "cpu")


def test_tolerated_extras(broken):
    """Old checkpoints carry rotary inv_freq buffers, and tied ones sometimes still ship lm_head.weight."""
    edit_json(broken, "config.json", tie_word_embeddings=True)
    edit_weights(broken, add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    model, _ = load_model(str(broken), torch.float32, "cpu")
    embed = load_file(os.path.join(broken, "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(model.lm_head.weight, embed)  # the embedding wins, as in HF


def test_gguf_paths_go_to_the_gguf_module(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("nanovllm.utils.gguf")
    fake.load_gguf_config = lambda path: calls.append(("config", path)) or "config"
    fake.iter_gguf_weights = lambda path: calls.append(("weights", path)) or iter([("w", torch.ones(1))])
    monkeypatch.setitem(sys.modules, "nanovllm.utils.gguf", fake)
    file = str(tmp_path / "model.gguf")
    open(file, "wb").close()
    assert load_model_config(file) == "config"
    assert [name for name, _ in iter_weights(file)] == ["w"]
    assert calls == [("config", file), ("weights", file)]
