"""The HTTP process's and the bench client's CPU per streamed token, with no model in the way.

`nanovllm serve`'s HTTP process runs as is (tokenizer, validation, AsyncEngine, metrics, SSE, uvicorn), but
its engine process is a stand-in that emits one token per running request every `--step-ms` (a GPU engine's
decode step; 9 ms at 256 requests is the H100's 28k tok/s). `nanovllm bench serve` loads it; the CPU time of
the HTTP process (`--server-pid`: /proc, over the timed run) and of the client (its own process_time) are
divided by the streamed tokens. Servers of each configuration run side by side and the client alternates
between them, so a shared, noisy box treats them alike.

    python benchmarks/bench_http.py                                  # every loop/http pair installed
    python benchmarks/bench_http.py --configs asyncio/h11 uvloop/httptools --rounds 5 --step-ms 9
"""
import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

VOCAB_SIZE = 49152  # SmolLM2's, the default model's tokenizer (the HTTP process loads it)


# ---- the stand-in engine process --------------------------------------------------------------------
def stand_in_core(args: dict, conn, parent_pid: int) -> None:
    """Speaks engine_core's protocol: ready, then one "step" message per tick with one token per request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    from nanovllm.config import Config
    stats = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "num_preemptions": 0,
             "prefix_queries": 0, "prefix_hits": 0}
    conn.send(("ready", Config(model=args["model"], max_model_len=args["max_model_len"]), VOCAB_SIZE, stats))
    running: dict[str, list] = {}  # request id -> [tokens left, arrival time, first token time]
    period, next_step = args["step_ms"] / 1000, time.perf_counter()
    while True:
        aborted = []
        while not running or conn.poll():
            for command in conn.recv():
                if command is None:  # shutdown
                    return
                if command[0] == "add":
                    _, rid, _, params, arrival = command
                    running[rid] = [params.max_tokens, arrival, None]
                else:
                    ids = list(running) if command[1] == "*" else [command[1]]
                    aborted += [rid for rid in ids if running.pop(rid, None) is not None]
            if aborted and not running:
                conn.send(("step", time.time(), [], aborted, [], stats))
                aborted = []
            next_step = max(next_step, time.perf_counter())
        time.sleep(max(0.0, next_step - time.perf_counter()))
        next_step += period
        now, packed = time.time(), []
        for rid, state in list(running.items()):
            state[0] -= 1
            state[2] = state[2] or now
            finished = state[0] == 0
            metrics = (state[1], state[1], state[2], now, now if finished else None)
            packed.append((rid, finished, 0, metrics, None,
                           [(" the", [279], None, None, "length" if finished else None, None)]))
            if finished:
                del running[rid]
        conn.send(("step", now, packed, aborted, [], stats))


def _exit_with_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def serve(port: int, model: str, step_ms: float, loop: str, http: str) -> None:
    """`nanovllm serve`'s HTTP process with the stand-in engine."""
    from nanovllm.server import async_engine
    from nanovllm.server.app import ServerState, create_app
    from nanovllm.server.lifecycle import run_server
    from nanovllm.server.metrics import ServerMetrics
    async_engine.run_engine_core = stand_in_core  # what AsyncEngine.start spawns
    sys.setswitchinterval(0.0005)  # as run_serve
    engine_args = {"model": model, "step_ms": step_ms, "max_model_len": 2048}
    engine = async_engine.AsyncEngine(engine_args, ServerMetrics("stand-in"))
    run_server(create_app(ServerState(engine, "stand-in", "stand-in")), engine, "127.0.0.1", port, 2.0,
               "warning", loop=loop, http=http)


# ---- the measurement ------------------------------------------------------------------------------
def start_server(config: str, port: int, model: str, step_ms: float) -> subprocess.Popen:
    loop, http = config.split("/")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--model", model,
                             "--step-ms", str(step_ms), "--loop", loop, "--http", http], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the {config} server exited with {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"the {config} server did not start")


def run_client(port: int, server_pid: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "serve.json")
        subprocess.run([sys.executable, "-m", "nanovllm", "bench", "serve", "--url", f"http://127.0.0.1:{port}",
                        "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
                        "--output-len", str(args.output_len), "--seed", "0", "--output-json", out,
                        "--server-pid", str(server_pid),
                        *args.client_args], check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)


def measure(args) -> list[dict]:
    servers = {c: start_server(c, 8300 + i, args.model, args.step_ms) for i, c in enumerate(args.configs)}
    rows = []
    try:
        for r in range(args.rounds):
            for i, config in enumerate(args.configs):
                result = run_client(8300 + i, servers[config].pid, args)
                tokens = result["total_output_tokens"]
                http_s = result["server_cpu_s"]["http"]
                row = {"config": config, "round": r, "output_tok_per_s": result["output_throughput"],
                       "ttft_p50_ms": result["ttft_ms"]["p50"], "tokens": tokens,
                       "http_us_per_token": 1e6 * http_s / tokens,
                       "client_us_per_token": 1e6 * result["client_cpu_s"] / tokens}
                rows.append(row)
                print(f"{config:18s} round {r}: {row['output_tok_per_s']:8.0f} tok/s, TTFT p50 "
                      f"{row['ttft_p50_ms']:6.0f} ms, HTTP process {row['http_us_per_token']:5.1f} us/token, "
                      f"client {row['client_us_per_token']:5.1f} us/token", flush=True)
    finally:
        for proc in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return rows


def installed_configs() -> list[str]:
    configs = ["asyncio/h11"]
    if importlib.util.find_spec("uvloop") and importlib.util.find_spec("httptools"):
        configs.append("uvloop/httptools")
    return configs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None, help="loop/http pairs (uvicorn's names); "
                   "default: asyncio/h11, and uvloop/httptools where installed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="", help="Whose tokenizer the HTTP process loads, with a vocabulary of "
                   f"{VOCAB_SIZE} (default: the default model, SmolLM2).")
    p.add_argument("--step-ms", type=float, default=9.0, help="The stand-in engine's step time.")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--client-args", nargs=argparse.REMAINDER, default=[],
                   help="Passed on to `nanovllm bench serve` (last on the line).")
    p.add_argument("--output-json", default=None)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # internal: the server
    p.add_argument("--loop", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--http", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve, args.model, args.step_ms, args.loop, args.http)
        return
    args.configs = args.configs or installed_configs()
    rows = measure(args)
    summary = {c: {k: statistics.median(r[k] for r in rows if r["config"] == c)
                   for k in ("output_tok_per_s", "ttft_p50_ms", "http_us_per_token", "client_us_per_token")}
               for c in args.configs}
    print(json.dumps({"medians": summary}, indent=1))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "serve"}, "rows": rows,
                       "medians": summary}, f, indent=1)


if __name__ == "__main__":
    main()
