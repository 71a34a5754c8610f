"""`nanovllm serve`: an OpenAI-compatible HTTP server on the engine.

Request path: app.py (routes, guard, errors) -> serving.py (prompts -> engine requests -> JSON / SSE) ->
async_engine.py (requests in, outputs out, over a pipe) -> engine_core.py (the LLMEngine, in its own
process). frontend.py tokenizes and validates in the HTTP process, metrics.py exports Prometheus metrics
under vLLM's names, protocol.py holds the request bodies and their bounds, lifecycle.py the uvicorn run with
a graceful drain, cli.py the `serve` and `bench serve` commands, bench.py the serving benchmark.
"""
