#!/usr/bin/env bash
# One device call for the GPU fast path (issues 4 and 8): environment, latency (kernel counts, fused o_proj
# on/off), throughput (with transformers and the roofline), then the GPU tests. Each step has its own time
# limit, so one that hangs leaves the others their share. Results land in $OUT (default /tmp/gpu_out):
# latency/e2e_fused/throughput JSON (+ PNG), gpu_tests.json, logs.tgz and the Triton cache (to carry into
# the next call as .triton_cache, saving the kernel compiles).
#   bash benchmarks/gpu_run.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache NANOVLLM_CACHE_DIR=$PWD/.triton_cache/nanovllm NANOVLLM_GPU_REPORT=$OUT/gpu_tests.json
if ls .whl/kernels/*.whl >/dev/null 2>&1; then  # pytest and its needs travel as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/kernels/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem --format=csv
    python3 -c "import torch, triton, transformers as t; print(torch.__version__, triton.__version__, t.__version__)"
    du -sh .triton_cache 2>/dev/null
} 2>&1 | tee "$LOGS/env.txt"
step() {  # step NAME SECONDS COMMAND...: runs it under a time limit, logs to $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOGS/steps.txt"
}
step latency "${LAT_TIMEOUT:-180}" python3 benchmarks/bench_latency.py --out-dir "$OUT"
step throughput "${TPUT_TIMEOUT:-120}" python3 benchmarks/bench_throughput.py --out-dir "$OUT"
step tests "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider --durations=15 -s -rA tests/test_gpu.py
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
tar cJf "$OUT/triton_cache.tar.xz" .triton_cache 2>/dev/null
[ "$(stat -c %s "$OUT/triton_cache.tar.xz" 2>/dev/null || echo 0)" -lt 15000000 ] || rm -f "$OUT/triton_cache.tar.xz"
ls -la "$OUT"
