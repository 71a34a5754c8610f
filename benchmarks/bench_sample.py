"""The in-graph sampling kernels (kernels/sample.py) on the GPU: Qwen3's 151,936-token vocabulary in bf16,
batch 1, 52, 145 and 256 (nano-vllm's workload as its seqs finish), at temperature 0.6 (Gumbel-max: one
Philox call per 4 tokens) and 0 (argmax), in CUDA graphs, beside torch's sampling of the same logits
(sample_ref: softmax, exponential race, argmax). BENCH_SAMPLE_FILE=path also times that copy of
sample.py (an older one from `git show`) in the same process, for a before/after.
Usage: python benchmarks/bench_sample.py [out_dir]   (writes sample-<card>.json)
"""
import json
import os
import sys

import torch
import triton
from bench_latency import card_name, load_copy

from nanovllm.kernels import sample as kernels

VOCAB = 151936


def bench(fn) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3  # us


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    card, tag = card_name()
    variants = {"ours": kernels}
    if os.environ.get("BENCH_SAMPLE_FILE"):
        variants["before"] = load_copy(os.environ["BENCH_SAMPLE_FILE"], "sample_under_test")
    rows = []
    for batch in (1, 52, 145, 256):
        logits = torch.randn(batch, VOCAB, device="cuda").to(torch.bfloat16)
        seed = torch.tensor([5], dtype=torch.int64, device="cuda")
        out = torch.empty(batch, dtype=torch.int64, device="cuda")
        for temperature in (0.6, 0.0):
            temps = torch.full((batch,), temperature, device="cuda")
            row = dict(batch=batch, temperature=temperature,
                       logits_read_us=batch * VOCAB * 2 / 3e6)  # at 3 TB/s, for scale
            for name, module in variants.items():
                workspace = module.sample_workspace(batch, VOCAB, "cuda")
                row[f"{name}_us"] = bench(lambda m=module, w=workspace: m.sample(logits, temps, seed, out, w))
            row["torch_us"] = bench(lambda: kernels.sample_ref(logits, temps, out))
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            rows.append(row)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"sample-{tag}.json"), "w") as f:
        json.dump(dict(card=card, vocab=VOCAB, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
