"""Per-request sampling parameters, with vLLM's semantics and defaults."""
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # cap on top-k logprobs per token, as vLLM's server default
_GREEDY_EPS = 1e-5  # temperature below this means greedy, as in vLLM


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one is always included)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    stop_strs: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}.")
        _check(_finite(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}.")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}.")
        _check(isinstance(self.top_k, int) and self.top_k >= -1,
               f"top_k must be -1 (off), 0 (off) or a positive integer, got {self.top_k!r}.")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}.")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, f"{name} must be in [-2, 2], got {value!r}.")
        if self.max_tokens is not None:
            _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                   f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0,
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens,
                   f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens}).")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(isinstance(value, int) and 0 <= value <= MAX_LOGPROBS,
                       f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}.")
        if self.seed is not None:
            _check(isinstance(self.seed, int) and -2**63 <= self.seed < 2**63,
                   f"seed must be an integer that fits int64, got {self.seed!r}.")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stop), "stop must be non-empty strings.")
        self.stop_strs = stop
        ids = list(self.stop_token_ids or [])
        _check(all(isinstance(t, int) and t >= 0 for t in ids), "stop_token_ids must be non-negative integers.")
        self.stop_token_ids = ids

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
