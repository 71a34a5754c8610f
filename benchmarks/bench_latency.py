"""Decode latency at batch 1, 2, 4, 8, 64, 256 beside the bandwidth floor, kernels per layer, fused o_proj on/off.

Qwen3-0.6B architecture with random bf16 weights (benchmarks/configs/qwen3-0.6b.json), CUDA graphs on.
Each batch: B prompts of PROMPT_LEN random tokens are prefilled, then DECODE_STEPS engine steps are timed
(wall clock around LLMEngine.step, so the host work of scheduling, input prep and output building counts).
Floor = (weight bytes + the KV bytes a step reads) / the device-to-device copy bandwidth measured here.
Batch 1 is also timed as `LLM.generate` runs it by default (async scheduling on CUDA: the host prepares step
n+1 while the GPU runs step n), from the request's token times, in fresh processes of its own (the median of
DEFAULT_LOOP_PROCESSES): default_loop_ms_per_token_bs1.
Writes latency-<card>.json (+ .png) and e2e_fused-<card>.json (batch-1 and batch-8 step time with
use_fused_output on, off with the same projection kernel, and off with cuBLAS projections; issue 8).

    python benchmarks/bench_latency.py [--out-dir benchmarks/results]
    python benchmarks/bench_latency.py --plot benchmarks/results/latency-h100.json   # redraw the PNG
"""
import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.layers import linear

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "qwen3-0.6b.json")
BATCHES = [1, 2, 4, 8, 64, 256]
PROMPT_LEN, DECODE_STEPS, WARMUP_STEPS = 128, 64, 8
# The default loop's ms per token depends on the process: on the H100 a process that has tuned the batch-1
# step (the first on a card, DecodeGraphs.tune_step) ran it at 0.665-0.707 ms, those that recalled the
# choices at 0.644-0.657, each steady within 0.1 % over its requests (benchmarks/NOTES-gpu.md, session 24;
# the cause is not known). So it is timed in fresh processes and the median is the figure.
DEFAULT_LOOP_PROCESSES = 3
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # every benchmark's --out-dir


def load_copy(path: str, name: str):
    """The module in the file at `path` (e.g. an older kernel from `git show`), imported as `name`, for a
    before/after beside nanovllm's own in one process."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: dataclasses (the fused kernel's KernelConfig) look it up
    spec.loader.exec_module(module)
    return module


def card_name() -> tuple[str, str]:
    """(full device name, short tag for file names: h100, h200, ...)."""
    name = torch.cuda.get_device_name()
    tag = next((t for t in ("h100", "h200", "a100", "l40s", "l4") if t in name.lower()), "gpu")
    return name, tag


def model_dir(config: str = CONFIG) -> str:
    folder = tempfile.mkdtemp(prefix="nanovllm-bench-")
    shutil.copy(config, os.path.join(folder, "config.json"))
    return folder


def copy_bandwidth_gbps(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second, median of reps."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps + 2):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[2:]) / 1e9


def weight_bytes(model: torch.nn.Module, tied: bool) -> int:
    """Bytes a decode step reads of the weights: all of them, except an untied embedding table (only B rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied table counts once
    embed = model.model.embed_tokens.weight
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes_per_token(cfg) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16


def make_engine(folder: str, **kwargs) -> LLM:
    """The engine whose steps are timed: the synchronous loop (async scheduling off), so a step's wall time
    holds its own host work and `runner.run` is what it calls."""
    blocks = max(BATCHES) * -(-(PROMPT_LEN + WARMUP_STEPS + DECODE_STEPS + 2) // 16) + 64
    return LLM(folder, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=max(BATCHES),
               max_model_len=1024, num_kvcache_blocks=blocks, async_scheduling=False, **kwargs)


def request_ms_per_token(llm: LLM, gen: torch.Generator, tokens: int = 256, requests: int = 5) -> list[float]:
    """Greedy requests of PROMPT_LEN random tokens (from gen) run one at a time, after one untimed: each one's
    (last token time - first token time) / (tokens - 1), in ms, from its metrics."""
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=tokens)
    per_token = []
    for i in range(requests + 1):
        prompt = torch.randint(0, 10000, (PROMPT_LEN,), generator=gen).tolist()
        metrics = llm.generate([prompt], params, use_tqdm=False)[0].metrics
        if i:
            per_token.append(1e3 * (metrics.last_token_time - metrics.first_token_time) / (tokens - 1))
    return per_token


def async_ms_per_token(folder: str, tokens: int = 256, requests: int = 5) -> dict:
    """Batch 1 as `LLM.generate` runs it by default on CUDA, with async scheduling (the timed rows use the
    synchronous loop): request_ms_per_token's median over `requests` requests."""
    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1, max_model_len=1024)
    per_token = request_ms_per_token(llm, torch.Generator().manual_seed(0), tokens, requests)
    result = {"async_scheduling": llm.engine.async_scheduling, "tokens": tokens,
              "ms_per_token": statistics.median(per_token), "ms_per_token_each": per_token}
    llm.close()
    return result


