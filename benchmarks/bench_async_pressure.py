"""Async scheduling where it can lose its overlap: nano-vllm's workload with a KV cache too small for it
(queued requests, preemption) and with top-p sampling (the full sampler rather than the in-graph one),
each with async scheduling off and on, on the Qwen3-0.6B architecture with random bf16 weights.

    python benchmarks/bench_async_pressure.py [--out-dir benchmarks/results]   # writes async_pressure-<card>.json
"""
import argparse
import gc
import json
import os

import torch
from bench_latency import RESULTS_DIR, card_name, model_dir, write_json
from bench_throughput import timed_generate, warm_up, workload

from nanovllm import LLM, SamplingParams

NUM_BLOCKS = 8000  # ~128k tokens of KV: about half of what the 256 requests reach at once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    card, tag = card_name()
    prompts, params = workload()
    rows = []
    for top_p in (1.0, 0.95):
        sampling = [SamplingParams(temperature=0.6, top_p=top_p, ignore_eos=True, max_tokens=p.max_tokens)
                    for p in params]
        for async_scheduling in (False, True):
            llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
                      num_kvcache_blocks=NUM_BLOCKS, async_scheduling=async_scheduling)
            warm_up(llm)
            spent = timed_generate(llm, prompts, sampling)
            rows.append({"top_p": top_p, "async_scheduling": async_scheduling,
                         "output_tok_per_s": sum(p.max_tokens for p in sampling) / spent["seconds"],
                         "num_preemptions": llm.engine.stats()["num_preemptions"], **spent})
            print(json.dumps(rows[-1]), flush=True)
            del llm
            gc.collect()
            torch.cuda.empty_cache()
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, f"async_pressure-{tag}.json"),
               {"card": card, "model": "Qwen3-0.6B architecture, random bf16 weights",
                "num_kvcache_blocks": NUM_BLOCKS, "rows": rows})


if __name__ == "__main__":
    main()
