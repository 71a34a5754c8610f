"""What the HTTP process knows of the model without holding it: the tokenizer and the engine's limits.

Prompts are tokenized and validated here, so a bad request gets its 400 (with the right `param`) without a
round trip to the engine process; the engine validates again when it adds the request, and anything that
still fails there comes back as that request's 400.
"""
from nanovllm.config import Config
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.default_model import resolve_model_path
from nanovllm.utils.tokenizer import Tokenizer, load_tokenizer


class Frontend:
    def __init__(self, config: Config, vocab_size: int, tokenizer: Tokenizer):
        self.config, self.vocab_size, self.tokenizer = config, vocab_size, tokenizer

    @classmethod
    def load(cls, config: Config, vocab_size: int) -> "Frontend":
        return cls(config, vocab_size, load_tokenizer(resolve_model_path(config.model)))

    def process_prompt(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Token ids of a prompt the engine can run; ValueError (the engine's messages) otherwise."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("The prompt is empty.")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            token_ids = list(prompt)
        else:
            raise ValueError("A prompt must be a string or a list of token ids.")
        if not token_ids:
            raise ValueError("The prompt is empty.")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of range [0, {self.vocab_size}).")
        limit = self.config.max_model_len
        if len(token_ids) >= limit:
            raise ValueError(f"This model's maximum context length is {limit} tokens. However, your prompt "
                             f"contains {len(token_ids)} input tokens, leaving no room to generate.")
        if not self.config.enable_chunked_prefill and len(token_ids) > self.config.max_num_batched_tokens:
            raise ValueError(f"The prompt ({len(token_ids)} tokens) is longer than max_num_batched_tokens "
                             f"({self.config.max_num_batched_tokens}) and chunked prefill is off: enable it "
                             "or raise max_num_batched_tokens.")
        return token_ids
