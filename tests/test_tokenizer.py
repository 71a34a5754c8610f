"""The tokenizer: the default GGUF's rebuilt BPE against transformers' tokenizer from the same file,
llama.cpp's digit rule, chat templates, HF folders, and token bytes."""
import json
import os
import re
import sysconfig
import unicodedata

import gguf
import pytest
import regex
from conftest import default_gguf
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.utils.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, Tokenizer, _pre_tokenizer, load_tokenizer

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
CORPUS = [
    "Hello world", " Hello world", "hello   world  ", "Don't you'll we've I'M", "snake_case camelCase CONST",
    "def f(x):\n    return x ** two  # comment\n\n\n", "\t\ttabs\r\nand\rreturns", "   leading",
    "trailing   ", "naïve café résumé Ångström", "日本語のテキスト、中文文本。한국어", "emoji 😀👋🏽🇫🇷 👨‍👩‍👧",
    "Ω≈ç√∫ ∞", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>end",
    "<|im_start|><|im_start|>", "a<|im_end|>b", "{\"key\": [true, null]}", "<html><body>&amp;</body></html>",
    "", " ", "\n", "\u200b zero width",
]


@pytest.fixture(scope="session")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf())


@pytest.fixture(scope="session")
def hf(hf_smollm_tokenizer):
    return hf_smollm_tokenizer


@pytest.fixture(scope="session")
def source_texts() -> list[str]:
    """Real code: 30 standard-library files (fixed for a Python version), digits removed (see below)."""
    folder = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))[:30]
    return [re.sub(r"\d", "", open(os.path.join(folder, n), encoding="utf-8").read()) for n in names]


def test_matches_transformers_on_corpus(ours, hf):
    for text in CORPUS:
        for add_special in (True, False):
            assert ours.encode(text, add_special) == hf.encode(text, add_special_tokens=add_special), text


def test_matches_transformers_on_source_files(ours, hf, source_texts):
    for text in source_texts:
        assert ours.encode(text) == hf.encode(text)


def test_digits_split_as_llama_cpp(ours, hf):
    # llama.cpp's `smollm` pre-tokenizer cuts every digit out before GPT-2's split; HF's GGUF tokenizer does
    # not, and the two differ where spaces run into digits: "  42" is "  ","4","2" here, " "," 42" there.
    for text in ["2024", "  42", "x=3.14159", "v1.2.3-rc10", "    1234567890", "١٢٣ arabic", "x ² ½ Ⅻ"]:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        for token in map(ours.decode, ([i] for i in ids)):  # a number character (\p{N}) stands alone
            assert len(token) == 1 or not any(unicodedata.category(c)[0] == "N" for c in token), (text, token)
    assert ours.encode("  42") == [ours.backend_tokenizer.token_to_id(t) for t in ("ĠĠ", "4", "2")]
    assert ours.encode("  42") != hf.encode("  42")


def test_special_tokens(ours):
    assert ours.encode("<|im_start|>") == [1] and ours.encode("<|im_end|>") == [2]
    assert ours.is_special(1) and ours.is_special(2) and not ours.is_special(ours.encode("hi")[0])
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids) == "user\nhi"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos, ours.vocab_size) == (1, [2], False, 49152)


# SmolLM's vocabulary lacks a few bytes (6 control characters; 0xF1/0xF2, which begin code points from
# U+40000), so text with them cannot round-trip, with any tokenizer of this vocabulary.
ENCODABLE = st.characters(max_codepoint=0x3FFFF, exclude_characters="\x04\x06\x13\x14\x16\x1d",
                          exclude_categories=("Cs",))


def test_lone_surrogate_is_a_value_error(ours):
    with pytest.raises(ValueError, match="Unicode"):
        ours.encode("bad \ud800")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(ENCODABLE, max_size=60))
