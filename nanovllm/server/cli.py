"""`nanovllm serve` and `nanovllm bench serve`: argparse wiring and the server's process lifecycle."""
import argparse
import sys

from nanovllm.utils.args import add_engine_args, engine_kwargs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="Serve the OpenAI-compatible HTTP API.",
                              description="An OpenAI-compatible server: /v1/completions, "
                              "/v1/chat/completions, /v1/models, /health, /metrics, /tokenize, /detokenize.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address to bind (default 127.0.0.1; pass 0.0.0.0 explicitly to listen on all).")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="Require `Authorization: Bearer KEY` on /v1/*, /tokenize "
                   "and /detokenize (/health and /metrics stay open).")
    g.add_argument("--served-model-name", default=None, help="The model name clients send (default: --model, "
                   f"or {DEFAULT_MODEL_NAME} for the default model).")
    g.add_argument("--max-pending-requests", type=int, default=4096,
                   help="Requests queued or running before new ones get 503.")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="On SIGTERM, seconds in-flight requests may run before they are aborted.")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(p)
    p.set_defaults(func=run_serve)
    return p


def add_bench_parser(subparsers) -> argparse._SubParsersAction:
    """Adds `bench` with the `serve` sub-command; returns bench's subparsers so others can add theirs."""
    bench = subparsers.add_parser("bench", help="Benchmarks.", description="Benchmarks.")
    sub = bench.add_subparsers(metavar="BENCHMARK")
    p = sub.add_parser("serve", help="Load a running server with random prompts; report TTFT, TPOT, ITL, "
                       "e2e latency and throughput.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="The server's base URL.")
    p.add_argument("--backend", default="completions", choices=["completions", "chat"])
    p.add_argument("--model", default=None, help="Model name (default: the server's first /v1/models entry).")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Requests per second, Poisson arrivals (default inf: all at once).")
    p.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
    p.add_argument("--input-len", type=int, default=256, help="Prompt tokens per request.")
    p.add_argument("--output-len", type=int, default=64, help="Generated tokens per request (EOS ignored).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None, help="Write the results here as JSON.")
    p.add_argument("--label", default=None, help="A note saved with the results (e.g. the hardware).")
    p.add_argument("--num-clients", type=int, default=1, help="Client processes sharing the requests (a "
                   "Python client parses a few tens of thousands of events per second; the results are merged).")
    p.add_argument("--server-pid", type=int, default=None, help="Also report the CPU seconds of this local "
                   "process (the server's HTTP process) and of its children over the timed run.")
    p.set_defaults(func=run_bench)
    return sub


def run_serve(args: argparse.Namespace) -> int:
    from nanovllm.utils.default_model import resolve_model_path
    resolve_model_path(args.model)  # a bad path is a clear error now, not a 503 forever

    from nanovllm.server.app import ServerState, create_app
    from nanovllm.server.async_engine import AsyncEngine
    from nanovllm.server.lifecycle import run_server
    from nanovllm.server.metrics import ServerMetrics
    # The engine runs in its own process; here the sender thread (commands to it) and the tokenizing threads
    # must still win the GIL from the busy event loop: 0.5 ms, not the default 5, bounds what that adds to
    # a request's time to first token.
    sys.setswitchinterval(0.0005)
    name = args.served_model_name or args.model or DEFAULT_MODEL_NAME
    kwargs = engine_kwargs(args)
    engine = AsyncEngine(kwargs, ServerMetrics(name), args.max_pending_requests)
    app = create_app(ServerState(engine, name, args.model or DEFAULT_MODEL_NAME, args.api_key))
    run_server(app, engine, args.host, args.port, args.shutdown_timeout, args.log_level)
    if engine.error is not None:
        print(f"error: the engine failed: {engine.error}", file=sys.stderr)
        return 1
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from nanovllm.server.bench import run_benchmark
    run_benchmark(args)
    return 0
