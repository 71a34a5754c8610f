#!/usr/bin/env bash
# One device call on 2 or 4 GPUs for the GPU figures of issues 4, 5, 7 and 8, under one deadline (steps are
# chosen with STEPS; lanes below):
#   tp            bench_tp (tensor parallelism 1 vs 2 on the 8B architecture; runs chosen with TP_RUNS)
#   throughput    bench_throughput (async scheduling, the default); throughput_sync: the synchronous loop
#   profile       profile_throughput (kernel time by name over windows of the same workload)
#   pressure      bench_async_pressure; serve: gpu_serve.sh (offline engine vs `nanovllm serve`)
#   tests         tests/test_gpu.py and the async GPU test; latency: bench_latency (fused on/off end to end)
#   pdl           gpu_pdl.sh (PDL and the norm fold, bench_pdl; the fused kernel's table with the time left);
#                 throughput_pdl_all: bench_throughput with PDL at every batch size
#   kernels       the GPU tests of the Triton kernels (attention, the fused o_proj); fused: bench_fused_o_proj
#                 (issue 8's table); attention: bench_attention's decode_graph and decode sections
# The lanes share the host's CPUs (32 on nvidia-h100-x2), which the host-bound figures (throughput,
# serving) may feel. Results and logs land in $OUT/results.tgz (the tool returns at most 8 files), beside
# steps.txt and the Triton cache.
# Carry: .whl (pytest, gguf and the serving wheels), .gpuserve (make_serve_model.py), .triton_cache or
# .triton_cache.tar.xz (compiled kernels, and in .triton_cache/nanovllm the fused kernel's tuning choices, so
# engines start without timing).
#   bash benchmarks/gpu_all.sh
#   STEPS="tp profile tests" TP_RUNS="tp1 tp2" TP_S=270 bash benchmarks/gpu_all.sh   # some steps only
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
DEADLINE=$((SECONDS + ${BUDGET_S:-565}))
STEPS=${STEPS:-tp throughput throughput_sync serve tests latency}  # which steps run (profile, pressure, pdl: on request)
LOGS=$OUT/logs
mkdir -p "$LOGS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/kernels/*.whl .whl/serve/*.whl >/dev/null 2>&1
# The compiled kernels may travel packed (.triton_cache.tar.xz): unpacked they can pass what a call carries.
[ -f .triton_cache.tar.xz ] && tar xJf .triton_cache.tar.xz
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache NANOVLLM_CACHE_DIR=$PWD/.triton_cache/nanovllm
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$LOGS/env.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...: runs it under min(SECONDS, time to the deadline), logs to $LOGS/NAME.log
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
    shift 2
    ((left < limit)) && limit=$left
    ((limit > 10)) || { echo "== $name: skipped, no time left" | tee -a "$LOGS/steps.txt"; return; }
    local t0=$SECONDS
    # Its own session, so that at the limit every process it started goes, including inner `timeout`s
    # (which move into process groups of their own) and spawned workers.
    setsid "$@" > "$LOGS/$name.log" 2>&1 &
    local sid=$!
    ( sleep "$limit"; pkill -TERM -s "$sid"; sleep 10; pkill -KILL -s "$sid" ) > /dev/null 2>&1 &
    local watchdog=$!
    wait "$sid"
    local rc=$?
    kill "$watchdog" 2> /dev/null
    pkill -KILL -s "$sid" 2> /dev/null  # leftovers of a step that finished (a server it forgot)
    echo "== $name: exit $rc after $((SECONDS - t0)) s (limit $limit)" | tee -a "$LOGS/steps.txt"
}
want() { [[ " $STEPS " == *" $1 "* ]]; }
# Lanes: A (tensor parallelism on two GPUs, then single-GPU throughput), B (tests, latency), C (kernel
# tests and benchmarks, gpu_pdl.sh). With 4 GPUs they run side by side (A on 0,1, B on 2, C on 3); with 2,
# B and C share GPU 1 after A's TP step, one after the other (or GPU_B=0 GPU_C=1 without lane A); with 1,
# every step runs alone on the card (C, B, then A), so no timing shares it.
NUM_GPUS=$(nvidia-smi -L | wc -l)
if ((NUM_GPUS >= 4)); then GPU_B=${GPU_B:-2} GPU_C=${GPU_C:-3}; else GPU_B=${GPU_B:-1} GPU_C=${GPU_C:-1}; fi
tp() {
    want tp && CUDA_VISIBLE_DEVICES=0,1 step tp "${TP_S:-180}" python3 benchmarks/bench_tp.py --out-dir "$OUT" \
        --runs ${TP_RUNS:-tp1 tp2 fp32_tp1 fp32_tp2}
}
lane_a() {
    export CUDA_VISIBLE_DEVICES=${GPU_A:-0}
    want throughput && step throughput 200 python3 benchmarks/bench_throughput.py --out-dir "$OUT"  # async: the default
    want throughput_sync && step throughput_sync 70 python3 benchmarks/bench_throughput.py --skip-hf \
        --no-async-scheduling --out-dir "$OUT"
    want profile && step profile 100 python3 benchmarks/profile_throughput.py --out-dir "$OUT"
    want pressure && step pressure 150 python3 benchmarks/bench_async_pressure.py --out-dir "$OUT"
    want serve && OUT=$OUT/serve SKIP_THROUGHPUT=1 SKIP_HTTP=1 step serve 180 bash benchmarks/gpu_serve.sh
}
lane_b() {
    export CUDA_VISIBLE_DEVICES=$GPU_B NANOVLLM_GPU_REPORT=$OUT/gpu_tests.json
    want tests && step tests ${TESTS_S:-190} python3 -m pytest -q -p no:cacheprovider -s -rA --durations=10 tests/test_gpu.py \
        tests/test_async_scheduling.py::test_async_scheduling_on_cuda_graphs
    want latency && step latency 150 python3 benchmarks/bench_latency.py --out-dir "$OUT"
}
lane_c() {
    export CUDA_VISIBLE_DEVICES=$GPU_C
    want kernels && step kernels 200 python3 -m pytest -q -p no:cacheprovider -rf --durations=5 \
        ${KERNEL_TESTS:-tests/test_triton_kernels.py tests/test_fused_attention_output.py}
    want fused && NANOVLLM_CACHE_DIR= step fused 240 python3 benchmarks/bench_fused_o_proj.py --out-dir "$OUT"
    want attention && PYTHONPATH=$PYTHONPATH:$PWD/benchmarks step attention 120 \
        python3 benchmarks/bench_attention.py "$OUT" decode_graph decode
    want pdl && OUT=$OUT/pdl BUDGET_S=${PDL_S:-288} STEPS=${PDL_STEPS:-bench model kernels fused} \
        step pdl "${PDL_S:-288}" bash benchmarks/gpu_pdl.sh
    # the throughput run again with PDL at every batch size (the engine's default is one token)
    want throughput_pdl_all && NANOVLLM_PDL_MAX_TOKENS=100000 step throughput_pdl_all 110 \
        python3 benchmarks/bench_throughput.py --skip-hf --out-dir "$OUT/pdl_all"
}
if ((NUM_GPUS == 1)); then
    GPU_B=0 GPU_C=0
    lane_c; lane_b; lane_a
