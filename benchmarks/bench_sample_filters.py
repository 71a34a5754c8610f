"""Top-k, top-p and min-p inside a CUDA graph: the histogram kernels (kernels/top_k_top_p.py) against the
Sampler's sort-based filters on fixed shapes (layers/sampler.filter_logits), each followed by the same
Gumbel-max draw, beside the draw at temperature alone. Qwen3's 151,936-token vocabulary in bf16, batch 1, 8
and 32 (the FILTER graphs' buckets go to 32), logits N(0, sigma^2) for a flat (sigma 0.5) and a peaked
(sigma 3) row, which decide how far top-p's walk goes. Each is a graph of the step's sampling, timed by
triton.testing.do_bench_cudagraph (median µs). Also the thresholds alone (the first pass and the walk) at
other steps of the walk. Writes sample_filters-<card>.json and a PNG.

    python benchmarks/bench_sample_filters.py
    python benchmarks/bench_sample_filters.py --plot benchmarks/results/sample_filters-h100.json
"""
import argparse
import json
import os

import torch
import triton
from bench_latency import RESULTS_DIR, card_name, write_json

from nanovllm.kernels import sample as kernels
from nanovllm.kernels import top_k_top_p
from nanovllm.layers.sampler import filter_logits

VOCAB = 151936
FILTERS = {  # (top_k, top_p, min_p); off: VOCAB, 1, 0
    "temperature only": (VOCAB, 1.0, 0.0),
    "top-k 50": (50, 1.0, 0.0),
    "top-p 0.9": (VOCAB, 0.9, 0.0),
    "top-k 20 + top-p 0.95": (20, 0.95, 0.0),
    "min-p 0.05": (VOCAB, 1.0, 0.05),
}


WALKS = [(8, 1024, 4), (16, 1024, 8), (4, 2048, 4), (32, 1024, 16)]  # the walk's step: rows x tile, warps


def bench(fn) -> float:
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="JSON", help="only redraw the PNG of this result file")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    card, tag = card_name()
    rows, parts = [], []
    seed = torch.tensor([5], dtype=torch.int64, device="cuda")
    for batch in (1, 8, 32):
        out = torch.empty(batch, dtype=torch.int64, device="cuda")
        draw_ws = kernels.sample_workspace(batch, VOCAB, "cuda")
        ws = top_k_top_p.FilterWorkspace.make(batch, VOCAB, "cuda")
        temps = torch.full((batch,), 0.8, device="cuda")
        for sigma in (0.5, 3.0):
            logits = (torch.randn(batch, VOCAB, device="cuda") * sigma).to(torch.bfloat16)
            for name, (k, p, min_p) in FILTERS.items():
                top_k, top_p, min_ps = (torch.full((batch,), v, device="cuda") for v in (float(k), p, min_p))

                def histogram():
                    top_k_top_p.thresholds(logits, temps, top_k, top_p, ws)
                    kernels.sample(logits, temps, seed, out, draw_ws,
                                   keep=kernels.Keep(ws.keep, ws.row_max, min_ps, ws.hist))

                def sort():
                    kept = filter_logits(logits, temps, top_k, top_p, min_ps)
                    kernels.sample(kept, (temps > 0).float(), seed, out, draw_ws)

                row = dict(batch=batch, sigma=sigma, filters=name, histogram_us=bench(histogram),
                           sort_us=bench(sort), temperature_only_us=bench(
                               lambda: kernels.sample(logits, temps, seed, out, draw_ws)))
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}),
                      flush=True)
                rows.append(row)
            default = top_k_top_p._ROWS, top_k_top_p._TILE, top_k_top_p._WALK_WARPS
            for rows_, tile, warps in WALKS:
                top_k_top_p._ROWS, top_k_top_p._TILE, top_k_top_p._WALK_WARPS = rows_, tile, warps
                for name in ("top-k 50", "top-p 0.9"):
                    top_k, top_p = (torch.full((batch,), float(v), device="cuda") for v in FILTERS[name][:2])
                    part = dict(batch=batch, sigma=sigma, filters=name, rows=rows_, tile=tile, warps=warps,
                                thresholds_us=bench(lambda: top_k_top_p.thresholds(logits, temps, top_k, top_p, ws)))
                    ws.hist.zero_()
                    print(json.dumps(part), flush=True)
                    parts.append(part)
            top_k_top_p._ROWS, top_k_top_p._TILE, top_k_top_p._WALK_WARPS = default
    path = os.path.join(args.out_dir, f"sample_filters-{tag}.json")
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(path, dict(card=card, vocab=VOCAB, temperature=0.8, rows=rows, thresholds_alone=parts))
    plot(path)


def plot(path: str) -> None:
    """µs per sampling step by filter, histogram against sort, one panel per (batch, sigma)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        data = json.load(f)
    panels = sorted({(r["batch"], r["sigma"]) for r in data["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 4), sharey=True)
    for ax, (batch, sigma) in zip(axes, panels):
        rows = [r for r in data["rows"] if (r["batch"], r["sigma"]) == (batch, sigma)]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["sort_us"] for r in rows], 0.4, label="sort (filter_logits)")
        ax.bar([i + 0.2 for i in x], [r["histogram_us"] for r in rows], 0.4, label="histogram kernels")
        ax.set_xticks(list(x), [r["filters"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"batch {batch}, sigma {sigma}", fontsize=9)
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("µs per sampling step (CUDA graph)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Top-k / top-p / min-p in the graph, vocab {data['vocab']}, {data['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


if __name__ == "__main__":
    main()
