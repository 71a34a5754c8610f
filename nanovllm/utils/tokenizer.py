"""The tokenizer: an HF `tokenizers.Tokenizer` (from tokenizer.json or rebuilt from GGUF metadata),
plus what the engine needs around it: BOS/EOS ids and the chat template."""
import functools
import json
import os
import warnings
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# Split regexes of llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`), as HF writes them.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT} | dict.fromkeys(_LLAMA3_PRES, _LLAMA3_SPLIT)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


class Tokenizer:
    """Text <-> token ids, special tokens, and chat-template rendering for one model."""

    def __init__(self, backend_tokenizer: HFTokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: list[int] | None = None, add_bos: bool = False,
                 chat_templates: dict[str, str] | None = None) -> None:
        self.backend_tokenizer = backend_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids or [])
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_templates = chat_templates or {}
        added = backend_tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_ids = frozenset(added)
        self._byte_level = isinstance(backend_tokenizer.decoder, decoders.ByteLevel)

    @classmethod
    def from_pretrained(cls, folder: str) -> "Tokenizer":
        """An HF tokenizer folder: tokenizer.json, tokenizer_config.json, chat template, generation_config."""
        tokenizer_file = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"{folder} has no tokenizer.json (slow-tokenizer files are not supported).")
        backend = HFTokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        bos_id = _token_id(backend, config.get("bos_token"))
        eos_ids = [_token_id(backend, config.get("eos_token"))]
        generation_eos = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
        eos_ids += generation_eos if isinstance(generation_eos, list) else [generation_eos]
        # Many tokenizer.json files add BOS in their post-processor already; add it only when they do not.
        adds_bos_itself = bos_id is not None and bos_id in backend.encode("").ids
        return cls(backend, bos_token_id=bos_id, eos_token_ids=_unique(eos_ids),
                   add_bos=bool(config.get("add_bos_token")) and not adds_bos_itself,
                   chat_templates=_folder_chat_templates(folder, config))

    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        """Rebuild the byte-level BPE tokenizer a GGUF file describes, splitting text as llama.cpp does."""
        from nanovllm.utils.gguf import gguf_eos_token_ids, read_gguf  # the gguf package only for GGUF files
        gguf = read_gguf(path)
        if (kind := gguf.get("tokenizer.ggml.model")) != "gpt2":
            raise ValueError(f"{path}: tokenizer model {kind!r} is not supported; supported: gpt2 (byte BPE)")
        tokens, types = gguf.get("tokenizer.ggml.tokens"), gguf.get("tokenizer.ggml.token_type", [])
        merges, pre = gguf.get("tokenizer.ggml.merges", []), gguf.get("tokenizer.ggml.pre")
        if not tokens:
            raise ValueError(f"{path} has no tokenizer.ggml.tokens: no tokenizer to build.")
        backend = _byte_level_bpe(tokens, merges, pre)
        # Control tokens (<|im_end|>) are special: one id each, dropped by decode(skip_special_tokens=True);
        # user-defined ones (<think>) are matched whole too but kept when decoding, as llama.cpp does.
        backend.add_special_tokens([_added(t) for t, k in zip(tokens, types) if k == _CONTROL])
        backend.add_tokens([_added(t, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
        prefix = "tokenizer.chat_template."
        templates = {k.removeprefix(prefix): v for k, v in gguf.metadata.items() if k.startswith(prefix)}
        if (default := gguf.get("tokenizer.chat_template")) is not None:
            templates["default"] = default
        return cls(backend, bos_token_id=gguf.get("tokenizer.ggml.bos_token_id"),
                   eos_token_ids=gguf_eos_token_ids(gguf), chat_templates=templates,
                   # llama.cpp's default where the file does not say: BOS for Llama 3 vocabularies only
                   add_bos=bool(gguf.get("tokenizer.ggml.add_bos_token", pre in _LLAMA3_PRES)))

    @property
    def vocab_size(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids. BOS only when add_bos."""
        try:
            ids = self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError as e:  # e.g. a lone surrogate, which JSON's "\ud800" can carry
            raise ValueError(f"text must be a str of valid Unicode: {e}") from e
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored (byte-level spelling, e.g. 'Ġthe')."""
        token = self.backend_tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size}).")
        return token

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for (may be part of a UTF-8 character)."""
        token = self.id_to_token(token_id)
        if token_id in self._added_ids:
            return token.encode("utf-8")
        if not self._byte_level:  # sentencepiece-style BPE: "▁" is a space, "<0x0A>" a byte fallback
            is_byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            return bytes([int(token[3:5], 16)]) if is_byte else token.replace("\u2581", " ").encode("utf-8")
        table = _unicode_to_byte()
        return bytes(table[c] for c in token) if all(c in table for c in token) else token.encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render `messages` with the model's chat template (sandboxed Jinja, as transformers renders it)."""
        _check_messages(messages)
        name = "tool_use" if kwargs.get("tools") and "tool_use" in self.chat_templates else "default"
        if name not in self.chat_templates:
            raise ValueError("This tokenizer has no chat template; send a plain prompt instead of messages.")
        special = {"bos_token": self._token_text(self.bos_token_id),
                   "eos_token": self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None)}
        try:
            return _compile_template(self.chat_templates[name]).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **{**special, **kwargs})
        except jinja2.TemplateError as e:  # raise_exception() in templates reports invalid conversations
            raise ValueError(f"Chat template error: {e}") from e

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self.id_to_token(token_id)


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a model path: a .gguf file or an HF folder."""
    if os.path.isdir(path):
        return Tokenizer.from_pretrained(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return Tokenizer.from_gguf(path)
    raise ValueError(f"{path!r} is neither a .gguf file nor a model folder.")


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    # llama.cpp looks whole Llama-3 words up in the vocabulary before merging, as HF's ignore_merges does.
    backend = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_PRES))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """How llama.cpp splits text before BPE for `tokenizer.ggml.pre`."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split regex
    if pre == "smollm":  # llama.cpp splits every digit apart, then applies GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in (None, "default", "gpt2"):
        warnings.warn(f"Unknown GGUF pre-tokenizer {pre!r}; splitting text as GPT-2 does, which may differ.",
                      stacklevel=2)
    return byte_level


def _added(content: str, special: bool = True) -> AddedToken:
    return AddedToken(content, special=special, normalized=False)


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE spells each byte as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_id(backend: HFTokenizer, token: str | dict | None) -> int | None:
    """Id of a special token given as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _unique(ids: list[int | None]) -> list[int]:
    return list(dict.fromkeys(i for i in ids if i is not None))


def _folder_chat_templates(folder: str, config: dict) -> dict[str, str]:
    """Templates by name: transformers saves them to chat_template.jinja, older tokenizers in the config,
    either as one string or as a list of {"name", "template"}."""
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return {"default": f.read()}
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}
    return {} if template is None else {"default": template}


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{role, content}} dicts, got {messages!r}.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {message!r}.")
        content = message.get("content")
        if not isinstance(content, (str, list)) and not (content is None and "tool_calls" in message):
            raise ValueError(f"messages[{i}]['content'] must be a string or a list of parts, got {content!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON, as transformers gives.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_template(template: str) -> jinja2.Template:
    # Chat templates come with model files: untrusted code, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
