"""The attention output projection with its residual add: cuBLAS (matmul, add, matmul + add, addmm) against
nanovllm's fused kernel, inside CUDA graphs with every input rotated past L2, so each call reads from HBM.
addmm rounds product + residual once, so it is timed for reference only: the fused kernel must give the
bits of matmul + add (issue 8), and each row records the fraction of elements where it does not.

    python benchmarks/bench_fused_o_proj.py                   # GPU: benchmarks/results/fused_o_proj-<card>.*
    python benchmarks/bench_fused_o_proj.py --plot FILE.json  # anywhere: redraws the PNG from a JSON

Per row (K -> N, M tokens): median microseconds per call of each variant, and the fused kernel's GB/s over
the bytes it must move (W, x, residual read once, out written once). For M <= 16 it also times what a
decoder layer runs up to the MLP: the fused kernel then the RMSNorm kernel, against the unfused path
(matmul, then the add + RMSNorm kernel of nanovllm/kernels/add_rmsnorm.py).

Programmatic dependent launch (PDL) lets a kernel start while the one before it finishes. In the plain
columns each fused call follows another fused call, which lets the next one launch at its start; in a
decoder layer it follows the attention kernel (o_proj) or SiLU-and-mul (down_proj). So each row also times each op after
a producer kernel that writes this call's x, as attention would: one that does not let the next kernel
launch early (`prod_*` columns; the producer alone is `prod_us`) and one that does, at its start
(`prodtrig_*`, alone `prodtrig_us`), as the decode attention and SiLU-and-mul kernels now do with PDL
(nanovllm/kernels/pdl.py); and the fastest configuration without PDL (`fused_nopdl_*`).
"""
import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

try:  # only the GPU benchmark needs Triton; --plot runs anywhere
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents
    jit = triton.jit
except ImportError:
    jit = lambda fn: fn  # noqa: E731

SHAPES = [(896, 896), (2048, 1024), (2048, 2048), (4096, 2560), (4096, 4096)]  # (K, N) of real o_proj
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
L2_BYTES = 50 * 2**20  # H100; rotating over 2.5x this keeps every call's inputs out of L2
EPS = 1e-6


def time_graph(fn, slots: int) -> float:
    """Median µs per call of fn(slot) replayed in one CUDA graph that cycles through the slots."""
    from nanovllm.kernels.fused_attention_output import time_in_graph
    return time_in_graph(fn, slots, calls=60, replays=15)


@jit
def copy_kernel(src_ptr, dst_ptr, n, TRIGGER: tl.constexpr, BLOCK: tl.constexpr):
    """The producer: dst = src, as the attention kernel writes the fused op's x. TRIGGER: lets the next
    kernel launch at once (griddepcontrol.launch_dependents), as a PDL-aware attention kernel would."""
    if TRIGGER:
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n), mask=offs < n)


def best_without_pdl(fao, key) -> str:
    times = fao.TUNING_LOG[key]
    return min((c for c in times if "-pdl" not in c), key=times.get)


