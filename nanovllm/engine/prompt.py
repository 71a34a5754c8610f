"""Prompt checks shared by the engine and the server's HTTP process (which holds no model): torch-free."""
from nanovllm.config import Config
from nanovllm.utils.tokenizer import Tokenizer


def prompt_token_ids(prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int,
                     config: Config) -> list[int]:
    """The token ids of a prompt the engine can run: a string is tokenized, a list of ids is checked against
    the vocabulary; ValueError with a clear message for anything else, or a prompt that leaves no room to
    generate, or one that cannot be scheduled (longer than max_num_batched_tokens without chunked prefill)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("The prompt is empty.")
        if tokenizer is None:
            raise ValueError("This engine has no tokenizer (skip_tokenizer_init): give token ids.")
        token_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        token_ids = list(prompt)
    else:
        raise ValueError("A prompt must be a string or a list of token ids.")
    if not token_ids:
        raise ValueError("The prompt is empty.")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"Token id {bad[0]} is out of range [0, {vocab_size}).")
    limit = config.max_model_len
    if len(token_ids) >= limit:
        raise ValueError(f"This model's maximum context length is {limit} tokens. However, your prompt "
                         f"contains {len(token_ids)} input tokens, leaving no room to generate.")
    if not config.enable_chunked_prefill and len(token_ids) > config.max_num_batched_tokens:
        raise ValueError(f"The prompt ({len(token_ids)} tokens) is longer than max_num_batched_tokens "
                         f"({config.max_num_batched_tokens}) and chunked prefill is off: enable it or raise "
                         "max_num_batched_tokens.")
    return token_ids
