#!/usr/bin/env bash
# One device call for the fused o_proj kernel: environment, the benchmark (it checks each row against the
# reference before timing it), then the GPU tests. Everything lands in $OUT (default /tmp/fused_out).
#   bash benchmarks/gpu_fused.sh
set -o pipefail
OUT=${OUT:-/tmp/fused_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_fused_o_proj.py --out-dir "$OUT" 2>&1 | tee "$OUT/bench.log"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider --noconftest \
    tests/test_fused_attention_output.py 2>&1 | tee "$OUT/tests.log" | tail -25