def time_eager(fn, calls: int = 200) -> float:
    """µs per call launched from Python one by one: what a benchmark without graphs measures."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    a = torch.randn(2**28, device="cuda")  # 1 GiB of fp32
    b = torch.empty_like(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(12):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * a.numel() * 4 / statistics.median(times[2:]) / 1e9


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def bench_shape(k: int, n: int, dtype: torch.dtype, fao, norms) -> list[dict]:
    gen = torch.Generator("cuda").manual_seed(k * n)
    slots = max(3, math.ceil(2.5 * L2_BYTES / (n * k * dtype.itemsize)))
    ws = [(torch.randn(n, k, generator=gen, device="cuda") * k**-0.5).to(dtype) for _ in range(slots)]
    g = torch.rand(n, generator=gen, device="cuda").to(dtype)  # post_attention_layernorm.weight
    rows = []
    for m in MS:
        def new(*shape):
            return [torch.randn(*shape, generator=gen, device="cuda").to(dtype) for _ in range(slots)]
        xs, res, outs, tmps = new(m, k), new(m, n), new(m, n), new(m, n)
        out = fao.fused_o_proj_add_residual(xs[0], ws[0], res[0], out=outs[0])
        ref = fao.fused_o_proj_add_residual_ref(xs[0], ws[0], res[0])
        unfused = torch.matmul(xs[0], ws[0].t()) + res[0]
        row = dict(k=k, n=n, m=m, rel_err=rel_err(out, ref), differs=(out != unfused).float().mean().item())
        row["mm_us"] = time_graph(lambda i: torch.matmul(xs[i], ws[i].t(), out=tmps[i]), slots)
        row["add_us"] = time_graph(lambda i: torch.add(tmps[i], res[i], out=outs[i]), slots)
        row["mm_add_us"] = time_graph(lambda i: torch.add(torch.matmul(xs[i], ws[i].t(), out=tmps[i]), res[i],
                                                          out=outs[i]), slots)
        row["addmm_us"] = time_graph(lambda i: torch.addmm(res[i], xs[i], ws[i].t(), out=outs[i]), slots)
        row["fused_us"] = time_graph(
            lambda i: fao.fused_o_proj_add_residual(xs[i], ws[i], res[i], out=outs[i]), slots)
        moved = (n * k + 2 * m * n + m * k) * dtype.itemsize
        row["fused_gbps"] = moved / row["fused_us"] / 1e3
        key = fao.tuning_key(xs[0].device, dtype, n, k, False, m, True)
        config = fao._BEST[key]
        row["fused_config"] = str(config)
        bench_pdl(row, fao, key, config, xs, ws, res, outs, tmps, slots)
        if m <= 16 and norms is not None:
            bench_layer(row, fao, norms, xs, ws, res, outs, tmps, g, slots)
        rows.append(row)
        print({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}, flush=True)
    return rows


def bench_pdl(row, fao, key, config, xs, ws, res, outs, tmps, slots) -> None:
    """The fastest configuration without PDL, and every op after a producer kernel (see the docstring);
    for a gemv choice also that tiling with and without PDL."""
    from dataclasses import replace
    nopdl = next(c for c in fao.candidate_configs(row["m"], row["n"], row["k"], xs[0].dtype, pdl=True)
                 if str(c) == best_without_pdl(fao, key))
    row["fused_nopdl_config"] = str(nopdl)
    row["fused_nopdl_us"] = time_graph(lambda i: fao.launch(nopdl, xs[i], ws[i], res[i], out=outs[i]), slots)
    src = torch.randn_like(xs[0])

    def producer(trigger: bool):
        return lambda i: copy_kernel[(triton.cdiv(src.numel(), 1024),)](src, xs[i], src.numel(), trigger, 1024)
    ops = dict(
        mm_add=lambda i: torch.add(torch.matmul(xs[i], ws[i].t(), out=tmps[i]), res[i], out=outs[i]),
        fused=lambda i: fao.fused_o_proj_add_residual(xs[i], ws[i], res[i], out=outs[i]),
        fused_nopdl=lambda i: fao.launch(nopdl, xs[i], ws[i], res[i], out=outs[i]))
    produce_plain = producer(False)
    for prefix, produce in (("prod", produce_plain), ("prodtrig", producer(True))):
        row[f"{prefix}_us"] = time_graph(produce, slots)
        for name, op in ops.items():
            row[f"{prefix}_{name}_us"] = time_graph(lambda i, op=op, produce=produce: (produce(i), op(i)), slots)
    if config.kernel == "gemv":  # the chosen tiling with and without PDL, alone and after a producer
        row["variants_us"] = {}
        for c in (replace(config, pdl=False), replace(config, pdl=True)):
            try:
                row["variants_us"][str(c)] = time_graph(
                    lambda i, c=c: fao.launch(c, xs[i], ws[i], res[i], out=outs[i]), slots)
                row["variants_us"]["after producer: " + str(c)] = time_graph(
                    lambda i, c=c: (produce_plain(i), fao.launch(c, xs[i], ws[i], res[i], out=outs[i])), slots)
            except Exception as e:  # e.g. the other variant needs more shared memory than the card has
                row["variants_us"][str(c)] = f"{type(e).__name__}: {e}"[:200]


def bench_layer(row, fao, norms, xs, ws, res, outs, tmps, g, slots) -> None:
    """o_proj, residual add and post_attention_layernorm, fused and unfused (µs per call)."""
    row["rmsnorm_us"] = time_graph(lambda i: norms.rmsnorm(outs[i], g, EPS), slots)
    row["fused_then_rmsnorm_us"] = time_graph(lambda i: norms.rmsnorm(
        fao.fused_o_proj_add_residual(xs[i], ws[i], res[i], out=outs[i]), g, EPS), slots)
    # add_rmsnorm adds into the residual in place: replays drift the values, not the time.
    row["mm_then_add_rmsnorm_us"] = time_graph(lambda i: norms.add_rmsnorm(
        torch.matmul(xs[i], ws[i].t(), out=tmps[i]), res[i], g, EPS), slots)


def bench_eager(k: int, n: int, dtype: torch.dtype, fao) -> dict:
    x = torch.randn(1, k, device="cuda").to(dtype)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(dtype)
    r, out = torch.randn(1, n, device="cuda").to(dtype), torch.empty(1, n, device="cuda", dtype=dtype)
    return dict(k=k, n=n, m=1, mm_us=time_eager(lambda: torch.matmul(x, w.t())),
                mm_add_us=time_eager(lambda: torch.matmul(x, w.t()) + r),
                fused_us=time_eager(lambda: fao.fused_o_proj_add_residual(x, w, r, out=out)))


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, n in sorted({(r["k"], r["n"]) for r in result["rows"]}):
        rows = [r for r in result["rows"] if (r["k"], r["n"]) == (k, n)]
        ms = [r["m"] for r in rows]
        ax.plot(ms, [r["fused_us"] / r["mm_add_us"] for r in rows], marker="o", label=f"{k}->{n}")
        bw = [100 * r["fused_gbps"] / result["copy_bw_gbps"] for r in rows]
        bx.plot(ms, bw, marker="o", label=f"{k}->{n}")
    for level in (0.6, 0.8, 0.95, 1.0):
        ax.axhline(level, color="gray", lw=0.6, ls="--")
    ax.set(xscale="log", xlabel="M (tokens)", ylabel="fused / (matmul + add)",
           title=f"o_proj + residual, CUDA graphs, {result['card']}")
    bx.set(xscale="log", xlabel="M (tokens)", ylabel="% of copy bandwidth",
           title=f"fused kernel, copy bandwidth {result['copy_bw_gbps']:.0f} GB/s")
    ax.set_xticks(MS, [str(m) for m in MS])
    bx.set_xticks(MS, [str(m) for m in MS])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(result: dict) -> None:
    bw = result["copy_bw_gbps"]
    print(f"\n{result['card']}: copy bandwidth {bw:.0f} GB/s; µs per call in CUDA graphs, inputs from HBM")
    print("nopdl: the fastest configuration without PDL; after prod. / trig.: (fused - producer) / (mm+add -")
    print("producer), each after a kernel that writes x (as attention does) without / with the PDL trigger")
    print(f"{'K->N':>10} {'M':>4} {'mm':>7} {'mm+add':>7} {'addmm':>7} {'fused':>7} {'ratio':>6} {'%bw':>5}"
          f" {'nopdl':>6} {'ratio':>6} {'prod.':>6} {'trig.':>6} {'f+norm':>6} {'mm+an':>6} {'differ':>7}  config")
    for r in result["rows"]:
        extra = "".join(f" {r.get(key, float('nan')):6.2f}" for key in
                        ("fused_then_rmsnorm_us", "mm_then_add_rmsnorm_us"))
        nopdl = r.get("fused_nopdl_us", float("nan"))
        after = [(r[f"{p}_fused_us"] - r[f"{p}_us"]) / (r[f"{p}_mm_add_us"] - r[f"{p}_us"])
                 if f"{p}_us" in r else float("nan") for p in ("prod", "prodtrig")]
        print(f"{r['k']:>5}->{r['n']:<4} {r['m']:>4} {r['mm_us']:7.2f} {r['mm_add_us']:7.2f}"
              f" {r['addmm_us']:7.2f}"
              f" {r['fused_us']:7.2f} {r['fused_us'] / r['mm_add_us']:6.3f} {100 * r['fused_gbps'] / bw:5.1f}"
              f" {nopdl:6.2f} {nopdl / r['mm_add_us']:6.3f} {after[0]:6.3f} {after[1]:6.3f}"
              f"{extra} {r.get('differs', float('nan')):7.1e}  {r['fused_config']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--plot", help="only redraw the PNG beside this JSON")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    # "fused" is the dispatcher with its PDL candidates (the default on Hopper unless NANOVLLM_PDL=0),
    # "fused_nopdl" the best of the other candidates from the same tuning.
    os.environ["NANOVLLM_CACHE_DIR"] = ""  # time every candidate here (their timings are reported), never recall
    from nanovllm.kernels import fused_attention_output as fao
    try:
        from nanovllm.kernels import add_rmsnorm as norms
    except ImportError:
        norms = None
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    result = dict(card=card, torch=torch.__version__, triton=__import__("triton").__version__,
                  copy_bw_gbps=copy_bandwidth_gbps(), rows=[], eager=[], tuning={}, tune_s={})
    for k, n in SHAPES:
        t0 = time.perf_counter()
        fao.warmup(n, k, torch.bfloat16, max_m=max(MS))
        result["tune_s"][f"{k}->{n}"] = time.perf_counter() - t0
        result["rows"] += bench_shape(k, n, torch.bfloat16, fao, norms)
        result["eager"].append(bench_eager(k, n, torch.bfloat16, fao))
    result["tuning"] = {f"{key[3]}->{key[2]} m={key[5]}": {c: round(us, 2) for c, us in times.items()}
                        for key, times in fao.TUNING_LOG.items()}
    result["tuning_errors"] = fao.TUNING_ERRORS
    tag = "h200" if "H200" in card else "h100" if "H100" in card else card.replace(" ", "_").lower()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fused_o_proj-{tag}.json"
    path.write_text(json.dumps(result, indent=1))
    try:
        plot(result, path.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: redraw with --plot", path)
    print("eager (Python launch per call), M=1:", [(e["k"], e["n"], round(e["mm_add_us"], 1),
                                                    round(e["fused_us"], 1)) for e in result["eager"]])
    print_table(result)


if __name__ == "__main__":
    main()
