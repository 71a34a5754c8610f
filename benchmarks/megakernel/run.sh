#!/usr/bin/env bash
# Builds chain.cu's variants and runs each (one GPU, ~1 min); JSON per variant into ${OUT:-.}.
set -e
cd "$(dirname "$0")"
out=${OUT:-.}
nvidia-smi --query-gpu=name --format=csv,noheader
for v in "counters:" "batched:-DBATCHED" "ring6:-DRING_SLOTS=6" "l2_ahead12:-DL2_AHEAD=12" "ll:-DLL" "ll_fence:-DLL -DLL_FENCE" "ll_fence_par:-DLL -DLL_FENCE -DPAR_STORES" "counters_par:-DPAR_STORES"; do
  name=${v%%:*}; flags=${v#*:}
  nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a $flags chain.cu -o /tmp/chain_$name
  echo "== $name ($flags)"
  timeout 120 /tmp/chain_$name "$out/chain_$name.json" | grep -v "^card"
done