elif ((NUM_GPUS >= 4)) && ((${GPU_A:-0} == GPU_B)); then  # lane A's steps after lane B's, beside TP
    (tp) & (lane_b; lane_a) & (lane_c) &
elif ((NUM_GPUS >= 4)); then
    (tp; lane_a) & (lane_b) & (lane_c) &
else
    tp  # first, alone on both GPUs
    if ((GPU_B == GPU_C)); then (lane_a) & (lane_b; lane_c) & else (lane_a) & (lane_b) & (lane_c) & fi
fi
wait
cp "$LOGS/steps.txt" "$OUT/steps.txt"
for f in "$LOGS"/*.log; do echo "#### $f"; grep -v "^frame #" "$f" | tail -25 | cut -c1-300; done > "$OUT/tails.txt"
# The device tool returns at most 8 files from $OUT: all but the two summaries go back in one archive.
ls -R "$OUT" > "$OUT/manifest.txt"
tar czf /tmp/results.tgz -C "$OUT" --exclude=./steps.txt --exclude=./tails.txt .
find "$OUT" -mindepth 1 -maxdepth 1 ! -name steps.txt ! -name tails.txt -exec rm -rf {} +
mv /tmp/results.tgz "$OUT/"
find .triton_cache -type f \( -name '*.ttir' -o -name '*.ttgir' -o -name '*.llir' -o -name '*.ptx' -o -name '*.source' \) \
    -delete  # intermediates: the cubins and their metadata are what a later call reuses
XZ_OPT=-2 tar cJf "$OUT/triton_cache.tar.xz" .triton_cache 2>/dev/null
[ "$(stat -c %s "$OUT/triton_cache.tar.xz" 2>/dev/null || echo 0)" -lt 15000000 ] || rm -f "$OUT/triton_cache.tar.xz"
cat "$OUT/steps.txt"; ls -la "$OUT"
