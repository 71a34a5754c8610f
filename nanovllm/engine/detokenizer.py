"""Incremental detokenization for streaming, with stop strings (vLLM's semantics)."""
from typing import Protocol

from nanovllm.sampling_params import SamplingParams

# Tokens before the new ones that are decoded with them, so a token's text comes out as it does in context
# (a SentencePiece leading space, a byte-level multi-byte character): vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET.
PREFIX_WINDOW = 5
REPLACEMENT_CHAR = "\ufffd"  # what a decoder gives for bytes that are not (yet) a whole UTF-8 character


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one completion's token ids into text deltas as they are generated.

    A delta never holds part of a UTF-8 character, nor text that might still turn out to be the start of a
    stop string. The deltas joined are always `text`; once flushed, that is the decode of all output ids,
    cut at the earliest stop string (before it, or after it with include_stop_str_in_output).
    EOS and stop token ids are the engine's business: it leaves the id that ends the sequence out of
    `update`, so it never shows in the text.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop_strs
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        # A little prompt context, then the output ids.
        self.token_ids = list(prompt_token_ids[max(0, len(prompt_token_ids) - PREFIX_WINDOW):])
        self.num_output_tokens = 0
        # token_ids[prefix_offset:read_offset] were decoded already; they are decoded again as the context
        # of the tokens after read_offset.
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.output_text = ""  # all output text decoded so far, cut at a stop string
        self.text = ""  # the part of output_text already returned in deltas
        self.finished = False

    def update(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Adds output token ids; returns (the new text to show, the stop string that matched or None).
        After a stop string matched the detokenizer is finished: further updates are errors."""
        if self.finished:
            raise RuntimeError("update() after a stop string ended the sequence.")
        searched = len(self.output_text)
        self.token_ids += new_token_ids
        self.num_output_tokens += len(new_token_ids)
        self.output_text += self._decode_new(flush=False)
        # As in vLLM, stop strings count only once min_tokens are out, and only in text new since then.
        stop = self._find_stop(searched) if self.num_output_tokens > self.min_tokens else None
        if stop is not None:
            start, stop_str = stop
            end = start + len(stop_str) if self.include_stop_str_in_output else start
            self.output_text = self.output_text[:end]
            self.finished = True
        return self._release(), stop[1] if stop else None

    def flush(self) -> str:
        """Returns all text still held back, once the sequence has ended (EOS, stop token id, length, or a
        stop string, when there is nothing left). A partial character at the end comes out as U+FFFD, as in
        tokenizer.decode."""
        if not self.finished:
            self.output_text += self._decode_new(flush=True)
            self.finished = True
        return self._release()

    def _release(self) -> str:
        end = len(self.output_text) - (0 if self.finished else self._held_back())
        delta = self.output_text[len(self.text):end]
        self.text += delta
        return delta

    def _decode_new(self, flush: bool) -> str:
        """Text of the tokens after read_offset, or "" while they end in part of a character."""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not flush):
            return ""  # nothing visible yet (a skipped special token), or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new_text[len(prefix_text):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _find_stop(self, searched: int) -> tuple[int, str] | None:
        """The earliest stop string ending after `searched` chars (text before it was searched already);
        of two starting at the same place, the shorter, which streaming would have seen complete first."""
        best = None
        for stop_str in self.stop:
            start = self.output_text.find(stop_str, max(0, searched - len(stop_str) + 1))
            if start != -1 and (best is None or (start, len(stop_str)) < (best[0], len(best[1]))):
                best = (start, stop_str)
        return best

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string: it is not shown
        until the next tokens tell whether the stop string completes."""
        if not self.stop:
            return 0
        for n in range(min(len(self.output_text), max(map(len, self.stop), default=1) - 1), 0, -1):
            tail = self.output_text[-n:]
            if any(stop_str.startswith(tail) for stop_str in self.stop):
                return n
        return 0
