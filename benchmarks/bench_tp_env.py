"""bench_tp's throughput alone, one engine per process, so that settings read once at start (environment
variables such as NANOVLLM_PUSH_MAX_BYTES or NANOVLLM_PDL_MAX_TOKENS) can be compared on one host:

    NANOVLLM_PDL_MAX_TOKENS=512 python benchmarks/bench_tp_env.py 2 tp2_pdl512.json

Qwen3-8B architecture, random bf16 weights, async scheduling, the symmetric-memory all-reduce unless the
environment says NANOVLLM_SYMM_MEM=0; the workload and its median of 3 runs are bench_throughput's. Writes
the figures and the NANOVLLM_* environment to the JSON file named. BENCH_TP_AGREEMENT=1 first runs bench_tp's
agreement generations (greedy with top-20 logprobs, then prompt logprobs), as bench_tp's engines do.
"""
import os
import sys
import time

from bench_latency import model_dir, write_json
from bench_tp import CONFIGS, greedy_run, make_engine, measure_throughput, prompts, scored


def main() -> None:
    tp, out = int(sys.argv[1]), sys.argv[2]
    t0 = time.perf_counter()
    llm = make_engine(model_dir(os.path.join(CONFIGS, "qwen3-8b.json")), tensor_parallel_size=tp,
                      async_scheduling=True)
    result = {"tp": tp, "env": {k: v for k, v in os.environ.items() if k.startswith("NANOVLLM_")},
              "startup_s": time.perf_counter() - t0}
    if os.environ.get("BENCH_TP_AGREEMENT") == "1":
        tokens, _ = greedy_run(llm)
        scored(llm, [p + t for p, t in zip(prompts(), tokens)])
        result["agreement_first"] = True
    measure_throughput(llm, result)
    print(f"TP {tp} {result['env']}: {result['output_tok_per_s']:.0f} tok/s, runs {result['repeats_seconds']}",
          flush=True)
    write_json(out, result)
    llm.close()


if __name__ == "__main__":
    main()
