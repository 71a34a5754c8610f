"""What the engine hands back to users: one RequestOutput per request, with vLLM's field names."""
from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 + number of tokens with a strictly higher logprob
    decoded_token: str


# One dict per generated (or prompt) token: token id -> Logprob, the sampled token plus the top-k.
TokenLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # None unless logprobs were requested
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # None while running, then "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Streaming: what is new since the previous RequestOutput of this request.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's milestones; None until reached."""
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None  # first entry None: the first token has no context
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None

    def __getitem__(self, key: str):
        # nano-vllm returns dicts {"text", "token_ids"}; keep that working for the first completion.
        if key not in ("text", "token_ids"):
            raise KeyError(f"RequestOutput supports ['text'] and ['token_ids'], got {key!r}.")
        return getattr(self.outputs[0], key)
