"""What the HTTP process knows of the model without holding it: the tokenizer and the engine's limits.

Prompts are tokenized and validated here, so a bad request gets its 400 (with the right `param`) without a
round trip to the engine process; the engine validates again when it adds the request, and anything that
still fails there comes back as that request's 400.
"""
from nanovllm.config import Config
from nanovllm.engine.prompt import prompt_token_ids
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
        return prompt_token_ids(prompt, self.tokenizer, self.vocab_size, self.config)