def test_decode_inverts_encode(ours, text):
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_token_bytes(ours):
    for text in ["café 👋🏽 你好", "plain", " \t\n"]:
        ids = ours.encode(text)
        assert b"".join(ours.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert ours.token_bytes(1) == b"<|im_start|>"
    assert ours.id_to_token(ours.encode(" the")[0]) == "Ġthe"
    with pytest.raises(ValueError, match="out of range"):
        ours.id_to_token(ours.vocab_size)


def test_chat_template_matches_transformers(ours, hf):
    conversations = [FRANCE,
                     [{"role": "system", "content": "Be brief."}, *FRANCE,
                      {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]]
    for messages in conversations:
        for add in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.apply_chat_template(messages, add_generation_prompt=add) == expected
    assert ours.apply_chat_template(FRANCE).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("messages", [
    None, [], "hello", [{"content": "no role"}], [{"role": "user"}], [{"role": "user", "content": 3}],
    ["not a dict"], [{"role": 1, "content": "x"}],
])
def test_invalid_messages(ours, messages):
    with pytest.raises(ValueError, match="messages"):
        ours.apply_chat_template(messages)


def test_template_errors_are_value_errors(tmp_path, ours):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    folder = save_folder(tmp_path, ours, {"chat_template": strict})
    with pytest.raises(ValueError, match="first must be user"):
        Tokenizer.from_pretrained(folder).apply_chat_template([{"role": "assistant", "content": "x"}])


def test_template_sandbox_and_tojson(tmp_path, ours):
    messages = [{"role": "user", "content": "<é>"}]
    folder = save_folder(tmp_path, ours, {"chat_template": "{% set x = messages.append(1) %}"})
    with pytest.raises(ValueError, match="unsafe"):  # the immutable sandbox refuses to change the messages
        Tokenizer.from_pretrained(folder).apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "<é>"}]
    template = "{{ messages[0].content | tojson }}{{ messages.__class__ }}"  # dunders render as undefined
    folder = save_folder(tmp_path, ours, {"chat_template": template})
    assert Tokenizer.from_pretrained(folder).apply_chat_template(messages) == '"<é>"'  # and no HTML escaping


def save_folder(tmp_path, tokenizer: Tokenizer, config: dict, generation: dict | None = None) -> str:
    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return str(folder)


def test_folder_saved_by_transformers(tmp_path, hf, source_texts):
    hf.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    folder = load_tokenizer(str(tmp_path))
    for text in CORPUS + source_texts[:3] + ["  42 and 2024"]:  # HF's own pre-tokenizer now: digits too
        assert folder.encode(text) == hf.encode(text)
    assert folder.apply_chat_template(FRANCE) == hf.apply_chat_template(FRANCE, tokenize=False,
                                                                       add_generation_prompt=True)
    assert (folder.bos_token_id, folder.eos_token_ids, folder.vocab_size) == (1, [2], 49152)


def test_folder_named_templates_bos_and_generation_eos(tmp_path, ours):
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": True,
              "chat_template": [{"name": "default", "template": "D{{ bos_token }}{{ messages[0].content }}"},
                                {"name": "tool_use", "template": "T{{ tools | length }}"}]}
    folder = Tokenizer.from_pretrained(save_folder(tmp_path, ours, config, {"eos_token_id": [0, 2]}))
    assert (folder.bos_token_id, folder.eos_token_ids) == (1, [2, 0])
    assert folder.encode("hi") == [1, *ours.encode("hi")] and folder.encode("hi", False) == ours.encode("hi")
    assert folder.apply_chat_template(FRANCE) == "D<|im_start|>" + FRANCE[0]["content"]
    assert folder.apply_chat_template(FRANCE, tools=[{"name": "f"}, {"name": "g"}]) == "T2"


def test_folder_without_chat_template(tmp_path, ours):
    folder = Tokenizer.from_pretrained(save_folder(tmp_path, ours, {}))
    with pytest.raises(ValueError, match="no chat template"):
        folder.apply_chat_template(FRANCE)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


