"""The prefill graphs (engine/prefill_graphs.py) on and off, on bench_throughput's workload, on this host as it
is and with its host slowed on purpose.

A prefill step of the workload (8,192 tokens) has ~21 ms of kernels, and launching them eagerly from Python
takes 19-56 ms depending on the host (benchmarks/NOTES-gpu.md, session 29): the graphs matter on slow hosts
only. Hosts cannot be picked, so the "slowed" rows make one: the benchmark and a busy loop share one core
(`taskset`), which roughly halves the host's speed. Each setting runs bench_throughput --skip-hf in a
process of its own (NANOVLLM_PREFILL_GRAPHS read at engine start), off and on alternated, the order
reversed every round. Rows: tok/s, the prefill phase (breakdown.prefill_s: until every seq decodes),
engine start (graph capture included) and the KV blocks (the graphs' pool keeps an activation peak).

    python benchmarks/bench_prefill_graphs.py [--rounds 1] [--out-dir benchmarks/results]
    python benchmarks/bench_prefill_graphs.py --plot benchmarks/results/prefill_graphs-h100.json
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench_latency import RESULTS_DIR, card_name, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
HOSTS = ("as is", "slowed")


def run_throughput(graphs: bool, slowed: bool) -> dict:
    """One bench_throughput process; its result with this run's setting."""
    env = {**os.environ, "NANOVLLM_PREFILL_GRAPHS": "1" if graphs else "0"}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, os.path.join(HERE, "bench_throughput.py"), "--skip-hf", "--out-dir", out]
        hog = None
        if slowed:
            cmd = ["taskset", "-c", "0", *cmd]
            hog = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
        try:
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        finally:
            if hog:
                hog.kill()
                hog.wait()
        name = next(f for f in os.listdir(out) if f.startswith("throughput-"))
        with open(os.path.join(out, name)) as f:
            res = json.load(f)
    row = {"host": HOSTS[slowed], "prefill_graphs": res["prefill_graphs"],
           "output_tok_per_s": res["output_tok_per_s"], "fraction_of_roofline": res["fraction_of_roofline"],
           "prefill_s": res["breakdown"]["prefill_s"], "repeats_seconds": res["repeats_seconds"],
           "startup_s": res["startup_s"], "num_kvcache_blocks": res["num_kvcache_blocks"]}
    assert row["prefill_graphs"] == graphs, "the engine did not take the setting"
    print(f"host {row['host']}, prefill graphs {'on' if graphs else 'off'}: {row['output_tok_per_s']:.0f} tok/s, "
          f"prefill phase {row['prefill_s']:.2f} s, start {row['startup_s']:.1f} s, "
          f"{row['num_kvcache_blocks']} blocks", flush=True)
    return row


def plot(path: str) -> None:
    """Throughput and the prefill phase by host, graphs off and on (each run a dot, the bar their median)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        data = json.load(f)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, label in zip(axes, ("output_tok_per_s", "prefill_s"), ("output tok/s", "prefill phase (s)")):
        for h, host in enumerate(HOSTS):
            for g, graphs in enumerate((False, True)):
                vals = [r[key] for r in data["rows"] if r["host"] == host and r["prefill_graphs"] == graphs]
                if not vals:
                    continue
                x = 3 * h + g
                ax.bar(x, sorted(vals)[len(vals) // 2], color=("tab:gray", "tab:blue")[g],
                       label=("graphs off", "graphs on")[g] if h == 0 else None)
                ax.plot([x] * len(vals), vals, "k.", ms=4)
        ax.set_xticks([0.5, 3.5], [f"host {h}" for h in HOSTS])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].axhline(20000, color="tab:red", lw=0.8, ls="--")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Prefill graphs on nano-vllm's workload, {data['card']} (slowed: one core shared with a busy loop)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--plot", metavar="JSON", help="only redraw the PNG of this result file")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    card, tag = card_name()
    rows = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        rows += [run_throughput(graphs, slowed) for slowed in (False, True) for graphs in order]
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"prefill_graphs-{tag}.json")
    write_json(path, {"card": card, "model": "Qwen3-0.6B architecture, random bf16 weights",
                      "workload": "bench_throughput's (nano-vllm bench.py), --skip-hf", "rounds": args.rounds,
                      "rows": rows})
    try:
        plot(path)
    except ImportError:
        print("no matplotlib: redraw the PNG with --plot", path)


if __name__ == "__main__":
    main()
