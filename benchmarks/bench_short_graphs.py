"""Batch-1 and -2 decode at the default max_model_len, with and without the short-context decode graphs
(engine/cuda_graph.py, SHORT_CONTEXT), Qwen3-0.6B with random bf16 weights.

An engine at the default max_model_len (the model's context, capped at 8,192) splits a batch-1 step's keys 32
ways, as long contexts need; the short graphs read only the tables' first SHORT_CONTEXT tokens and split 16
ways, for steps whose seqs all fit. Measured two ways:
- bare replays of the two graphs of a bucket in one engine, alternated, at several context lengths;
- the default loop's ms per token at batch 1 (4 requests of PROMPT_LEN + 256 tokens after an untimed one),
  with NANOVLLM_SHORT_DECODE_GRAPHS=1 and 0, each in fresh processes with a tuning file of its own,
  alternated over rounds.
Writes short_graphs-<card>.json and a PNG.

    python benchmarks/bench_short_graphs.py [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
from bench_latency import RESULTS_DIR, card_name, model_dir, request_ms_per_token

from nanovllm import LLM
from nanovllm.engine.cuda_graph import GREEDY, replay_us

CONTEXTS = (144, 400, 1000)


@torch.inference_mode()
def replays() -> dict:
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=2)
    runner = llm.engine.model_runner
    graphs = runner.graphs
    rows = []
    for bs in sorted(graphs.short_buckets):
        for ctx in CONTEXTS:
            graphs.set_static_step(bs, ctx, runner.num_blocks)
            full, short = [], []
            for _ in range(3):  # alternated
                full.append(replay_us(graphs.graphs[bs, GREEDY], reps=20, rounds=5))
                short.append(replay_us(graphs.short_graphs[bs, GREEDY], reps=20, rounds=5))
            rows.append({"batch": bs, "keys": ctx, "full_us": min(full), "short_us": min(short),
                         "full_rounds": full, "short_rounds": short})
            print(json.dumps(rows[-1]), flush=True)
    result = {"max_model_len": llm.engine.config.max_model_len, "short_buckets": sorted(graphs.short_buckets),
              "rows": rows}
    llm.close()
    return result


def default_loop() -> dict:
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1)
    per_token = request_ms_per_token(llm, torch.Generator().manual_seed(0), tokens=256, requests=4)
    out = {"max_model_len": llm.engine.config.max_model_len, "ms_per_token": statistics.median(per_token),
           "ms_per_token_each": per_token}
    llm.close()
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for bs in result["replays"]["short_buckets"]:
        rows = [r for r in result["replays"]["rows"] if r["batch"] == bs]
        left.plot([r["keys"] for r in rows], [r["full_us"] for r in rows], "o-", label=f"batch {bs}, full tables")
        left.plot([r["keys"] for r in rows], [r["short_us"] for r in rows], "s--", label=f"batch {bs}, short tables")
    left.set(xlabel="keys", ylabel="µs a replay", title="bare decode-graph replays")
    left.legend(fontsize=8)
    for i, runs in enumerate(result["default_loop"].values()):
        right.scatter([i] * len(runs), [r["ms_per_token"] for r in runs])
    right.set(xticks=range(len(result["default_loop"])), xticklabels=list(result["default_loop"]),
              ylabel="ms per token", title="batch 1, default loop")
    fig.suptitle(f"Qwen3-0.6B, max_model_len {result['replays']['max_model_len']}, {result['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["replays", "loop"], help="what each process does")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(replays() if args.child == "replays" else default_loop()))
        return

    def child(what: str, env: dict) -> dict:
        done = subprocess.run([sys.executable, __file__, "--child", what], env={**os.environ, **env}, check=True,
                              text=True, stdout=subprocess.PIPE)
        return json.loads(done.stdout.strip().splitlines()[-1])
    card, tag = card_name()
    cache = tempfile.mkdtemp()
    result = {"card": card, "replays": child("replays", {"NANOVLLM_CACHE_DIR": f"{cache}/on"}),
              "default_loop": {"short graphs": [], "full tables only": []}}
    for _ in range(args.rounds):
        for name, on in (("short graphs", "1"), ("full tables only", "0")):
            env = {"NANOVLLM_SHORT_DECODE_GRAPHS": on, "NANOVLLM_CACHE_DIR": f"{cache}/{on}"}
            result["default_loop"][name].append(child("loop", env))
            print(name, result["default_loop"][name][-1]["ms_per_token"], flush=True)
    result["median_ms_per_token"] = {k: statistics.median(r["ms_per_token"] for r in v)
                                     for k, v in result["default_loop"].items()}
    path = os.path.join(args.out_dir, f"short_graphs-{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, path.replace(".json", ".png"))
    print(result["median_ms_per_token"])


if __name__ == "__main__":
    main()
