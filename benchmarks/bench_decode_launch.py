"""The decode-attention kernel's warps and pipeline stages, timed inside the decode graphs (1 GPU).

Alone, the decode kernel was fastest with 4 warps and 3 stages at every batch (NOTES-kernels.md). In a
step it runs between PDL neighbours, and at a few seqs a program has one or two key tiles, so what counts
is its dependent chain after the wait, not its loop. This recaptures each batch's greedy decode graph with
each (num_warps, num_stages) in turn (paged_attention._decode_warps_stages patched; BLOCK_N stays 64) and
times bare replays at a few contexts, the settings alternated over two rounds (the faster round is kept).
Qwen3-0.6B architecture with random bf16 weights; nothing is stored (slot -1), so any context can be set.
Batches 1-256 at max_model_len 1024 (bench_latency's engine: 16 KV splits at batch 1), then batch 1 at
max_model_len 8192 (32 splits) up to 8,000 keys. Writes decode_launch-<card>.json (+ .png).

    python benchmarks/bench_decode_launch.py [--out-dir benchmarks/results]
    python benchmarks/bench_decode_launch.py --plot benchmarks/results/decode_launch-h100.json
"""
import argparse
import json
import os

import torch
from bench_latency import RESULTS_DIR, card_name, free_cuda, model_dir, write_json

import nanovllm.kernels.paged_attention as paged_attention
from nanovllm import LLM
from nanovllm.engine.cuda_graph import replay_us

SETTINGS = [(4, 3), (8, 1), (4, 2), (4, 1), (8, 2)]  # (num_warps, num_stages); the first is the old default
RUNS = [  # (max_num_seqs, max_model_len, batches, contexts)
    (256, 1024, [1, 2, 4, 8, 64, 256], [144, 1000]),
    (1, 8192, [1], [144, 1040, 4112, 8000]),
]


@torch.inference_mode()
def sweep(max_num_seqs: int, max_model_len: int, batches: list[int], contexts: list[int]) -> list[dict]:
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=max_num_seqs,
              max_model_len=max_model_len)
    runner = llm.engine.model_runner
    graphs, policy = runner.graphs, paged_attention._decode_warps_stages
    us: dict[tuple, list[float]] = {}
    try:
        for _ in range(2):
            for batch in batches:
                for setting in SETTINGS:
                    paged_attention._decode_warps_stages = lambda b, s=setting: s
                    try:
                        graphs.set_static_step(batch, contexts[0], runner.num_blocks)
                        graph = graphs._capture_one(runner.model, batch, False)
                    finally:
                        paged_attention._decode_warps_stages = policy
                    for context in contexts:
                        graphs.set_static_step(batch, context, runner.num_blocks)
                        us.setdefault((batch, context, setting), []).append(replay_us(graph, reps=30, rounds=7))
                    del graph
    finally:
        llm.close()
        free_cuda()
    rows = []
    for (batch, context, setting), times in us.items():
        rows.append({"max_model_len": max_model_len, "batch": batch, "context": context, "num_warps": setting[0],
                     "num_stages": setting[1], "replay_us": round(min(times), 1),
                     "replay_us_each_round": [round(t, 1) for t in times],
                     "chosen": setting == policy(batch)})
        if setting == SETTINGS[-1]:
            case = (max_model_len, batch, context)
            group = [r for r in rows if (r["max_model_len"], r["batch"], r["context"]) == case]
            old = next(r["replay_us"] for r in group if (r["num_warps"], r["num_stages"]) == SETTINGS[0])
            print(f"max_model_len {max_model_len} batch {batch} context {context}: " + "  ".join(
                f"w{r['num_warps']}s{r['num_stages']}{'*' if r['chosen'] else ''} {r['replay_us']:.1f}"
                f" ({100 * (r['replay_us'] / old - 1):+.1f} %)" for r in group), flush=True)
    return rows


def plot(path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        data = json.load(f)
    cases = list(dict.fromkeys((r["max_model_len"], r["batch"], r["context"]) for r in data["rows"]))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(SETTINGS)
    for i, setting in enumerate(SETTINGS):
        ratios = []
        for case in cases:
            group = {(r["num_warps"], r["num_stages"]): r["replay_us"] for r in data["rows"]
                     if (r["max_model_len"], r["batch"], r["context"]) == case}
            ratios.append(group[setting] / group[SETTINGS[0]])
        ax.bar([c + (i - len(SETTINGS) / 2 + 0.5) * width for c in range(len(cases))], ratios, width,
               label=f"{setting[0]} warps, {setting[1]} stage{'s' if setting[1] > 1 else ''}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(cases)), [f"bs {b}\n{c} keys" + ("\n(8k table)" if m > 1024 else "")
                                      for m, b, c in cases], fontsize=7)
    ax.set_ylim(0.85, 1.2)
    ax.set_ylabel("decode step (graph replay) / 4 warps, 3 stages")
    ax.set_title(f"Decode-attention launch inside the step, Qwen3-0.6B arch, {data['card']}")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--plot", help="only redraw the PNG of this JSON")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    card, tag = card_name()
    rows = [row for run in RUNS for row in sweep(*run)]
    path = os.path.join(args.out_dir, f"decode_launch-{tag}.json")
    write_json(path, {"card": card, "model": "Qwen3-0.6B architecture, random bf16 weights",
                      "settings": [list(s) for s in SETTINGS], "rows": rows})
    plot(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
