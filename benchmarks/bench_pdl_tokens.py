"""Up to how many tokens should a decode step launch with PDL? Bare decode-graph replays at batch 1-8.

Qwen3-0.6B architecture with random bf16 weights, CUDA graphs, max_model_len 1024 (bench_latency's split
count). Each setting of NANOVLLM_PDL_MAX_TOKENS runs in its own process (the graphs are captured, and the
projections tuned, at engine start), the settings alternated over rounds so that drift hits all alike. A
process times the greedy graph of each batch with that many seqs of 144 and 1,000 keys
(DecodeGraphs.set_static_step) by cuda_graph.replay_us. Writes pdl_tokens-<card>.json and a PNG: per
setting, the median over rounds of each (batch, keys) time.

    python benchmarks/bench_pdl_tokens.py [--settings 1 4 8] [--rounds 2] [--out-dir benchmarks/results]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from bench_latency import card_name, model_dir, write_json

BATCHES, KEYS = (1, 2, 4, 8), (144, 1000)


def child() -> None:
    """One engine at this process's NANOVLLM_PDL_MAX_TOKENS; prints {"<batch>x<keys>": µs, ...} as JSON."""
    from nanovllm import LLM
    from nanovllm.engine.cuda_graph import replay_us
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=max(BATCHES),
              max_model_len=1024, async_scheduling=False)
    runner = llm.engine.model_runner
    graphs, times = runner.graphs, {}
    with torch.inference_mode():
        for batch in BATCHES:
            for keys in KEYS:
                graphs.set_static_step(batch, keys, runner.num_blocks)
                times[f"{batch}x{keys}"] = replay_us(graphs.graphs[graphs.bucket[batch], False], 20, 7)
    print(json.dumps(times))


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(KEYS), figsize=(5 * len(KEYS), 3.6), sharey=True)
    base = result["settings"][0]
    for ax, keys in zip(axes, KEYS):
        for setting in result["settings"]:
            rows, base_rows = result["us"][str(setting)], result["us"][str(base)]
            ax.plot(range(len(BATCHES)), [rows[f"{b}x{keys}"] / base_rows[f"{b}x{keys}"] for b in BATCHES],
                    marker="o", label=f"PDL up to {setting} tokens")
        ax.set(title=f"{keys} keys", xlabel="batch (seqs)", xticks=range(len(BATCHES)), xticklabels=BATCHES)
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0].set_ylabel(f"replay time / PDL up to {base}")
    axes[0].legend()
    fig.suptitle(f"Decode-step GPU time by PDL_MAX_TOKENS ({result['card']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child()
    runs = {s: [] for s in args.settings}
    for _ in range(args.rounds):
        for setting in args.settings:
            env = dict(os.environ, NANOVLLM_PDL_MAX_TOKENS=str(setting))
            done = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True, text=True,
                                  stdout=subprocess.PIPE)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(setting, runs[setting][-1], flush=True)
    name, tag = card_name()
    result = {"card": name, "settings": args.settings, "rounds": args.rounds,
              "us": {str(s): {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()},
              "us_each_round": {str(s): rs for s, rs in runs.items()}}
    base = result["us"][str(args.settings[0])]
    for setting in args.settings[1:]:
        rows = result["us"][str(setting)]
        print(f"PDL up to {setting} vs {args.settings[0]}: " +
              ", ".join(f"{k} {100 * (rows[k] / base[k] - 1):+.1f} %" for k in base))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"pdl_tokens-{tag}")
    write_json(path + ".json", result)
    plot(result, path + ".png")


if __name__ == "__main__":
    main()
