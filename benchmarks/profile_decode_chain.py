"""Where a batch-1 decode step's GPU time goes along its chain of kernels (Qwen3-0.6B, random bf16 weights).

Under programmatic dependent launch a kernel starts before the one ahead of it ends and waits for it, so
kernel durations overlap and their sum says little (bench_latency's replay_us_by_kernel). What a kernel
adds to the step is the time from the previous kernel's end to its own end. This profiles replays of the
batch-1 greedy decode graph (after a 128-token prompt and 16 decoded tokens) and reports, for each kernel
of a decoder layer by its place in the layer, the median over layers and replays of that increment, of its
duration, and of the gap from the previous kernel's end to its start (negative: it was resident early);
then the same for each kernel before and after the layers. Writes decode_chain-<card>.json.

With --loop it profiles instead batch 1 in the engine's default loop (LLM.generate, async scheduling) and
reports what the GPU does between two steps' graphs: from one step's last kernel to the next step's first
projection, each copy and kernel (median start and duration over the steps), and the step's period.
Writes decode_loop-<card>.json.

    python benchmarks/profile_decode_chain.py [--replays 20] [--out-dir benchmarks/results]
    NANOVLLM_PDL=0 python benchmarks/profile_decode_chain.py --suffix=-no-pdl
With --knockout it recaptures the batch-1 greedy graph with some kernels not launched (the reduce of the
KV splits, RoPE + KV store, all of attention, the final RMSNorm, the argmax's second pass) and times bare
replays of each graph, alternated: what each removal saves bounds what fusing that kernel away could
gain. The tokens such a graph makes are wrong; only its time is read. Writes decode_knockout-<card>.json.

    python benchmarks/profile_decode_chain.py --loop
    python benchmarks/profile_decode_chain.py --knockout
With --l2-resident it recaptures the graph with one projection of every layer (or all four) reading layer
0's weight, so that after layer 0 it comes from the L2, and times bare replays of each graph, alternated:
what the HBM's time for those weights costs the step, the most that staging them in the L2 could gain (the
tokens are wrong). Writes decode_l2_resident-<card>.json.

    python benchmarks/profile_decode_chain.py --l2-resident
"""
import argparse
import json
import os
import statistics

import torch
from bench_latency import RESULTS_DIR, card_name, model_dir, short, write_json
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.engine.cuda_graph import replay_us
from nanovllm.kernels.pdl import pdl_enabled