def child_json(script: str, *args: str, env: dict | None = None, timeout: float | None = None):
    """Runs `script` with args in a fresh Python process and returns the JSON its stdout ends with (its
    stderr passes through; a failed child raises)."""
    done = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env, check=True, text=True,
                          stdout=subprocess.PIPE, timeout=timeout)
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_loop_in_processes(processes: int = DEFAULT_LOOP_PROCESSES) -> dict:
    """async_ms_per_token, each run in a fresh process (this script's --default-loop-only): the median over
    the processes, and every process's run."""
    runs = [child_json(__file__, "--default-loop-only") for _ in range(processes)]
    per_process = [run["ms_per_token"] for run in runs]
    return {"ms_per_token": statistics.median(per_process), "per_process": per_process, "runs": runs}


def timed_steps(engine, steps: int) -> tuple[list[float], list[float]]:
    """Wall seconds of `steps` engine steps, and of the model runner's `run` inside each."""
    runner = engine.model_runner
    step_times, runner_times, run = [], [], runner.run

    def timed_run(b):
        t0 = time.perf_counter()
        out = run(b)
        runner_times.append(time.perf_counter() - t0)
        return out
    runner.run = timed_run
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - t0)
    finally:
        runner.run = run
    return step_times, runner_times


def time_decode(llm: LLM, batch: int, seed: int | None = None) -> dict:
    """Median ms of an engine step with `batch` seqs decoding, of the model runner inside it, and of a bare
    graph replay (GPU time of the step, no host work). The prompts' seed defaults to the batch size, so a
    batch shares no prompt, and no prefix-cache page, with the batches timed before it in the engine."""
    engine, runner = llm.engine, llm.engine.model_runner
    gen = torch.Generator().manual_seed(batch if seed is None else seed)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=WARMUP_STEPS + DECODE_STEPS + 2)
    vocab = min(10000, engine.model_config.vocab_size)
    for i in range(batch):
        prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=gen).tolist()
        engine.add_request(f"b{batch}-{i}", prompt, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()  # prefill (and first tokens)
    for _ in range(WARMUP_STEPS):
        engine.step()
    step_times, runner_times = timed_steps(engine, DECODE_STEPS)
    context = PROMPT_LEN + WARMUP_STEPS + DECODE_STEPS // 2  # mean KV length over the timed steps
    gpu_ms = replay_ms(runner, batch)
    by_kernel = replay_by_kernel(runner, batch) if runner.graphs is not None else None
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch, "ms_per_step": 1e3 * statistics.median(step_times),
            "runner_ms_per_step": 1e3 * statistics.median(runner_times), "gpu_ms_per_step": gpu_ms,
            "mean_context": context, "replay_us_by_kernel": by_kernel}


def replay_by_kernel(runner, batch: int, reps: int = 10) -> dict[str, float]:
    """µs per replay spent in each kernel (by short name) of this batch's greedy decode graph."""
    graph = runner.graphs.graphs[runner.graphs.bucket[batch], False]
    times: dict[str, float] = {}
    for name, us in cuda_kernels(graph.replay, reps):
        times[short(name)] = times.get(short(name), 0.0) + us / reps
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def replay_ms(runner, batch: int, reps: int = 50) -> float | None:
    """GPU time of one decode graph replay at this batch's bucket (the static inputs as the last step left
    them), from CUDA events around back-to-back replays."""
    if runner.graphs is None:
        return None
    graph = runner.graphs.graphs[runner.graphs.bucket[batch], False]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def cuda_kernels(fn, reps: int = 1) -> list[tuple[str, float]]:
    """(name, µs) of each kernel fn launches, reps times (torch profiler; copies and memsets left out)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type.name == "CUDA"
            and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]


def short(name: str) -> str:
    """A kernel's name without its C++ template arguments and parameter list (and without the anonymous
    namespace, which used to reduce such kernels to an empty name)."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    return name.split("<")[0].split("(")[0][:60]


def count_kernels(llm: LLM, batch: int = 1) -> dict:
    """Kernels of one decode step at `batch`: the engine step run eagerly (the kernels a graph replays, plus
    the input copies), the decoder layers alone (per layer), and one graph replay."""
    engine, runner = llm.engine, llm.engine.model_runner
    graphs = runner.graphs
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=4)
    for i in range(batch):
        engine.add_request(f"k{i}", list(range(10, 10 + PROMPT_LEN)), params)
    engine.step()  # prefill
    runner.graphs = None  # eager: every launch is visible to the profiler
    try:
        engine.step()  # compiles the eager decode kernels first
        step = [name for name, _ in cuda_kernels(engine.step)]
    finally:
        runner.graphs = graphs
    engine.step()  # the same decode batch through the graph: its static inputs now hold a real step
    replay = cuda_kernels(graphs.graphs[graphs.bucket[batch], False].replay)
    while engine.has_unfinished_requests():
        engine.step()
    layers = [name for name, _ in cuda_kernels(layers_runner(runner, batch))]
    num_layers = len(runner.model.model.layers)
    return {"kernels_per_step": len(step), "kernels_per_layer": len(layers) / num_layers,
            "kernels_per_graph_replay": len(replay),
            "kernel_names_per_layer": {short(k): v / num_layers for k, v in Counter(layers).most_common()}}


