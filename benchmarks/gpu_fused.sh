#!/usr/bin/env bash
# One device call for the fused o_proj kernel: environment, the benchmark (it checks each row against the
# reference before timing it), then the GPU tests in the same process, so they reuse its tuning.
# Everything lands in $OUT (default /tmp/fused_out).
#   bash benchmarks/gpu_fused.sh
set -o pipefail
OUT=${OUT:-/tmp/fused_out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
timeout "${RUN_TIMEOUT:-450}" python3 - <<'PY' 2>&1 | tee "$OUT/run.log"
import os, sys, time, traceback
import pytest
import bench_fused_o_proj as bench
t0 = time.time()
sys.argv = ["bench_fused_o_proj.py", "--out-dir", os.environ["OUT"]]
try:
    bench.main()
except Exception:
    traceback.print_exc()
print(f"bench took {time.time() - t0:.0f} s", flush=True)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--noconftest", "--durations=5",
                      "tests/test_fused_attention_output.py"]))
PY
