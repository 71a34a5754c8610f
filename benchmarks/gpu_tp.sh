#!/usr/bin/env bash
# One device call on 2 GPUs (issue 7), ~5 minutes on 2 x H100:
#   1. all-reduce latency in CUDA graphs: NCCL vs symmetric memory, kernels alone and the engine's paths
#      (benchmarks/bench_allreduce.py) -> allreduce-<card>.json, allreduce.log
#   2. tensor parallelism 1 vs 2 (benchmarks/bench_tp.py): Qwen3-8B bf16 TP1 (graphs, eager), TP2 with the
#      symmetric-memory all-reduce and with NCCL (NANOVLLM_SYMM_MEM=0); Qwen3-4B fp32 TP1 vs TP2
#      -> tp-<card>.json, tp.log
# Also in $OUT: env.txt and the Triton cache (carry it back as .triton_cache to skip kernel compiles next
# time). NVLink multicast stays off (KINDS.md); nanovllm's all-reduce uses peer-to-peer kernels only.
#   bash benchmarks/gpu_tp.sh
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache NANOVLLM_CACHE_DIR=$PWD/.triton_cache/nanovllm
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100' | tr 'A-Z' 'a-z')
{
    nvidia-smi --query-gpu=name,memory.total --format=csv
    nvidia-smi topo -m
    python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())"
} 2>&1 | tee "$OUT/env.txt"
timeout "${AR_TIMEOUT:-100}" python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_allreduce.py \
    --out "$OUT/allreduce-${TAG:-gpu}.json" 2>&1 | tee "$OUT/allreduce.log"
echo "== bench_allreduce exit ${PIPESTATUS[0]}"
timeout "${TP_TIMEOUT:-460}" python3 benchmarks/bench_tp.py --out-dir "$OUT" ${RUNS:+--runs $RUNS} 2>&1 \
    | tee "$OUT/tp.log"
echo "== bench_tp exit ${PIPESTATUS[0]}"
tar cJf "$OUT/triton_cache.tar.xz" .triton_cache 2>/dev/null
[ "$(stat -c %s "$OUT/triton_cache.tar.xz" 2>/dev/null || echo 0)" -lt 15000000 ] || rm -f "$OUT/triton_cache.tar.xz"
