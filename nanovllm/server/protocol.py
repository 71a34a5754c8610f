"""OpenAI request bodies (pydantic), their bounds, and the mapping to SamplingParams (vLLM semantics)."""
import logging

from pydantic import BaseModel, ConfigDict, Field

from nanovllm.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger("nanovllm.server")

# Bounds checked before any work is done: huge n, prompt lists or stop lists are cheap DoS vectors.
MAX_PROMPTS = 1024
MAX_N = 64
MAX_STOP = 4
MAX_STOP_TOKEN_IDS = 64
MAX_TEMPERATURE = 2.0
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


class APIError(Exception):
    """An error that becomes `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type or _ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                413: "BadRequestError", 415: "BadRequestError", 501: "NotImplementedError",
                503: "ServiceUnavailableError"}


class OpenAIModel(BaseModel):
    # Unknown fields are logged, not rejected: clients send vendor extras freely.
    model_config = ConfigDict(extra="allow")

    def log_unknown_fields(self) -> None:
        if self.model_extra:
            logger.info("ignoring unknown request fields: %s", sorted(self.model_extra)[:20])


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingRequest(OpenAIModel):
    """The fields shared by completions and chat completions."""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions, sent through the openai client's extra_body.
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


def check_request(req: SamplingRequest) -> None:
    """Server-side bounds and combinations that SamplingParams itself does not know about."""
    req.log_unknown_fields()
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true.", "stream_options")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {req.n}.", "n")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > MAX_STOP:
        raise APIError(400, f"At most {MAX_STOP} stop strings are allowed, got {len(stop)}.", "stop")
    if len(req.stop_token_ids or []) > MAX_STOP_TOKEN_IDS:
        raise APIError(400, f"At most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed.", "stop_token_ids")
    if req.temperature is not None and not 0 <= req.temperature <= MAX_TEMPERATURE:
        raise APIError(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {req.temperature}.",
                       "temperature")
    if req.temperature is not None and req.temperature < 1e-5 and req.n > 1:
        raise APIError(400, "n must be 1 when using greedy sampling (temperature 0).", "n")
    for name in ("logit_bias", "tools", "functions", "suffix"):
        if getattr(req, name, None) or (req.model_extra or {}).get(name):
            raise APIError(501, f"{name} is not supported by this server.", name)
    if isinstance(req, CompletionRequest) and req.best_of not in (None, req.n):
        raise APIError(501, "best_of other than n is not supported by this server.", "best_of")


def check_logprobs(value: int | None, param: str) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise APIError(400, f"{param} must be in [0, {MAX_LOGPROBS}], got {value}.", param)


def sampling_params(req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None) -> SamplingParams:
    """Builds SamplingParams; its ValueError becomes a 400 naming the field its message starts with."""
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature, top_p=req.top_p,
            top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, seed=req.seed,
            stop=req.stop, stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output, ignore_eos=req.ignore_eos,
            max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens)
    except ValueError as e:
        message = str(e)
        field = message.split(" ", 1)[0]
        raise APIError(400, message, field if field in SamplingParams.__annotations__ else None) from None


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int, max_model_len: int,
                       param: str = "max_tokens") -> int:
    """The number of tokens to generate. An explicit request beyond the context is a 400 (as OpenAI and
    SGLang do) rather than a silent clamp; an unset value fills the context, or `default` if smaller."""
    room = max_model_len - prompt_len
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise APIError(400, f"{param} must be at least 1, got {requested}.", param)
    if requested > room:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                       f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                       f"for the completion). Please reduce the prompt or {param}.", param)
    return requested


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as plain dicts for the chat template; content parts other than text are not supported."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                raise APIError(501, "Only text content parts are supported.", f"messages[{i}].content")
            content = "".join(part["text"] for part in content)
        out.append({"role": m.role, "content": content or ""})
    return out