# ---- pre-tokenizers of other GGUF vocabularies ------------------------------------------------------

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SAMPLE = "Hello  world's 12345 x=3.14\n\n  CamelCase!!! 你好 ١٢٣\t end  "


def pieces(pre: str, text: str) -> list[str]:
    """The pre-tokenizer's pieces, mapped back from byte-level spelling to text."""
    from nanovllm.utils.tokenizer import _unicode_to_byte
    table = _unicode_to_byte()
    split = _pre_tokenizer(pre).pre_tokenize_str(text)
    return [bytes(table[c] for c in piece).decode() for piece, _ in split]


@pytest.mark.parametrize("pre,pattern", [("qwen2", _QWEN2_SPLIT), ("llama-bpe", _LLAMA3_SPLIT),
                                         ("gpt2", GPT2_SPLIT)])
def test_split_pre_tokenizers_follow_their_regex(pre, pattern):
    assert pieces(pre, SAMPLE) == regex.findall(pattern, SAMPLE)


def test_smollm_pre_tokenizer_splits_digits_first():
    chunks = [chunk for chunk in regex.split(r"(\p{N})", SAMPLE) if chunk]
    expected = [piece for chunk in chunks for piece in regex.findall(GPT2_SPLIT, chunk)]
    assert pieces("smollm", SAMPLE) == expected


def test_split_regexes_match_transformers():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    assert GGUF_PRE_TOKENIZER_SPLITS["qwen2"] == _QWEN2_SPLIT
    assert GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"] == _LLAMA3_SPLIT


def write_vocab_gguf(path, model: str = "gpt2", pre: str = "qwen2", add_bos: bool | None = False,
                     bos: int | None = None) -> str:
    """A metadata-only GGUF with a 9-token byte-level vocabulary; no merge makes "abc"."""
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<|endoftext|>", "<think>", "a", "b", "ab", "Ġ", "Ġab", "c", "abc"])
    writer.add_token_types([3, 4, 1, 1, 1, 1, 1, 1, 1])
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_eos_token_id(0)
    writer.add_eot_token_id(0)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if bos is not None:
        writer.add_bos_token_id(bos)
    writer.add_chat_template("{{ messages[0].content }}!")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_small_gguf_vocabulary(tmp_path):
    tok = load_tokenizer(write_vocab_gguf(tmp_path / "v.gguf"))
    assert tok.encode("ab ab<|endoftext|><think>") == [4, 6, 0, 1]
    assert tok.decode([4, 6, 0, 1]) == "ab ab<think>"  # control skipped, user-defined kept
    assert tok.is_special(0) and not tok.is_special(1)
    assert tok.eos_token_ids == [0] and tok.bos_token_id is None
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_llama_bpe_ignores_merges_and_adds_bos_by_default(tmp_path):
    # llama.cpp's Llama 3 vocabularies: whole words found in the vocabulary skip BPE; BOS unless told not to.
    tok = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "v.gguf", pre="llama-bpe", add_bos=None, bos=0))
    assert tok.encode("abc") == [0, 8] and tok.encode("abc", add_special_tokens=False) == [8]
    assert tok.bos_token_id == 0 and tok.add_bos
    qwen = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "q.gguf", pre="qwen2", add_bos=None, bos=0))
    assert qwen.encode("abc") == [4, 7]


def test_unknown_pre_tokenizer_warns(tmp_path):
    with pytest.warns(UserWarning, match="mystery"):
        tok = Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "v.gguf", pre="mystery"))
    assert tok.encode("ab ab") == [4, 6]


def test_sentencepiece_gguf_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'llama' is not supported; supported: gpt2"):
        Tokenizer.from_gguf(write_vocab_gguf(tmp_path / "v.gguf", model="llama"))


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models
    backend = HFTokenizer(models.BPE({"<0x0A>": 0, "▁the": 1, "é": 2}, [], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(backend)
    assert [tok.token_bytes(i) for i in range(3)] == [b"\n", b" the", "é".encode()]
    assert tok.decode([1, 0, 2]) == " the\né"
