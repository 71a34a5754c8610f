"""The FastAPI app: routes, OpenAI-style errors, and a guard for API key, readiness, content type and size.

The API key (when set) guards everything under /v1 plus /tokenize and /detokenize; /health and /metrics stay
open so probes and scrapers need no secret (as in vLLM). CORS is off.
"""
import logging
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from nanovllm.server import serving
from nanovllm.server.async_engine import AsyncEngine
from nanovllm.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_messages,
)

logger = logging.getLogger("nanovllm.server")
MAX_BODY_BYTES = 32 * 1024 * 1024  # as vLLM; larger bodies are refused before they are read
_MAX_VALIDATION_ERRORS = 10
_GUARDED = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerState:
    engine: AsyncEngine
    served_model_name: str
    model_path: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="nanovllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(_Guard, state=state)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    _add_routes(app, state)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health() -> Response:
        ok = engine.ready and engine.accepting and engine.error is None
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": state.served_model_name, "object": "model", "created": 0, "owned_by": "nanovllm",
                "root": state.model_path, "parent": None, "max_model_len": engine.frontend.config.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        _check_model(req.model, state)
        job = await serving.prepare(serving.prepare_completion, req, engine.frontend, state.served_model_name)
        return await serving.respond(job, engine, request, engine.frontend.tokenizer)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        _check_model(req.model, state)
        job = await serving.prepare(serving.prepare_chat, req, engine.frontend, state.served_model_name)
        return await serving.respond(job, engine, request, engine.frontend.tokenizer)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        _check_model(req.model, state)
        tokenizer = engine.frontend.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "Give exactly one of prompt or messages.", "prompt")
        if req.messages is not None:
            text = tokenizer.apply_chat_template(chat_messages(req.messages), add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        body = {"count": len(ids), "max_model_len": engine.frontend.config.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
        return body

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        _check_model(req.model, state)
        vocab_size = engine.frontend.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"Token id {bad[0]} is out of range [0, {vocab_size}).", "tokens")
        return {"prompt": engine.frontend.tokenizer.decode(req.tokens)}


def _check_model(name: str | None, state: ServerState) -> None:
    if name and name != state.served_model_name:
        raise APIError(404, f"The model `{name}` does not exist.", "model")


# ---- errors -------------------------------------------------------------------------------------
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI says 422; OpenAI clients expect 400 with one message and a `param`."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return JSONResponse(APIError(400, "The request body is not valid JSON.").body(), status_code=400)
    lines = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
             for e in errors[:_MAX_VALIDATION_ERRORS]]
    param = ".".join(str(p) for p in errors[0].get("loc", ())) if errors else None
    message = f"{len(errors)} validation error(s): " + "; ".join(lines)
    return JSONResponse(APIError(400, message, param).body(), status_code=400)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(APIError(500, "Internal server error.", type="InternalServerError").body(),
                        status_code=500)


# ---- the guard ----------------------------------------------------------------------------------
class _Guard:
    """Pure ASGI middleware (it must not buffer streams or hide disconnects): checks the API key, readiness,
    JSON content type and body size before a route runs."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._check(scope)
        if error is not None:
            response = JSONResponse(error.body(), status_code=error.status)
            if error.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        await self.app(scope, self._limit(receive), send)

    def _check(self, scope) -> APIError | None:
        path, headers = scope["path"], dict(scope["headers"])
        guarded = path.startswith(_GUARDED)
        if guarded and self.state.api_key is not None:
            given = headers.get(b"authorization", b"").decode("latin-1")
            expected = f"Bearer {self.state.api_key}"
            if not secrets.compare_digest(given.encode(), expected.encode()):
                return APIError(401, "Invalid or missing API key.", type="AuthenticationError")
        if guarded and self.state.engine.error is not None:
            return APIError(500, "The engine has failed; restart the server.", type="InternalServerError")
        if guarded and not (self.state.engine.ready and self.state.engine.accepting):
            return APIError(503, "The server is not ready." if self.state.engine.accepting
                            else "The server is shutting down.")
        if scope["method"] == "POST":
            if b"application/json" not in headers.get(b"content-type", b""):
                return APIError(415, "Content-Type must be application/json.", "content-type")
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.state.max_body_bytes):
                return APIError(413, f"The request body is over {self.state.max_body_bytes} bytes.")
        return None

    def _limit(self, receive):
        """Counts a chunked body too: FastAPI reports the overflow as a body parse error (400)."""
        received = 0
        limit = self.state.max_body_bytes

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise APIError(413, f"The request body is over {limit} bytes.")
            return message
        return limited
