"""The Qwen3-8B decode projections as one rank computes them at TP 1 and TP 2 (cuBLAS through F.linear, bf16),
beside the weight-read floor: how much of a TP-2 step's GEMM time is the fixed cost of a smaller GEMM.

    python benchmarks/bench_gemm_tp.py [--out benchmarks/results/gemm_tp-<card>.json]
    python benchmarks/bench_gemm_tp.py --plot benchmarks/results/gemm_tp-h100.json   # redraw the PNG

M rows of a decode batch (64, 145 and 256) times each projection's weight, TP 2 halving N (qkv_proj and
gate_up_proj, column-parallel) or K (o_proj and down_proj, row-parallel). Each time is per call, the median
over replays of a CUDA graph of 20 back-to-back calls cycling through 4 copies of the weight (more than the
L2 holds); floor_us = the weight's bytes at 3.0 TB/s. Both BLAS back ends that torch offers
(torch.backends.cuda.preferred_blas_library: cuBLAS, cuBLASLt) are timed, each in its own graph, and so are
the engine's own tiled kernels (kernels/fused_attention_output.py: the tensor-core gemv with TMA, split over K
where the engine's split-K workspace holds the partials, and the gemm kernel): ours_best_us is the fastest.
"""
import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
from bench_allreduce import time_graph
from bench_latency import RESULTS_DIR, card_name, write_json

from nanovllm.kernels import fused_attention_output as fao

SHAPES = {"qkv_proj": (4096, 6144, "column"), "o_proj": (4096, 4096, "row"),  # (K, N) at TP 1
          "gate_up_proj": (4096, 24576, "column"), "down_proj": (12288, 4096, "row")}
ROWS = (64, 145, 256)
COPIES = 4  # the graph's captured calls (bench_allreduce.REPEAT) cycle through them
BYTES_PER_US = 3.0e6  # 3.0 TB/s, about an H100's measured copy bandwidth (bench_latency's copy_bw_gbps)


def our_tilings(m: int, n: int) -> list:
    """The engine's tiled kernels at larger tiles than its tuner tries above 64 rows."""
    configs = []
    for bm, bn, split in itertools.product((64, 128), (64, 128), (1, 2, 4)):
        if split == 1 or split * m * n <= fao._WORKSPACE_NUMEL:
            bk = 64 if bm == bn == 128 else 128
            configs.append(fao.KernelConfig("gemv", bm, bn, bk, split, True, 8 if bm == 128 else 4, 3, tma=True))
    for bm, bn, bk, warps, stages in [(64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
                                      (128, 256, 64, 8, 3)]:
        configs.append(fao.KernelConfig("gemm", bm, bn, bk, 1, True, warps, stages))
    return configs


def time_ours(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[str, float]:
    """(name, µs) of the fastest of our_tilings whose product matches F.linear's."""
    ref, best = F.linear(x, weights[0]).float(), ("none", float("inf"))
    for config in our_tilings(x.shape[0], weights[0].shape[0]):
        if not torch.allclose(fao.launch(config, x, weights[0]).float(), ref, rtol=2e-2, atol=2e-2):
            continue
        cycle = itertools.cycle(weights)
        us = time_graph(lambda: fao.launch(config, x, next(cycle)))  # noqa: B023 (timed before the loop moves on)
        best = min(best, (str(config), us), key=lambda pair: pair[1])
    return best


def time_linear(x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """Median µs per F.linear(x, w) in bench_allreduce's graph timing, each captured call taking the next weight."""
    cycle = itertools.cycle(weights)
    return time_graph(lambda: F.linear(x, next(cycle)))


def plot(path: str) -> None:
    """One layer's four projections per rank against the rows: TP 1, TP 2, half of TP 1 (what TP 2 would
    take if every GEMM halved) and the weight-read floors; the PNG beside the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        data = json.load(f)
    rows = sorted({r["m"] for r in data["rows"]})

    def layer(tp: int, key: str) -> list[float]:
        return [sum(r[key] for r in data["rows"] if r["tp"] == tp and r["m"] == m) for m in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rows, layer(1, "cublas_us"), "o-", label="TP 1, cuBLAS")
    ax.plot(rows, layer(2, "cublas_us"), "s-", label="TP 2, cuBLAS")
    ax.plot(rows, [t / 2 for t in layer(1, "cublas_us")], "s:", color="C1", label="half of TP 1")
    ax.plot(rows, layer(2, "ours_best_us"), "^-", color="C2", label="TP 2, our best tiling")
    for tp, style in ((1, "k--"), (2, "k:")):
        ax.plot(rows, layer(tp, "floor_us"), style, label=f"TP {tp} weight-read floor (3.0 TB/s)")
    ax.set_xticks(rows, [str(m) for m in rows])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rows (decode batch)")
    ax.set_ylabel("µs per layer, 4 projections, one rank")
    ax.set_title(f"Qwen3-8B projections, bf16, {data['card']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", help="only redraw the PNG of this JSON")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    card, tag = card_name()
    rows = []
    for tp in (1, 2):
        for name, (k, n, split) in SHAPES.items():
            k, n = (k, n // tp) if split == "column" else (k // tp, n)
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(COPIES)]
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"tp": tp, "proj": name, "m": m, "k": k, "n": n, "floor_us": 2 * k * n / BYTES_PER_US}
                for library in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(library)
                    row[f"{library}_us"] = time_linear(x, weights)
                torch.backends.cuda.preferred_blas_library("cublas")
                row["ours_best"], row["ours_best_us"] = time_ours(x, weights)
                rows.append(row)
                print(json.dumps({a: round(b, 2) if isinstance(b, float) else b for a, b in row.items()}), flush=True)
            del weights
    per_layer = {f"tp{tp}_m{m}_us": sum(r["cublas_us"] for r in rows if r["tp"] == tp and r["m"] == m)
                 for tp in (1, 2) for m in ROWS}
    result = {"card": card, "rows": rows, "layer_gemm_us": per_layer}
    print(json.dumps(per_layer), flush=True)
    path = args.out or os.path.join(RESULTS_DIR, f"gemm_tp-{tag}.json")
    write_json(path, result)
    try:
        plot(path)
    except ImportError:
        print("matplotlib missing: redraw with --plot", path)


if __name__ == "__main__":
    main()
