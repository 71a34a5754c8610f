#!/usr/bin/env bash
# One device call on 2 GPUs (issue 7): tensor parallelism 1 vs 2 on the Qwen3-8B and -4B architectures
# (benchmarks/bench_tp.py). Results in $OUT: tp-<card>.json, tp.log, the Triton cache (carry it back as
# .triton_cache to skip kernel compiles next time). NVLink multicast stays off (KINDS.md).
#   bash benchmarks/gpu_tp.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{
    nvidia-smi --query-gpu=name,memory.total --format=csv
    nvidia-smi topo -m
    python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TP_TIMEOUT:-540}" python3 benchmarks/bench_tp.py --out-dir "$OUT" ${ARCHS:+--archs $ARCHS} 2>&1 \
    | tee "$OUT/tp.log"
echo "== bench_tp exit ${PIPESTATUS[0]}"
tar cJf "$OUT/triton_cache.tar.xz" .triton_cache 2>/dev/null
[ "$(stat -c %s "$OUT/triton_cache.tar.xz" 2>/dev/null || echo 0)" -lt 15000000 ] || rm -f "$OUT/triton_cache.tar.xz"
