#!/usr/bin/env bash
# One device call for the fused o_proj kernel: environment; the benchmark (it checks each row against the
# reference before timing it), then this kernel's GPU tests in the same process, so they reuse its tuning;
# then the model-level GPU tests of the fused path (tests/test_gpu.py -k "$GPU_TESTS"). Each step has its
# own time limit. Everything lands in $OUT (default /tmp/fused_out); with SAVE_TRITON_CACHE=1 also the
# Triton cache as a tarball that the next call can carry back as .triton_cache_fused.tar.xz (it saves the
# compiles, ~50 s; unpacked, the cache is over the 64 MiB that travels). About 200 s on an H100.
#   bash benchmarks/gpu_fused.sh          # carry: .whl (pytest, gguf), .triton_cache_fused.tar.xz
set -o pipefail
OUT=${OUT:-/tmp/fused_out}
mkdir -p "$OUT"
if ls .whl/kernels/*.whl >/dev/null 2>&1; then  # pytest and gguf travel as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/kernels/*.whl && export PYTHONPATH=/tmp/site
fi
[ -f .triton_cache_fused.tar.xz ] && tar xJf .triton_cache_fused.tar.xz
export OUT PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache_fused
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
t0=$SECONDS
timeout "${RUN_TIMEOUT:-170}" python3 - <<'PY' 2>&1 | tee "$OUT/run.log"
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
echo "== bench + kernel tests: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/run.log"
if [ -n "${GPU_TESTS:-fused}" ]; then
    t0=$SECONDS
    NANOVLLM_GPU_REPORT=$OUT/gpu_tests.json timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -s \
        -p no:cacheprovider --durations=5 tests/test_gpu.py -k "${GPU_TESTS:-fused}" 2>&1 | tee "$OUT/gpu_tests.log"
    echo "== tests/test_gpu.py -k ${GPU_TESTS:-fused}: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/run.log"
fi
if [ "${SAVE_TRITON_CACHE:-0}" = 1 ]; then  # ~30 s of xz for ~90 MB: only when asked
    XZ_OPT=-1 tar cJf "$OUT/triton_cache_fused.tar.xz" .triton_cache_fused 2>/dev/null
    [ "$(stat -c %s "$OUT/triton_cache_fused.tar.xz" 2>/dev/null || echo 0)" -lt 15000000 ] \
        || rm -f "$OUT/triton_cache_fused.tar.xz"
fi
ls -la "$OUT"
