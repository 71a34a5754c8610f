"""Up to how many tokens should a decode step launch with PDL, or send qkv_proj and gate_up_proj to the
dispatcher's gemv (with the RMSNorm folded in)? Bare decode-graph replays at batch 1-8.

Qwen3-0.6B architecture with random bf16 weights, CUDA graphs, max_model_len 1024 (bench_latency's split
count). The knob is NANOVLLM_PDL_MAX_TOKENS (pdl_tokens) or linear.COLUMN_DISPATCHER_MAX_M (column_max_m);
each setting runs in its own process (the graphs are captured, and the projections tuned, at engine start),
the settings alternated over rounds so that drift hits all alike. A process times the greedy graph of each
batch with that many seqs of 144 and 1,000 keys (DecodeGraphs.set_static_step) by cuda_graph.replay_us.
Writes <knob>-<card>.json and a PNG: per setting, the median over rounds of each (batch, keys) time.

    python benchmarks/bench_pdl_tokens.py [--knob pdl_tokens] [--settings 1 4 8] [--rounds 2] [--out-dir ...]
    python benchmarks/bench_pdl_tokens.py --knob column_max_m --settings 1 2 4
"""
import argparse
import json
import os
import statistics

import torch
from bench_latency import RESULTS_DIR, card_name, child_json, model_dir, write_json

BATCHES, KEYS = (1, 2, 4, 8), (144, 1000)


def child(column_max_m: int | None) -> None:
    """One engine at this process's NANOVLLM_PDL_MAX_TOKENS and the given column_max_m (None: the engine's);
    prints {"<batch>x<keys>": µs, ...} as JSON."""
    from nanovllm import LLM
    from nanovllm.engine.cuda_graph import replay_us
    from nanovllm.layers import linear
    if column_max_m is not None:
        linear.COLUMN_DISPATCHER_MAX_M = column_max_m
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
                    marker="o", label=f"{result.get('knob', 'pdl_tokens')} {setting}")
        ax.set(title=f"{keys} keys", xlabel="batch (seqs)", xticks=range(len(BATCHES)), xticklabels=BATCHES)
        ax.axhline(1.0, color="grey", lw=0.5)
    axes[0].set_ylabel(f"replay time / {result.get('knob', 'pdl_tokens')} {base}")
    axes[0].legend()
    fig.suptitle(f"Decode-step GPU time by {result.get('knob', 'pdl_tokens')} ({result['card']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--knob", choices=["pdl_tokens", "column_max_m"], default="pdl_tokens")
    parser.add_argument("--settings", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--child", type=int, nargs="?", const=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # -1: the engine's column_max_m
        return child(None if args.child < 0 else args.child)
    runs = {s: [] for s in args.settings}
    for _ in range(args.rounds):
        for setting in args.settings:
            env, child_arg = dict(os.environ), ["--child"]
            if args.knob == "pdl_tokens":
                env["NANOVLLM_PDL_MAX_TOKENS"] = str(setting)
            else:
                child_arg.append(str(setting))
            runs[setting].append(child_json(__file__, *child_arg, env=env))
            print(setting, runs[setting][-1], flush=True)
    name, tag = card_name()
    result = {"card": name, "knob": args.knob, "settings": args.settings, "rounds": args.rounds,
              "us": {str(s): {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()},
              "us_each_round": {str(s): rs for s, rs in runs.items()}}
    base = result["us"][str(args.settings[0])]
    for setting in args.settings[1:]:
        rows = result["us"][str(setting)]
        print(f"{args.knob} {setting} vs {args.settings[0]}: " +
              ", ".join(f"{k} {100 * (rows[k] / base[k] - 1):+.1f} %" for k in base))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{args.knob}-{tag}")
    write_json(path + ".json", result)
    plot(result, path + ".png")


if __name__ == "__main__":
    main()
