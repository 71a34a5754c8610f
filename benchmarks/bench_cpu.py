"""CPU throughput: nanovllm beside transformers `generate`, same model, same machine, same run.

Default model (SmolLM2-135M-Instruct, dequantized to fp32). Two workloads:
- batch 1: one prompt, greedy, `--bs1-tokens` new tokens (EOS ignored); tok/s of the whole generate call.
- mixed: 32 requests, prompt lengths uniform in [16, 256], output lengths uniform in [16, 128], seed 0,
  EOS ignored. nanovllm runs them with continuous batching; transformers runs them as one left-padded batch
  to the longest output, and only the requested (useful) tokens are counted.
Writes benchmarks/results/cpu.json and cpu.png.
"""
import argparse
import json
import os
import platform
import random
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def make_workload(vocab: int, num: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 128))
            for _ in range(num)]


def bench_nanovllm(path: str, prompt: list[int], bs1_tokens: int, workload) -> tuple[float, float]:
    from nanovllm import LLM, SamplingParams
    llm = LLM(path, max_model_len=1024)
    greedy = SamplingParams(temperature=0, max_tokens=bs1_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm
    t = time.perf_counter()
    out = llm.generate([prompt], greedy, use_tqdm=False)
    bs1 = len(out[0].outputs[0].token_ids) / (time.perf_counter() - t)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in workload]
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in workload], params, use_tqdm=False)
    mixed = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    return bs1, mixed


def bench_hf(path: str, prompt: list[int], bs1_tokens: int, workload) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    common = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, **common)  # warm
        t = time.perf_counter()
        out = model.generate(torch.tensor([prompt]), max_new_tokens=bs1_tokens, min_new_tokens=bs1_tokens,
                             **common)
        bs1 = (out.shape[1] - len(prompt)) / (time.perf_counter() - t)
        width = max(len(p) for p, _ in workload)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in workload])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in workload])
        longest = max(n for _, n in workload)
        t = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, **common)
        mixed = sum(n for _, n in workload) / (time.perf_counter() - t)
    return bs1, mixed


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = ["batch 1", "32 mixed requests"]
    ours = [result["nanovllm_bs1_tok_s"], result["nanovllm_mixed_tok_s"]]
    hf = [result["hf_bs1_tok_s"], result["hf_mixed_tok_s"]]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="nanovllm")
    ax.bar([i + 0.2 for i in x], hf, 0.4, label="transformers generate")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"SmolLM2-135M fp32 on {result['threads']} CPU threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="a .gguf file (default: the default model)")
    parser.add_argument("--bs1-tokens", type=int, default=128)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(RESULTS, "cpu.json"))
    args = parser.parse_args()
    from nanovllm.utils.default_model import resolve_model_path
    path = resolve_model_path(args.model)
    torch.manual_seed(0)
    workload = make_workload(49152, args.num_requests)
    prompt = workload[0][0][:64]
    ours = bench_nanovllm(path, prompt, args.bs1_tokens, workload)
    hf = bench_hf(path, prompt, args.bs1_tokens, workload)
    result = {
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "model": os.path.basename(path), "dtype": "float32", "bs1_new_tokens": args.bs1_tokens,
        "num_requests": args.num_requests,
        "nanovllm_bs1_tok_s": round(ours[0], 2), "hf_bs1_tok_s": round(hf[0], 2),
        "nanovllm_mixed_tok_s": round(ours[1], 2), "hf_mixed_tok_s": round(hf[1], 2),
    }
    result["bs1_speedup"] = round(ours[0] / hf[0], 2)
    result["mixed_speedup"] = round(ours[1] / hf[1], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
