"""Batch-1 ms per token by sampling kind, in the engine's default loop (Qwen3-0.6B, random bf16 weights).

Greedy and temperature-only requests sample inside the decode graph (nanovllm/kernels/sample.py); top-k,
top-p and min-p sample in the bucket's FILTER graph (engine/cuda_graph.py), seeded or not; a request with
penalties takes the full Sampler (nanovllm/layers/sampler.py) on the logits the graph leaves, eagerly;
logprobs come from the decode graphs' logprobs step (kernels/logprobs.py; --logprobs times those kinds, into
sampling_loop-<card>-logprobs.json). This runs requests of each kind one after another in one engine, in the
order given, and reports each request's ms per token from its token times (as bench_latency's default
loop). Each order runs in a process of its own, so a kind's first request after startup and its later ones
can be told apart. Writes sampling_loop-<card>.json and a PNG of each request (--plot redraws it).

    python benchmarks/bench_sampling_loop.py [--logprobs]
    python benchmarks/bench_sampling_loop.py --plot benchmarks/results/sampling_loop-h100.json
"""
import argparse
import json
import os

import torch
from bench_latency import PROMPT_LEN, RESULTS_DIR, card_name, child_json, model_dir, write_json

from nanovllm import LLM, SamplingParams

TOKENS = 256
KINDS = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=0.8, top_k=50),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "qwen3_recommended": dict(temperature=0.6, top_p=0.95, top_k=20),  # Qwen3's generation_config.json
    "top_p_seed": dict(temperature=0.8, top_p=0.9, seed=1),
    "min_p": dict(temperature=0.8, min_p=0.05),
    "repetition_penalty": dict(temperature=0, repetition_penalty=1.1),
    "logprobs_5": dict(temperature=0, logprobs=5),
    "logprobs_20": dict(temperature=0, logprobs=20),
    "top_p_logprobs_2": dict(temperature=0.8, top_p=0.9, logprobs=2),
}
ORDERS = [
    "greedy,greedy,temperature,temperature,top_k,top_k,top_p,top_p,qwen3_recommended,greedy,greedy",
    "greedy,top_p_seed,top_p_seed,min_p,min_p,repetition_penalty,repetition_penalty,temperature,greedy,greedy",
]
LOGPROBS_ORDERS = [
    "greedy,logprobs_5,logprobs_5,logprobs_20,logprobs_20,top_p_logprobs_2,top_p_logprobs_2,greedy,greedy",
]


def run_order(order: str) -> list[dict]:
    """ms per token of each request, in one engine of batch 1."""
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1, max_model_len=1024)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for kind in order.split(","):
        prompt = torch.randint(0, 10000, (PROMPT_LEN,), generator=gen).tolist()
        params = SamplingParams(ignore_eos=True, max_tokens=TOKENS, **KINDS[kind])
        metrics = llm.generate([prompt], params, use_tqdm=False)[0].metrics
        rows.append({"kind": kind, "ms_per_token": 1e3 * (metrics.last_token_time - metrics.first_token_time)
                     / (TOKENS - 1)})
    llm.close()
    return rows


def plot(path: str) -> None:
    """Each request's ms per token, in each process's order, coloured by kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        data = json.load(f)
    colors = dict(zip(KINDS, plt.get_cmap("tab20").colors))
    fig, axes = plt.subplots(1, len(data["processes"]), figsize=(9, 4), sharey=True, squeeze=False)
    axes = axes[0]
    for i, (ax, run) in enumerate(zip(axes, data["processes"])):
        rows = run["requests"]
        ax.bar(range(len(rows)), [r["ms_per_token"] for r in rows], color=[colors[r["kind"]] for r in rows])
        ax.set_xticks(range(len(rows)), [r["kind"].replace("_", " ") for r in rows], rotation=60, ha="right",
                      fontsize=8)
        ax.set_title(f"process {i + 1}, requests in order", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("ms per token, batch 1")
    fig.suptitle(f"Sampling kinds in the default loop, Qwen3-0.6B arch, {data['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", help="run this one order here (what each child process does)")
    parser.add_argument("--plot", metavar="JSON", help="only redraw the PNG of this result file")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--logprobs", action="store_true", help="the orders of requests asking for logprobs")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    if args.order:
        print(json.dumps(run_order(args.order)))
        return
    name, tag = card_name()
    runs = []
    for order in LOGPROBS_ORDERS if args.logprobs else ORDERS:
        rows = child_json(__file__, "--order", order)
        runs.append({"order": order, "requests": rows})
        print(" ".join(f"{r['kind']} {r['ms_per_token']:.3f}" for r in rows))
    result = {"card": name, "model": "Qwen3-0.6B architecture, random bf16 weights", "tokens": TOKENS,
              "kinds": KINDS, "processes": runs}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"sampling_loop-{tag}{'-logprobs' if args.logprobs else ''}.json")
    write_json(path, result)
    plot(path)


if __name__ == "__main__":
    main()
