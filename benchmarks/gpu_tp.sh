#!/usr/bin/env bash
# One device call on 2 GPUs (issue 7), ~3-8 minutes on 2 x H100 / H200:
#   1. tests/test_gpu_all_reduce.py: the one-shot kernel on both GPUs against the rank-order sum -> test.log
#   2. all-reduce latency in CUDA graphs: NCCL vs symmetric memory, torch's kernels and nanovllm's one-shot
#      kernel on a slot (benchmarks/bench_allreduce.py) -> allreduce-<card>.json, allreduce.log
#   3. tensor parallelism 1 vs 2 (benchmarks/bench_tp.py, runs RUNS, default tp1_async tp2_async_symm)
#      -> tp-<card>.json, tp.log
#   4. with PROFILE=1, benchmarks/profile_throughput.py on the 8B at TP 1 and 2 (PROFILE_TPS="2": TP 2 only)
#      -> profile_throughput-*.json
# All of it comes back in $OUT/results.tgz, beside the Triton cache (carry it back as .triton_cache.tar.xz).
# NVLink multicast stays off (KINDS.md); nanovllm's all-reduce uses peer-to-peer kernels only.
#   bash benchmarks/gpu_tp.sh                  (carry .whl and .triton_cache.tar.xz)
set -o pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/kernels/*.whl \
    >/dev/null 2>&1
[ -f .triton_cache.tar.xz ] && tar xJf .triton_cache.tar.xz
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache NANOVLLM_CACHE_DIR=$PWD/.triton_cache/nanovllm
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100' | tr 'A-Z' 'a-z')
{
    nvidia-smi --query-gpu=name,memory.total --format=csv
    nvidia-smi topo -m
    python3 -c "import torch; print(torch.__version__, torch.cuda.nccl.version())"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -x -q -p no:cacheprovider tests/test_gpu_all_reduce.py 2>&1 \
    | tail -30 | tee "$OUT/test.log"
echo "== test exit ${PIPESTATUS[0]}"
if [ "${AR:-1}" = 1 ]; then  # AR=0 skips it
    timeout "${AR_TIMEOUT:-120}" python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_allreduce.py \
        --out "$OUT/allreduce-${TAG:-gpu}.json" 2>&1 | tee "$OUT/allreduce.log"
    echo "== bench_allreduce exit ${PIPESTATUS[0]}"
fi
timeout "${TP_TIMEOUT:-400}" python3 benchmarks/bench_tp.py --out-dir "$OUT" --runs ${RUNS:-tp1_async tp2_async_symm} \
    2>&1 | tee "$OUT/tp.log"
echo "== bench_tp exit ${PIPESTATUS[0]}"
if [ "${PROFILE:-0}" = 1 ]; then  # where the 8B workload's time goes at TP 1 and 2 (symmetric memory)
    for tp in ${PROFILE_TPS:-1 2}; do
        timeout "${PROFILE_TIMEOUT:-150}" python3 benchmarks/profile_throughput.py \
            --config qwen3-8b --tp $tp --out-dir "$OUT" 2>&1 | grep -v "^\s*[0-9.]* us" | tee "$OUT/profile-tp$tp.log"
    done
fi
find .triton_cache -type f \( -name '*.ttir' -o -name '*.ttgir' -o -name '*.llir' -o -name '*.ptx' -o -name '*.source' \) \
    -delete 2>/dev/null
tar cJf "$OUT/triton_cache.tar.xz" .triton_cache 2>/dev/null
[ "$(stat -c %s "$OUT/triton_cache.tar.xz" 2>/dev/null || echo 0)" -lt 15000000 ] || rm -f "$OUT/triton_cache.tar.xz"
# The device tool returns at most 8 files from $OUT: the results travel as one archive beside the cache.
tar czf /tmp/results.tgz -C "$OUT" --exclude=./triton_cache.tar.xz . && find "$OUT" -mindepth 1 -maxdepth 1 \
    ! -name triton_cache.tar.xz -exec rm -rf {} + && mv /tmp/results.tgz "$OUT/"
