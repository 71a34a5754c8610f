#!/usr/bin/env bash
# One device call for programmatic dependent launch (nanovllm/kernels/pdl.py) and the RMSNorm folded into
# qkv_proj / gate_up_proj at one token (rmsnorm_project), each step under its own limit, in this order:
#   bench    benchmarks/bench_pdl.py: decode-step GPU time at batch 1 and 8: PDL off, on, on with
#            qkv_proj and gate_up_proj through the dispatcher's projection-only mode, and with the fold
#   model    tests/test_gpu.py -k "$GPU_TESTS": fused on/off greedy identity (graphs, PDL and fold on)
#   kernels  the fold's GPU tests (bit for bit against the norm kernel then the gemv, for each kind of
#            gemv tiling; a chain in a CUDA graph), the decode-step chain of PDL kernels in a graph, and
#            the elementwise kernels (RMSNorm, RoPE + KV store per head, SiLU-and-mul) at prefill sizes
#   fused    benchmarks/bench_fused_o_proj.py (issue 8's table), with whatever time is left
# Every step's limit is cut to the time left before BUDGET_S (default 288 s). Results and logs land in
# $OUT/pdl.tgz, beside the fused kernel's tuning file (bring it back into .triton_cache/nanovllm so the
# next call's engines start without timing). Carry: .whl (pytest, gguf), .triton_cache (compiled kernels).
#   bash benchmarks/gpu_pdl.sh
#   STEPS="bench" bash benchmarks/gpu_pdl.sh
set -o pipefail
OUT=${OUT:-/tmp/pdl_out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
STEPS=${STEPS:-bench model kernels fused}
DEADLINE=$((SECONDS + ${BUDGET_S:-288}))
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/kernels/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NANOVLLM_CACHE_DIR=$PWD/.triton_cache/nanovllm
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$LOGS/env.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    >> "$LOGS/env.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 t0=$SECONDS left=$((DEADLINE - SECONDS))
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    ((left < limit)) && limit=$left
    ((limit > 5)) || { echo "$name: skipped, no time left" | tee -a "$LOGS/steps.txt"; return 0; }
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$LOGS/steps.txt"
}
PYTEST=(python3 -m pytest -q -p no:cacheprovider --durations=5)
step bench 150 python3 benchmarks/bench_pdl.py --out-dir "$OUT/results"
step model 50 env NANOVLLM_GPU_REPORT="$OUT/results/gpu_tests.json" "${PYTEST[@]}" -s tests/test_gpu.py \
    -k "${GPU_TESTS:-fused_output_on_and_off or fused_residual}"
step kernels 70 "${PYTEST[@]}" tests/test_triton_kernels.py tests/test_fused_attention_output.py \
    -k "${KERNEL_TESTS:-folded or rmsnorm_project or pdl_chain or elementwise}"
step fused 200 env NANOVLLM_CACHE_DIR= python3 benchmarks/bench_fused_o_proj.py --out-dir "$OUT/results"
cp .triton_cache/nanovllm/fused_o_proj_tuning.json "$OUT/" 2>/dev/null
tar czf "$OUT/pdl.tgz" -C "$OUT" logs results 2>/dev/null
cat "$LOGS/steps.txt"
tail -n 30 "$LOGS/bench.log" 2>/dev/null
tail -n 12 "$LOGS/fused.log" 2>/dev/null
grep -E "passed|failed|error" "$LOGS"/kernels.log "$LOGS"/model.log 2>/dev/null | tail -n 6
