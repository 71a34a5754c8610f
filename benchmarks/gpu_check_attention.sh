#!/usr/bin/env bash
# One device call for the one-launch decode attention (the split merge done by each (seq, KV head)'s last
# split, nanovllm/kernels/paged_attention.py), each step under its own limit, in this order:
#   tests    tests/test_triton_kernels.py's attention tests on the GPU: real shapes at batch 1/64/256 and
#            1/8/default splits, a graph replayed twice (the counters' reset), determinism over 20 calls
#            with 32 splits, and the PDL chain in a graph bit for bit against eager without PDL
#   after    bench_attention.py decode_graph decode: the engine's small-batch decode shapes at several split
#            counts, and the standard decode table, into $OUT/after
#   before   the same decode_graph rows with the two-kernel version, if benchmarks/paged_attention_before.py
#            exists (untracked; make it before the call with
#            `git show 20a5c62:nanovllm/kernels/paged_attention.py > benchmarks/paged_attention_before.py`),
#            into $OUT/before: a before/after on the same card
# Logs: $OUT/*.log and $OUT/steps.txt. Carry: .whl (pytest), .triton_cache (compiled kernels).
#   bash benchmarks/gpu_check_attention.sh
set -o pipefail
OUT=${OUT:-/tmp/attn_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/kernels/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1
step() {  # step NAME SECONDS COMMAND...: logs to $OUT/NAME.log
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}
step tests 200 python3 -m pytest -q -p no:cacheprovider --durations=10 tests/test_triton_kernels.py \
    -k "decode or attention or pdl"
step after 150 python3 benchmarks/bench_attention.py "$OUT/after" decode_graph decode
if [[ -f benchmarks/paged_attention_before.py ]]; then
    BENCH_ATTENTION_FILE=benchmarks/paged_attention_before.py \
        step before 100 python3 benchmarks/bench_attention.py "$OUT/before" decode_graph
fi
tail -3 "$OUT/tests.log"
grep -h "graph-\|MISMATCH" "$OUT"/after.log "$OUT"/before.log 2>/dev/null
