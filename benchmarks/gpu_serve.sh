#!/usr/bin/env bash
# One device call for issue 5's GPU figures: the offline engine and `nanovllm serve` + `nanovllm bench serve`
# on the same requests (Qwen3-0.6B architecture with SmolLM2's 49,152-token vocabulary and tokenizer, so every
# generated id has text; random bf16 weights), then the offline throughput benchmark again (not with
# SKIP_THROUGHPUT=1). The server runs its engine in a second process (spawned, with this environment), so the
# HTTP side and the engine each have a core.
# Needs, carried (all git-ignored, made on the CPU machine):
#   .gpuserve/qwen3-0.6b   python benchmarks/make_serve_model.py
#   .whl/serve             pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#                          --platform manylinux_2_17_x86_64 -d .whl/serve fastapi starlette uvicorn pydantic
#                          pydantic-core annotated-types typing-inspection opentelemetry-api typing-extensions
#   .whl/kernels           the same for gguf (and pytest for gpu_run.sh)
#   .triton_cache          optional: compiled kernels from an earlier call (saves ~40 s of start-up)
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PYTHONPATH=/tmp/site python3 -c "import fastapi, uvicorn, gguf" 2>/dev/null ||  # gpu_all.sh installed them
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/serve/*.whl .whl/kernels/gguf-*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
MODEL=.gpuserve/qwen3-0.6b N=${N:-256} IN=${IN:-256} OUTLEN=${OUTLEN:-256}
ENGINE="--model $MODEL --load-format dummy --max-model-len 2048"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
timeout 150 python3 - "$MODEL" "$N" "$IN" "$OUTLEN" <<'PY' 2>&1 | tee "$OUT/offline.log"
import json, random, sys, time
from nanovllm import LLM, SamplingParams
model, n, in_len, out_len = sys.argv[1], *map(int, sys.argv[2:])
llm = LLM(model, load_format="dummy", max_model_len=2048)
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
timeout 150 python3 -m nanovllm bench serve --url http://127.0.0.1:8011 --num-prompts "$N" --input-len "$IN" \
    --output-len "$OUTLEN" --seed 0 --output-json "$OUT/serve.json" --label "$(cat "$OUT/card.txt")" 2>&1 \
    | tee "$OUT/bench_serve.log"
# CPU seconds of the HTTP process and its children (the engine process, multiprocessing's resource tracker):
# which side would saturate first.
for pid in $SERVER $(ps -o pid= --ppid $SERVER); do
    echo "$pid $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-60) cpu_s=$(awk -v t="$(getconf CLK_TCK)" \
        '{print ($14 + $15) / t}' /proc/$pid/stat)"
done | tee "$OUT/server_cpu.txt"
kill -TERM $SERVER; wait $SERVER; echo "server exit $?" >> "$OUT/server.log"
[ -n "$SKIP_THROUGHPUT" ] || timeout 120 python3 benchmarks/bench_throughput.py --out-dir "$OUT" 2>&1 | tail -20 | tee "$OUT/throughput.log"
ls -la "$OUT"
