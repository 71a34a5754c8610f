"""What a one-token projection adds to a PDL chain once its weights are in flight (Qwen3-0.6B shapes, bf16).

In the batch-1 decode step each kernel waits for the one ahead (griddepcontrol.wait) and may load its
weights before that. How much it then adds to the step depends on two things: how much of its weight
arrived before the wait, and what it does after it (read x, multiply, write). This measures the second
alone. Each projection runs after a spin kernel of SPIN_US that waits for the projection before it, then
spins on the global timer: so a projection is launched early, has the whole spin to load its weights, and
its wait returns when the spin ends. Its increment is the time of (spin, projection) pairs minus that of
spins alone, each the median replay of a CUDA graph of PAIRS pairs (bench_allreduce.time_graph). Rows:
every PDL gemv and staged gemv tiling of each projection, with its epilogue as the step runs it (folded
add + RMSNorm for qkv_proj and gate_up_proj, SiLU-and-mul for gate_up_proj, the residual add for o_proj and
down_proj), and a kernel that only reads and writes one value (the chain's own cost). Writes
post_wait-<card>.json.

    python benchmarks/bench_post_wait.py [--spin-us 15] [--out-dir benchmarks/results]
"""
import argparse
import os

import torch
import triton
import triton.language as tl
from bench_allreduce import time_graph
from bench_latency import RESULTS_DIR, card_name, write_json
from triton.language.extra.cuda import globaltimer

from nanovllm.kernels import fused_attention_output as foa
from nanovllm.kernels.pdl import launch_dependents, wait_previous

PAIRS, SLOTS = 24, 4


@triton.jit
def _spin_kernel(out_ptr, ns):
    """Lets the next kernel launch, waits for the one before, then spins for ns nanoseconds."""
    launch_dependents(True)
    wait_previous(True)
    start = globaltimer()
    now = start
    while now - start < ns:
        now = globaltimer()
    tl.store(out_ptr + tl.program_id(0), now - start)


@triton.jit
def _null_kernel(x_ptr, out_ptr):
    """The least a chained kernel does: wait, read one value the kernel ahead could have written, write one."""
    launch_dependents(True)
    wait_previous(True)
    tl.store(out_ptr + tl.program_id(0), tl.load(x_ptr + tl.program_id(0)) + 1)


def increment_us(kernel, spin_ns: int, sms: int) -> float:
    """µs that `kernel(slot)` adds after a spin, over PAIRS pairs."""
    scratch = torch.empty(sms, dtype=torch.int64, device="cuda")

    def spin():
        _spin_kernel[(sms,)](scratch, spin_ns, num_warps=1, launch_pdl=True)

    def pairs():
        for i in range(PAIRS):
            spin()
            kernel(i % SLOTS)

    def spins():
        for _ in range(PAIRS):
            spin()
    return (time_graph(pairs, repeat=1) - time_graph(spins, repeat=1)) / PAIRS


def projections(cfg: dict) -> dict:
    """name -> (n rows of W, k, gated, norm folded, residual added), as the batch-1 step runs them."""
    hidden, inter, q_size = cfg["hidden"], cfg["intermediate"], cfg["q_heads"] * cfg["head_dim"]
    qkv_n = q_size + 2 * cfg["kv_heads"] * cfg["head_dim"]
    return {"qkv_proj": (qkv_n, hidden, False, True, False), "o_proj": (hidden, q_size, False, False, True),
            "gate_up_proj": (2 * inter, hidden, True, True, False), "down_proj": (hidden, inter, False, False, True)}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin-us", type=float, default=15.0)
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    name, tag = card_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    spin_ns = int(args.spin_us * 1e3)
    gen = torch.Generator("cuda").manual_seed(0)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)  # noqa: E731
    x1, y1 = torch.zeros(sms, device="cuda"), torch.zeros(sms, device="cuda")
    result = {"card": name, "spin_us": args.spin_us, "pairs": PAIRS,
              "null_kernel_us": increment_us(lambda i: _null_kernel[(128,)](x1, y1, launch_pdl=True), spin_ns, sms)}
    print(f"null kernel: +{result['null_kernel_us']:.2f} µs", flush=True)
    shapes = projections({"hidden": 1024, "intermediate": 3072, "q_heads": 16, "kv_heads": 8, "head_dim": 128})
    for proj, (n, k, gated, norm, residual) in shapes.items():
        ws, xs = [rand(n, k, scale=k**-0.5) for _ in range(SLOTS)], [rand(1, k) for _ in range(SLOTS)]
        adds, norm_w = [rand(1, k) for _ in range(SLOTS)], rand(k).float().add(1).to(torch.bfloat16)
        out_n = n // 2 if gated else n
        res, outs, sums = [rand(1, out_n) for _ in range(SLOTS)], [rand(1, out_n) for _ in range(SLOTS)], rand(1, k)
        rows = []
        for config in foa.candidate_configs(1, n, k, torch.bfloat16, pdl=True):
            if not config.pdl or (gated and not foa._gates(config, None)):
                continue

            def call(i, c=config):
                fold = foa.FoldedNorm(norm_w, 1e-6, adds[i], sums) if norm else None
                foa.launch(c, xs[i], ws[i], res[i] if residual else None, None, outs[i], norm=fold, gated=gated)
            try:
                rows.append({"config": str(config), "us": increment_us(call, spin_ns, sms)})
            except Exception as e:  # a tiling this card cannot run: say why
                rows.append({"config": str(config), "error": f"{type(e).__name__}: {e}"[:200]})
            print(proj, rows[-1], flush=True)
        result[proj] = sorted(rows, key=lambda r: r.get("us", float("inf")))
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, f"post_wait-{tag}.json"), result)
    for proj in shapes:
        print(proj, [(r["config"], round(r["us"], 2)) for r in result[proj][:5]])


if __name__ == "__main__":
    main()
