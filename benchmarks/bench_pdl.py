"""Decode-step GPU time with programmatic dependent launch (PDL) off and on (issue 4).

Qwen3-0.6B architecture with random bf16 weights, CUDA graphs, the engine built as bench_latency builds it
(max_model_len 1024, so the same attention split count). One engine per setting, both kept alive:
NANOVLLM_PDL=0 (no kernel launched with PDL, the fused GEMV tuned without its PDL candidates); PDL through
the decode step's Triton kernels (nanovllm/kernels/pdl.py) with qkv_proj and gate_up_proj on cuBLAS; with
those two through the dispatcher's projection-only mode (linear.COLUMN_PARALLEL_DISPATCHER); and with the
RMSNorm before them folded into that projection at one token (linear.FOLD_NORM). For batch 1 and 8 each
engine prefills B prompts and decodes (wall time per engine step), then the bare replay of the batch's
greedy graph is timed with CUDA events, alternating the settings over several rounds so that clock drift
hits both alike, and its kernels are listed with the torch profiler (µs per replay by kernel; with PDL a
kernel's time includes the wait for the one before it, so compare the totals, not single kernels).
Each engine also decodes one prompt greedily at batch 1: the fold must not change a token against
on+proj (same kernels otherwise). Writes pdl-<card>.json.

    python benchmarks/bench_pdl.py [--out-dir benchmarks/results] [--rounds 5]
"""
import argparse
import json
import os
import statistics
import time

import torch
from bench_latency import (
    RESULTS_DIR,
    card_name,
    copy_bandwidth_gbps,
    cuda_kernels,
    kv_bytes_per_token,
    make_engine,
    model_dir,
    replay_by_kernel,
    replay_ms,
    time_decode,
    weight_bytes,
)

from nanovllm import SamplingParams
from nanovllm.layers import linear

# name -> (NANOVLLM_PDL, linear.COLUMN_PARALLEL_DISPATCHER, linear.FOLD_NORM): qkv_proj and gate_up_proj
# on cuBLAS, or through the dispatcher's projection-only mode (cuBLAS or a gemv, whichever its tuning found
# faster), and then with the RMSNorm before them folded into that gemv (batch 1 only: one token).
SETTINGS = {"off": ("0", False, False), "on": ("1", False, False), "on+proj": ("1", True, False),
            "on+proj+fold": ("1", True, True)}
BATCHES = (1, 8)


def build(folder: str, setting: str):
    """An engine whose kernels, tuning and graphs all saw this setting."""
    os.environ["NANOVLLM_PDL"], linear.COLUMN_PARALLEL_DISPATCHER, linear.FOLD_NORM = SETTINGS[setting]
    t0 = time.time()
    llm = make_engine(folder)
    print(f"PDL {setting}: engine ready in {time.time() - t0:.1f} s", flush=True)
    return llm


def greedy_tokens(llm, seed: int = 1) -> list[int]:
    """32 greedy tokens of one random 64-token prompt, alone in the batch (its decode steps replay the
    batch-1 graph, where the fold runs)."""
    engine, gen = llm.engine, torch.Generator().manual_seed(seed)
    engine.add_request("greedy", torch.randint(0, 10000, (64,), generator=gen).tolist(),
                       SamplingParams(temperature=0, ignore_eos=True, max_tokens=32), stream=False)
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [o.outputs[0].token_ids for o in engine.step() if o.finished]
    return tokens[0]


def chosen_configs(pdl: bool) -> dict[str, str]:
    """The dispatcher's choice per (K -> N, M bucket <= 8, fused or projection alone) with or without PDL."""
    from nanovllm.kernels import fused_attention_output as fao
    return {f"{k}->{n} m={m}{'' if fused else ' proj'}": str(c)
            for (_, _, n, k, _, m, p, fused), c in fao._BEST.items() if p == pdl and m <= 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    card, tag = card_name()
    bw = copy_bandwidth_gbps()
    print(f"{card}: device copy {bw:.0f} GB/s (read + write)", flush=True)
    folder = model_dir()
    engines, rows, tokens = {}, [], {}
    for setting in SETTINGS:
        llm = engines[setting] = build(folder, setting)
        runner = llm.engine.model_runner
        tokens[setting] = greedy_tokens(llm)
        for batch in BATCHES:
            row = time_decode(llm, batch)
            row.update(pdl=setting, kernels_per_replay=len(cuda_kernels(
                runner.graphs.graphs[runner.graphs.bucket[batch], False].replay)))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "replay_us_by_kernel"}), flush=True)
    for row in rows:  # the replays again, settings alternating
        row["gpu_ms_rounds"] = []
    for _ in range(args.rounds):
        for row in rows:
            row["gpu_ms_rounds"].append(replay_ms(engines[row["pdl"]].engine.model_runner, row["batch"]))
    for row in rows:
        row["gpu_ms_median"] = statistics.median(row["gpu_ms_rounds"])
        row["replay_us_by_kernel"] = replay_by_kernel(engines[row["pdl"]].engine.model_runner, row["batch"])
    runner = engines["on"].engine.model_runner
    cfg = runner.model_config
    wbytes = weight_bytes(runner.model, cfg.tie_word_embeddings)
    context = {r["batch"]: r["mean_context"] for r in rows}
    floor = {b: (wbytes + b * context[b] * kv_bytes_per_token(cfg)) / (bw * 1e9) * 1e3 for b in BATCHES}
    result = {"card": card, "model": "Qwen3-0.6B architecture, random bf16 weights", "copy_bw_gbps": bw,
              "floor_ms": floor, "rows": rows, "greedy_tokens": tokens,
              "fold_changes_no_token": tokens["on+proj+fold"] == tokens["on+proj"],
              "configs": {"off": chosen_configs(False), "on": chosen_configs(True)}}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"pdl-{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{card}: bare graph replay, ms per decode step (median of {args.rounds} rounds)")
    for b in BATCHES:
        by = {s: next(r for r in rows if r["batch"] == b and r["pdl"] == s) for s in SETTINGS}
        print(f"batch {b} (floor {floor[b]:.3f} ms): " + "  ".join(
            f"{s} {r['gpu_ms_median']:.4f} ({r['gpu_ms_median'] / by['off']['gpu_ms_median']:.3f}x, "
            f"step {r['ms_per_step']:.3f})" for s, r in by.items()))
        names = sorted({n for r in by.values() for n in list(r["replay_us_by_kernel"])[:8]})
        for name in names:
            print(f"    {name:<40}" + "".join(f" {s} {r['replay_us_by_kernel'].get(name, 0.0):7.1f}"
                                          for s, r in by.items()) + " µs")
    print("greedy tokens at batch 1, fold against on+proj:",
          "identical" if result["fold_changes_no_token"] else "DIFFERENT")
    print("wrote", path)


if __name__ == "__main__":
    main()
