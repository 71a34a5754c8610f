#!/usr/bin/env bash
# One device call for issue 5's GPU figures: the offline engine and `nanovllm serve` + `nanovllm bench serve`
# on the same requests (Qwen3-0.6B architecture with SmolLM2's 49,152-token vocabulary and tokenizer, so every
# generated id has text; random bf16 weights), then the offline throughput benchmark again (not with
# SKIP_THROUGHPUT=1). The server runs its engine in a second process (spawned, with this environment), so the
# HTTP side and the engine each have a core; the bench client runs in 4 processes (and once in 1, to show
# whether one Python client keeps up). Then, unless SKIP_HTTP=1, benchmarks/bench_http.py: the HTTP process's
# CPU per streamed token on this host's CPU with a stand-in engine, asyncio + h11 against uvloop + httptools.
# Writes $OUT/serve-<card>.json (the keys of benchmarks/results/serve-h100.json, plus CPU seconds of the
# timed run: HTTP process, engine process, client).
# Both engines may take the same extra settings, e.g. once the CLI has the flag:
#   SERVE_FLAGS=--no-async-scheduling OFFLINE_KWARGS='{"async_scheduling": false}' bash benchmarks/gpu_serve.sh
# Needs, carried (all git-ignored, made on the CPU machine):
#   .gpuserve/qwen3-0.6b   python benchmarks/make_serve_model.py
#   .whl/serve             pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#                          --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl/serve
#                          fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
#                          opentelemetry-api typing-extensions uvloop httptools
#   .whl/kernels           the same for gguf (and pytest for gpu_all.sh)
#   .triton_cache          optional: compiled kernels from an earlier call (saves ~40 s of start-up)
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PYTHONPATH=/tmp/site python3 -c "import fastapi, uvicorn, gguf, uvloop, httptools" 2>/dev/null ||  # gpu_all.sh did
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/serve/*.whl .whl/kernels/gguf-*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache NANOVLLM_CACHE_DIR=$PWD/.triton_cache/nanovllm
MODEL=.gpuserve/qwen3-0.6b N=${N:-256} IN=${IN:-256} OUTLEN=${OUTLEN:-256} CLIENTS=${CLIENTS:-4}
ENGINE="--model $MODEL --load-format dummy --max-model-len 2048 ${SERVE_FLAGS:-}"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee "$OUT/card.txt"
timeout 150 python3 - "$MODEL" "$N" "$IN" "$OUTLEN" "${OFFLINE_KWARGS:-{\}}" <<'PY' 2>&1 | tee "$OUT/offline.log"
import json, random, sys, time
from nanovllm import LLM, SamplingParams
model, n, in_len, out_len, kwargs = sys.argv[1], *map(int, sys.argv[2:5]), json.loads(sys.argv[5])
llm = LLM(model, load_format="dummy", max_model_len=2048, **kwargs)
rng = random.Random(0)
prompts = [[rng.randrange(1000, 40000) for _ in range(in_len)] for _ in range(n)]
params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
llm.generate(prompts[:8], params, use_tqdm=False)
t = time.perf_counter()
outs = llm.generate(prompts, params, use_tqdm=False)
dt = time.perf_counter() - t
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print(json.dumps({"offline_output_tok_per_s": tokens / dt, "offline_seconds": dt, "output_tokens": tokens}))
PY
python3 -m nanovllm serve $ENGINE --port 8011 --log-level warning > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 240); do
    python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8011/health').status_code != 200)" \
        2>/dev/null && break
    sleep 0.5
done
bench() {  # bench CLIENTS NAME [more args]: one `nanovllm bench serve` run, its JSON in $OUT/NAME.json
    local clients=$1 name=$2
    shift 2
    timeout 150 python3 -m nanovllm bench serve --url http://127.0.0.1:8011 --num-prompts "$N" \
        --input-len "$IN" --output-len "$OUTLEN" --seed 0 --num-clients "$clients" --server-pid "$SERVER" \
        --output-json "$OUT/$name.json" --label "$(cat "$OUT/card.txt")" "$@" 2>&1 | tee "$OUT/$name.log"
}
bench 1 bench-warmup --num-prompts 32 --output-len 32 > /dev/null
bench 1 bench-1client
bench "$CLIENTS" bench
# CPU seconds over the whole life of the HTTP process and its children (the engine process,
# multiprocessing's resource tracker): the first line is the HTTP process.
for pid in $SERVER $(ps -o pid= --ppid $SERVER); do
    echo "$pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-60) cpu_s=$(awk -v t="$(getconf CLK_TCK)" \
        '{print ($14 + $15) / t}' /proc/$pid/stat)"
done | tee "$OUT/server_cpu.txt"
kill -TERM $SERVER; wait $SERVER; echo "server exit $?" >> "$OUT/server.log"
python3 - "$OUT" <<'PY' || echo "could not write serve-<card>.json"
import json, os, re, sys, time
out = sys.argv[1]
card = open(f"{out}/card.txt").read().strip()
offline = json.loads([line for line in open(f"{out}/offline.log") if line.startswith("{")][-1])
r, one = (json.load(open(f"{out}/{name}.json")) for name in ("bench", "bench-1client"))
lifetime = [float(line.rsplit("cpu_s=", 1)[1]) for line in open(f"{out}/server_cpu.txt")]
ms = lambda s: {k: round(s[k], 2) for k in ("mean", "p50", "p99")}
row = {
    "backend": r["backend"], "num_prompts": r["num_prompts"], "request_rate": r["request_rate"],
    "input_len": r["input_len"], "output_len": r["output_len"], "seed": r["seed"],
    "model": "Qwen3-0.6B architecture with SmolLM2's 49,152-token vocabulary, random bf16 weights",
    "card": card, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "server": "nanovllm serve, engine in its own process (HTTP process + engine process)",
    "completed": r["completed"], "failed": r["failed"], "duration_s": round(r["duration_s"], 2),
    "request_throughput": round(r["request_throughput"], 2), "output_throughput": round(r["output_throughput"], 1),
    "total_token_throughput": round(r["total_token_throughput"], 1),
    "peak_output_throughput": r["peak_output_throughput"],
    **{k: ms(r[k]) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")},
    **offline, "server_vs_offline": r["output_throughput"] / offline["offline_output_tok_per_s"],
    "cpu_seconds_whole_lifetime": {"http_process": lifetime[0], "engine_process": max(lifetime[1:], default=0)},
    "engine_settings": {"serve_flags": os.environ.get("SERVE_FLAGS", ""),
                        "offline_kwargs": os.environ.get("OFFLINE_KWARGS", "{}")},
    "num_clients": r["num_clients"],
    "cpu_seconds_timed_run": {"http_process": r["server_cpu_s"]["http"],
                              "engine_process": r["server_cpu_s"]["children"], "client": r["client_cpu_s"]},
    "one_client_process": {"output_throughput": round(one["output_throughput"], 1),
                           "server_vs_offline": one["output_throughput"] / offline["offline_output_tok_per_s"],
                           "ttft_ms": ms(one["ttft_ms"]), "tpot_ms": ms(one["tpot_ms"]),
                           "cpu_seconds_timed_run": {"http_process": one["server_cpu_s"]["http"],
                                                     "client": one["client_cpu_s"]}},
}
slug = re.sub(r"[^a-z0-9]+", "-", re.search(r"[A-Z]\d{3}|$", card).group().lower() or card.lower()).strip("-")
with open(f"{out}/serve-{slug}.json", "w") as f:
    json.dump(row, f, indent=1)
print(f"serve-{slug}.json: server {row['output_throughput']} tok/s = {row['server_vs_offline']:.2f} x offline")
PY
[ -n "$SKIP_HTTP" ] || timeout 120 python3 benchmarks/bench_http.py --model "$MODEL" --rounds 3 \
    --num-prompts "$N" --output-len 128 --output-json "$OUT/bench_http.json" 2>&1 | tail -20 | tee "$OUT/bench_http.log"
[ -n "$SKIP_THROUGHPUT" ] || timeout 120 python3 benchmarks/bench_throughput.py --out-dir "$OUT" 2>&1 | tail -20 | tee "$OUT/throughput.log"
ls -la "$OUT"
# The device tool returns at most 8 files: the logs and the runs' own JSONs go into one archive.
(cd "$OUT" && tar czf serve_logs.tgz --remove-files card.txt offline.log server.log server_cpu.txt bench*.log \
    bench-*.json bench.json)  # bench*.log includes bench_http.log when it ran