def batch1_engine() -> LLM:
    """An engine of batch 1 whose decode graphs' static inputs hold a real step: 16 tokens decoded after a
    128-token prompt (context 144)."""
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1, max_model_len=1024)
    prompt = torch.randint(0, 10000, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.generate([prompt], SamplingParams(temperature=0, ignore_eos=True, max_tokens=16), use_tqdm=False)
    return llm


def gpu_events(prof, copies: bool) -> list[tuple[float, float, str]]:
    """(start µs, end µs, short name) of what ran on the GPU under the profiler, in start order: kernels,
    and with copies also memory copies and sets."""
    return sorted((e.time_range.start, e.time_range.end, short(e.name)) for e in prof.events()
                  if e.device_type.name == "CUDA" and (copies or not any(
                      op in e.name.lower() for op in ("memcpy", "memset"))))


def replay_kernels(graph, replays: int) -> list[list[tuple[str, float, float]]]:
    """(name, start µs, end µs) of each kernel of each replay, in start order."""
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
    events = gpu_events(prof, copies=False)
    per = len(events) // replays
    assert per * replays == len(events), f"{len(events)} kernels in {replays} replays"
    return [[(name, s, e) for s, e, name in events[r * per:(r + 1) * per]] for r in range(replays)]


def summarize(runs: list[list[tuple[str, float, float]]], num_layers: int) -> dict:
    names = [name for name, _, _ in runs[0]]
    ropes = [i for i, name in enumerate(names) if "rope" in name]
    assert len(ropes) == num_layers, "one RoPE kernel per layer"
    per_layer, first = ropes[1] - ropes[0], ropes[0] - 1  # qkv_proj's kernel precedes RoPE
    rows: dict[str, dict[str, list[float]]] = {}
    for kernels in runs:
        for i in range(1, len(kernels)):
            name, start, end = kernels[i]
            prev_end = kernels[i - 1][2]
            layer, place = divmod(i - first, per_layer)
            key = f"layer[{place}] {name}" if 0 <= layer < num_layers else f"step[{i}] {name}"
            row = rows.setdefault(key, {"increment_us": [], "duration_us": [], "gap_us": []})
            row["increment_us"].append(end - prev_end)
            row["duration_us"].append(end - start)
            row["gap_us"].append(start - prev_end)
    table = {key: {m: statistics.median(v) for m, v in row.items()} for key, row in rows.items()}
    steps = [kernels[-1][2] - kernels[0][1] for kernels in runs]
    layer_us = sum(row["increment_us"] for key, row in table.items() if key.startswith("layer["))
    return {"kernels_per_replay": len(names), "kernels_per_layer": per_layer, "step_us": statistics.median(steps),
            "layer_us": layer_us, "by_kernel": table}


def loop_between_steps(llm: LLM, tokens: int = 96) -> dict:
    """The GPU's work between consecutive decode graphs of one batch-1 request in the default loop."""
    prompt = torch.randint(0, 10000, (128,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=tokens)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
    events = gpu_events(prof, copies=True)
    ends = [i for i, (_, _, name) in enumerate(events) if "row_best" in name]  # each graph's last kernel
    between: dict[str, dict[str, list[float]]] = {}
    periods, heads = [], []
    for a, b in zip(ends[8:], ends[9:]):  # steady decode steps only
        t0 = events[a][1]
        periods.append(events[b][1] - t0)
        for i in range(a + 1, b):
            start, end, name = events[i]
            if "gemv" in name:  # the first layer's qkv projection: the graph's head is behind
                heads.append(start - t0)
                break
            row = between.setdefault(f"{i - a} {name}", {"start_us": [], "duration_us": []})
            row["start_us"].append(start - t0)
            row["duration_us"].append(end - start)
    return {"steps": len(periods), "period_us": statistics.median(periods),
            "first_projection_starts_us": statistics.median(heads),
            "between": {key: {m: statistics.median(v) for m, v in row.items()} | {"count": len(row["start_us"])}
                        for key, row in between.items()}}


KNOCKOUTS = {  # name: the launchers (module, attribute) it takes out of the graph
    "reduce": [("paged_attention", "_decode_reduce_kernel")],
    "rope": [("rope_kv_store", "_rope_kv_store_kernel")],
    "rope+reduce": [("rope_kv_store", "_rope_kv_store_kernel"), ("paged_attention", "_decode_reduce_kernel")],
    "attention": [("rope_kv_store", "_rope_kv_store_kernel"), ("paged_attention", "_decode_kernel"),
                  ("paged_attention", "_decode_reduce_kernel")],
    "final_norm": [("add_rmsnorm", "_rmsnorm_kernel")],  # at batch 1 only the final norm runs alone
    "argmax_pass2": [("sample", "_row_best_kernel")],
}


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@torch.inference_mode()
def knockouts(llm: LLM, rounds: int = 4) -> dict:
    """Bare-replay µs of the batch-1 greedy graph as captured, and with each KNOCKOUTS entry left out."""
    import importlib
    runner = llm.engine.model_runner
    graphs = {"none": runner.graphs.graphs[1, False]}
    for name, targets in KNOCKOUTS.items():
        modules = [importlib.import_module(f"nanovllm.kernels.{module}") for module, _ in targets]
        saved = [getattr(module, attr) for module, (_, attr) in zip(modules, targets)]
        try:
            for module, (_, attr) in zip(modules, targets):
                setattr(module, attr, _NoLaunch())
            graphs[name] = runner.graphs._capture_one(runner.model, 1, False)
        finally:
            for module, (_, attr), kernel in zip(modules, targets, saved):
                setattr(module, attr, kernel)
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            times[name].append(replay_us(graph, reps=50, rounds=7))
    base = statistics.median(times["none"])
    return {"context": 144, "step_us": base, "knocked_out": {
        name: {"step_us": statistics.median(t), "saves_us": base - statistics.median(t),
               "step_us_each_round": t, "kernels": [attr for _, attr in KNOCKOUTS[name]]}
        for name, t in times.items() if name != "none"}}


PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _projection(layer, name: str):
    return getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)


@torch.inference_mode()
def l2_resident(llm: LLM, rounds: int = 3) -> dict:
    """Bare-replay µs of the batch-1 greedy graph, and of it with one projection (or all four) of every layer
    reading layer 0's weight: after layer 0 those weights come from the L2 (a layer's 31 MB fit in its 50
    MB), so the saving bounds what staging them in the L2 ahead of time could gain. Each graph is captured
    right before it is timed, with nothing launched in between (bench_graph_taint.py: eager kernels between
    or after a graph's replays can slow it for good)."""
    runner = llm.engine.model_runner
    layers = runner.model.model.layers
    own = {name: [_projection(layer, name).weight.data for layer in layers] for name in PROJECTIONS}
    variants = [("none", ()), *((name, (name,)) for name in PROJECTIONS), ("all", PROJECTIONS)]
    times: dict[str, list[float]] = {key: [] for key, _ in variants}
    for _ in range(rounds):
        for key, names in variants:
            try:
                for name in names:
                    for layer in layers:
                        _projection(layer, name).weight.data = own[name][0]
                graph = runner.graphs._capture_one(runner.model, 1, False)  # keeps the aliased pointers
            finally:
                for name in names:
                    for layer, weight in zip(layers, own[name]):
                        _projection(layer, name).weight.data = weight
            times[key].append(replay_us(graph, reps=50, rounds=7))
            del graph
    base = statistics.median(times["none"])
    return {"context": 144, "step_us": base, "step_us_each_round": times["none"], "from_l2": {
        key: {"step_us": statistics.median(t), "saves_us": base - statistics.median(t), "step_us_each_round": t}
        for key, t in times.items() if key != "none"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--loop", action="store_true", help="profile the default loop between steps instead")
    parser.add_argument("--knockout", action="store_true", help="time the step with kernels left out instead")
    parser.add_argument("--l2-resident", action="store_true",
                        help="time the step with projections' weights read from the L2 instead")
    parser.add_argument("--suffix", default="", help="appended to the file name, e.g. -no-pdl")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    name, tag = card_name()
    llm = batch1_engine()
    if args.loop:
        result = {"card": name, "model": "Qwen3-0.6B architecture, random bf16 weights", **loop_between_steps(llm)}
        print(json.dumps(result, indent=1))
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(os.path.join(args.out_dir, f"decode_loop-{tag}{args.suffix}.json"), result)
        return llm.close()
    if args.knockout or args.l2_resident:  # bounds: the step recaptured without (or with) something
        measure, key, label, stem = ((knockouts, "knocked_out", "without", "decode_knockout") if args.knockout
                                     else (l2_resident, "from_l2", "from the L2:", "decode_l2_resident"))
        result = {"card": name, "model": "Qwen3-0.6B architecture, random bf16 weights", **measure(llm)}
        print(f"step {result['step_us']:.1f} µs")
        for variant, row in result[key].items():
            print(f"{label} {variant:14s} {row['step_us']:7.1f} µs, saves {row['saves_us']:5.1f}")
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(os.path.join(args.out_dir, f"{stem}-{tag}{args.suffix}.json"), result)
        return llm.close()
    runner = llm.engine.model_runner
    num_layers = len(runner.model.model.layers)
    result = {"card": name, "model": "Qwen3-0.6B architecture, random bf16 weights", "context": 144,
              "pdl": pdl_enabled(runner.device),
              **summarize(replay_kernels(runner.graphs.graphs[1, False], args.replays), num_layers)}
    print(f"step {result['step_us']:.1f} µs, layers {result['layer_us']:.1f} µs a layer x {num_layers}")
    for key, row in result["by_kernel"].items():
        print(f"{key:60s} +{row['increment_us']:6.2f}  dur {row['duration_us']:6.2f}  gap {row['gap_us']:6.2f}")
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, f"decode_chain-{tag}{args.suffix}.json"), result)
    llm.close()


if __name__ == "__main__":
    main()
