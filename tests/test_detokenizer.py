"""Incremental detokenization with the real default model's byte-level BPE tokenizer."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from nanovllm.sampling_params import SamplingParams

MULTIBYTE = "Hi 👋🏽 there, 你好世界! café naïve e\u0301 🇫🇷 ok 😀😀 done"


class Tokenizer:
    """The decode interface of nanovllm.utils.tokenizer, over a `tokenizers.Tokenizer`."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(hf_smollm_tokenizer) -> Tokenizer:
    return Tokenizer(hf_smollm_tokenizer.backend_tokenizer)


def stream(tokenizer, ids: list[int], chunk: int = 1, prompt: str = "User: hi\nAssistant:", **params):
    """Feeds ids `chunk` at a time, then flushes; returns (deltas, stop string, the detokenizer)."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), SamplingParams(**params))
    deltas, stop = [], None
    for i in range(0, len(ids), chunk):
        delta, stop = detok.update(ids[i:i + chunk])
        deltas.append(delta)
        if stop is not None:
            break
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas, stop, detok


def test_test_text_splits_characters_across_tokens(tokenizer):
    # The tests below mean something only if single tokens hold parts of characters.
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode(MULTIBYTE)]
    assert sum(REPLACEMENT_CHAR in piece for piece in pieces) >= 6


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("prompt", ["User: hi\nAssistant:", "", "你"])
def test_multibyte_characters_are_never_split(tokenizer, chunk, prompt):
    ids = tokenizer.encode(MULTIBYTE)
    deltas, stop, _ = stream(tokenizer, ids, chunk=chunk, prompt=prompt)
    assert stop is None
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE


def test_text_is_always_a_prefix_of_the_final_decode(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    lengths = []
    for token in ids:
        detok.update([token])
        assert MULTIBYTE.startswith(detok.text)
        lengths.append(len(detok.text))
    assert lengths.count(lengths[0]) < len(lengths)  # text arrives as tokens do, not all at the end


def test_partial_character_at_the_end_is_flushed_like_decode(tokenizer):
    ids = tokenizer.encode("ok 👋")[:-1]  # the last byte of the emoji is missing
    deltas, _, detok = stream(tokenizer, ids)
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas[:-1])
    assert detok.text == tokenizer.decode(ids) and detok.text.endswith(REPLACEMENT_CHAR)


SENTENCE = "The quick brown fox jumps over the lazy dog. 你好世界 👋🏽 end."


@pytest.mark.parametrize("stop", ["fox jumps", "k brown f", "lazy dog.", "好世", "👋🏽", "ump", " end."])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_cuts_exactly(tokenizer, stop, include):
    ids = tokenizer.encode(SENTENCE)
    deltas, matched, detok = stream(tokenizer, ids, stop=[stop, "never"], include_stop_str_in_output=include)
    start = SENTENCE.index(stop)
    assert matched == stop
    assert detok.text == SENTENCE[:start + (len(stop) if include else 0)]
    # It stopped at the token that completes the stop string, not later.
    completing = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    assert len(deltas) == completing + 1  # one delta per token, plus the flush


def test_stop_strings_that_span_tokens_are_tested(tokenizer):
    ids = tokenizer.encode(SENTENCE)
    pieces = [tokenizer.decode([i]) for i in ids]
    for stop in ["fox jumps", "k brown f", "好世", "👋🏽"]:
        assert not any(stop in piece for piece in pieces)


@pytest.mark.parametrize("stops, winner", [(["quick brown", "dog", "brown"], "quick brown"),
                                           (["lazy", "fox"], "fox"), (["over", "over the"], "over")])
def test_earliest_stop_wins(tokenizer, stops, winner):
    ids = tokenizer.encode(SENTENCE)
    _, matched, detok = stream(tokenizer, ids, chunk=4, stop=stops)
    assert matched == winner
    assert detok.text == SENTENCE[:SENTENCE.index(winner)]


def test_possible_stop_start_is_held_back_then_released(tokenizer):
    text = "The fox jumps over the lazy dog"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["jumps over the cat"]))
    shown = {}
    for k, token in enumerate(ids, start=1):
        detok.update([token])
        shown[tokenizer.decode(ids[:k])] = detok.text
    assert shown["The fox jumps over the"] == "The fox "  # might still become the stop string
    assert shown["The fox jumps over the lazy"] == "The fox jumps over the lazy"  # it did not
    assert detok.flush() == ""


def test_partial_stop_at_the_end_is_released_by_flush(tokenizer):
    ids = tokenizer.encode("Say hello wor")
    deltas, matched, detok = stream(tokenizer, ids, stop=["world"])
    assert matched is None
    assert "".join(deltas[:-1]) == "Say hello " and deltas[-1] == "wor"
    assert detok.text == "Say hello wor"


def test_skip_special_tokens(tokenizer):
    im_end = tokenizer.backend.token_to_id("<|im_end|>")
    ids = tokenizer.encode("Hi") + [im_end] + tokenizer.encode(" there")
    assert stream(tokenizer, ids)[2].text == "Hi there"
    assert stream(tokenizer, ids, skip_special_tokens=False)[2].text == "Hi<|im_end|> there"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("a b a b a b")  # one token per letter or " letter"
    assert len(ids) == 6
    _, matched, detok = stream(tokenizer, ids, stop=["b"], min_tokens=2)
    assert matched == "b" and detok.text == "a b a "  # the "b"s of tokens 1-2 do not count
    assert stream(tokenizer, ids, stop=["b"])[2].text == "a "


def test_no_update_after_a_stop_string(tokenizer):
    ids = tokenizer.encode("one two three")
    _, matched, detok = stream(tokenizer, ids, stop=["two"])
    assert matched == "two" and detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.update(ids[:1])


def expected_streaming_text(tokenizer, ids: list[int], stops: list[str]) -> str:
    """Oracle: the text stops at the stop occurrence completed by the earliest token (earliest start among
    those), with the complete text after k tokens being decode(ids[:k]) without an unfinished character."""
    full = tokenizer.decode(ids)
    known, best = 0, None
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        if text.endswith(REPLACEMENT_CHAR) and k < len(ids):
            continue
        for stop in stops:
            start = text.find(stop, max(0, known - len(stop) + 1))
            if start != -1 and (best is None or start < best):
                best = start
        if best is not None:
            return full[:best]
        known = len(text)
    return full


ALPHABET = ["a", "b", " ", "ab", "é", "你", "好", "👋", "🏽", "\u0301", "\n", "the", " fox", "🇫🇷"]


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(ALPHABET), max_size=14),
       stops=st.lists(st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=3).map("".join), max_size=2),
       chunk=st.integers(1, 3))
def test_random_texts_and_stops_match_the_oracle(tokenizer, pieces, stops, chunk):
    text = "".join(pieces)
    ids = tokenizer.encode(text)
    deltas, _, detok = stream(tokenizer, ids, chunk=1, stop=stops)
    assert not any(REPLACEMENT_CHAR in delta for delta in deltas)
    assert detok.text == expected_streaming_text(tokenizer, ids, stops)
    assert "".join(stream(tokenizer, ids, chunk=chunk)[0]) == text


def test_prompt_context_keeps_the_leading_space_of_the_first_token():
    # A SentencePiece-style decoder drops the space of the text's first token; read after the prompt, the
    # first output token keeps it, as in vLLM (its prefix_offset/read_offset window over the prompt).
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models
    backend = Backend(models.WordLevel({"▁Hello": 0, "▁world": 1, "!": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    detok = IncrementalDetokenizer(Tokenizer(backend), [0], SamplingParams())
    assert [detok.update([1]), detok.update([2])] == [(" world", None), ("!", None)]
    assert Tokenizer(backend).decode([1, 2]) == "world!"