def layers_runner(runner, batch: int):
    """A function that runs the decoder layers alone on a decode batch of the graph's static context
    (slot -1, context 0), its inputs made beforehand so that only the layers' kernels run in it."""
    from nanovllm.utils.context import reset_context, set_context
    graphs, model = runner.graphs, runner.model.model
    bs = graphs.bucket[batch]
    with torch.inference_mode():
        hidden = torch.randn(bs, model.norm.weight.shape[0], device="cuda").to(runner.dtype)
        residual = torch.randn_like(hidden)
        graphs.slot_mapping.fill_(-1)
        graphs.context_lens.zero_()

    @torch.inference_mode()
    def run() -> None:
        set_context(graphs.context(bs))
        try:
            h, r = hidden, residual
            for layer in model.layers:
                h, r = layer(graphs.positions[:bs], h, r)
        finally:
            reset_context()
    run()  # compiles outside the profile
    return run


@torch.inference_mode()
def linear_vs_gemv(cfg, bw_gbps: float, ms: tuple[int, ...] = (1, 8)) -> list[dict]:
    """The decode step's projections at M rows: cuBLAS (F.linear) against the tuned GEMV of the fused
    o_proj kernel given a zero residual, in CUDA graphs: would a GEMV without the residual pay?"""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"qkv_proj": (cfg.hidden_size, q + 2 * kv), "o_proj": (q, cfg.hidden_size),
              "gate_up_proj": (cfg.hidden_size, 2 * cfg.intermediate_size),
              "down_proj": (cfg.intermediate_size, cfg.hidden_size), "lm_head": (cfg.hidden_size, cfg.vocab_size)}
    rows = []
    for name, (k, n) in shapes.items():
        slots = max(1, -(-125_000_000 // (2 * n * k)))  # copies of W past 2.5x the L2
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(slots)]
        for m in ms:
            cublas, gemv = time_projection(weights, m)
            rows.append({"proj": name, "k": k, "n": n, "m": m, "cublas_us": cublas, "gemv_us": gemv,
                         "floor_us": 2 * n * k / (bw_gbps * 1e3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def time_projection(weights: list[torch.Tensor], m: int) -> tuple[float, float]:
    import torch.nn.functional as F

    from nanovllm.kernels.fused_attention_output import fused_o_proj_add_residual, time_in_graph
    n, k = weights[0].shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    zero = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(zero)
    fused_o_proj_add_residual(x, weights[0], zero, out=out)  # tunes this shape outside the graph

    def linear(i: int) -> torch.Tensor:
        return F.linear(x, weights[i])

    def gemv(i: int) -> torch.Tensor:
        return fused_o_proj_add_residual(x, weights[i], zero, out=out)
    return time_in_graph(linear, len(weights), calls=64), time_in_graph(gemv, len(weights), calls=64)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def plot(path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        data = json.load(f)
    rows = data["rows"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(batches, [r["ms_per_step"] for r in rows], "o-", label="engine step (wall)")
    if all(r.get("gpu_ms_per_step") for r in rows):
        ax.plot(batches, [r["gpu_ms_per_step"] for r in rows], "s-", label="graph replay (GPU)")
    ax.plot(batches, [r["floor_ms"] for r in rows], "k--", label="bandwidth floor (weights + KV)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_yticks([0.5, 1, 2, 4, 8], ["0.5", "1", "2", "4", "8"])
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("batch (seqs decoding)")
    ax.set_ylabel("ms per decode step (= per token of each seq)")
    ax.set_title(f"Qwen3-0.6B arch, bf16, {data['card']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--plot", help="only redraw the PNG of this latency JSON")
    parser.add_argument("--default-loop-only", action="store_true",
                        help="only print batch 1's ms per token in the engine's default loop (async_ms_per_token)")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    if args.default_loop_only:
        return print(json.dumps({"card": card_name()[0], **async_ms_per_token(model_dir())}))
    # In processes of their own (default_loop_in_processes), started before this one holds any GPU memory.
    bs1_default = default_loop_in_processes()
    print(f"batch 1 with the engine's default loop: {json.dumps(bs1_default)}", flush=True)
    card, tag = card_name()
    bw = copy_bandwidth_gbps()
    print(f"{card}: device copy {bw:.0f} GB/s (read + write)", flush=True)
    folder = model_dir()
    free_cuda()
    t0 = time.time()
    llm = make_engine(folder)
    print(f"engine ready in {time.time() - t0:.1f} s", flush=True)
    runner = llm.engine.model_runner
    cfg = runner.model_config
    wbytes, kv_tok = weight_bytes(runner.model, cfg.tie_word_embeddings), kv_bytes_per_token(cfg)
    rows = []
    for batch in BATCHES:
        row = time_decode(llm, batch)
        row["floor_ms"] = (wbytes + batch * row["mean_context"] * kv_tok) / (bw * 1e9) * 1e3
        row["ratio_to_floor"] = row["ms_per_step"] / row["floor_ms"]
        row["tok_per_s"] = batch / row["ms_per_step"] * 1e3
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    projections = linear_vs_gemv(cfg, bw)
    fused_rows = [{**{k: r[k] for k in ("batch", "ms_per_step", "gpu_ms_per_step")}, "use_fused_output": True,
                   "projection": "dispatcher"}
                  for r in rows if r["batch"] in (1, 8)]
    # Off: the same tuned projection kernel, the add left to the next add_rmsnorm (greedy-identical to on);
    # then off with cuBLAS F.linear for every projection (o_proj and down_proj, and qkv_proj and gate_up_proj
    # at one token), the plain unfused path of a matmul and an add. Each engine has a small KV cache
    # (make_engine), so the first one stays for count_kernels.
    for variant, cublas in (("dispatcher", False), ("cublas", True)):
        linear.ROW_PARALLEL_DISPATCHER = linear.COLUMN_PARALLEL_DISPATCHER = not cublas
        unfused = make_engine(folder, use_fused_output=False)
        for batch in (1, 8):
            r = time_decode(unfused, batch)
            fused_rows.append({"batch": batch, "ms_per_step": r["ms_per_step"],
                               "gpu_ms_per_step": r["gpu_ms_per_step"], "use_fused_output": False,
                               "projection": variant})
            print(json.dumps(fused_rows[-1]), flush=True)
        del unfused
        free_cuda()
    linear.ROW_PARALLEL_DISPATCHER = linear.COLUMN_PARALLEL_DISPATCHER = True
    kernels = count_kernels(llm)  # the torch profiler: nothing is timed after it
    print(f"kernels per decode step: {kernels['kernels_per_step']}, per layer: {kernels['kernels_per_layer']}, "
          f"seen in a graph replay: {kernels['kernels_per_graph_replay']}")
    print(json.dumps(kernels["kernel_names_per_layer"], indent=1), flush=True)
    result = {"card": card, "model": "Qwen3-0.6B architecture, random bf16 weights", "copy_bw_gbps": bw,
              "weight_bytes": wbytes, "kv_bytes_per_token": kv_tok, "prompt_len": PROMPT_LEN,
              "ms_per_token_bs1": rows[0]["ms_per_step"], "floor_ms_bs1": rows[0]["floor_ms"],
              "target_ms_bs1": 1.3 * rows[0]["floor_ms"], "rows": rows, **kernels,
              "projections_cublas_vs_gemv": projections,
              "default_loop_ms_per_token_bs1": bs1_default["ms_per_token"], "default_loop_bs1": bs1_default}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"latency-{tag}.json")
    write_json(path, result)
    write_json(os.path.join(args.out_dir, f"e2e_fused-{tag}.json"),
               {"card": card, "model": result["model"], "rows": fused_rows})
    del llm, runner
    free_cuda()
    try:
        plot(path)
    except ImportError:
        print("matplotlib missing: redraw with --plot", path)
    print(f"batch 1: {rows[0]['ms_per_step']:.3f} ms/token (the engine's default loop "
          f"{bs1_default['ms_per_token']:.3f}), floor {rows[0]['floor_ms']:.3f} ms, "
          f"{rows[0]['ratio_to_floor']:.2f}x (target <= 1.3x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
