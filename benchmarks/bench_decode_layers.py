"""Batch-1 decode with every decoder layer in one kernel (kernels/decode_layers.py) against the layer-by-layer
kernels it replaces, on the Qwen3-0.6B architecture with random bf16 weights, beside the bandwidth floor.

One engine per setting of NANOVLLM_DECODE_KERNEL (1: the one kernel, 0: the layer path), in the order
given (default 1 0 0 1, so neither setting always runs first), each measuring:
- gpu_ms: a bare replay of the batch-1 greedy decode graph at contexts of ~128, 1024 and 8192 tokens;
- ms_per_token: batch 1 as LLM.generate runs it by default (async scheduling), 256 tokens after a
  128-token prompt, the median of 3 requests (bench_latency's default_loop_ms_per_token_bs1);
- kernels: the kernels of one graph replay, by name;
- tokens: the greedy tokens of each context's request, compared across settings (random weights have
  near-ties that bf16 sums in another order may flip: the agreement is reported, not required).
Writes decode_layers-<card>.json. `--sweep` times the kernel alone instead (CUDA graph of back-to-back
calls, one model) for each num_warps and attention tile, at the same contexts: decode_layers_sweep-<card>.json.

    python benchmarks/bench_decode_layers.py [--settings 1 0 0 1] [--out-dir benchmarks/results]
    python benchmarks/bench_decode_layers.py --sweep
"""
import argparse
import gc
import os
import statistics

import torch
from bench_latency import (
    async_ms_per_token,
    card_name,
    copy_bandwidth_gbps,
    cuda_kernels,
    kv_bytes_per_token,
    model_dir,
    replay_ms,
    short,
    weight_bytes,
    write_json,
)

from nanovllm import LLM, SamplingParams

CONTEXTS = (128, 1024, 8192)
GEN_TOKENS = 16


def measure(folder: str) -> dict:
    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1,
              max_model_len=max(CONTEXTS) + 2 * GEN_TOKENS)
    runner = llm.engine.model_runner
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=GEN_TOKENS)
    rows = []
    for context in CONTEXTS:
        prompt = torch.randint(0, 10000, (context,), generator=gen).tolist()
        tokens = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        rows.append({"context": context + GEN_TOKENS, "gpu_ms": replay_ms(runner, 1, reps=200),
                     "tokens": tokens})
    graph = runner.graphs.graphs[1, False]
    kernels: dict[str, int] = {}
    for name, _ in cuda_kernels(graph.replay):
        kernels[short(name)] = kernels.get(short(name), 0) + 1
    one_kernel = llm.engine.model_runner.model.model.decode_layers is not None
    weights = weight_bytes(runner.model, llm.engine.model_config.tie_word_embeddings)
    kv_per_token = kv_bytes_per_token(llm.engine.model_config)
    llm.close()
    del llm, runner, graph
    gc.collect()
    torch.cuda.empty_cache()
    return {"one_kernel": one_kernel, "rows": rows, "kernels_per_replay": kernels,
            "weight_bytes": weights, "kv_bytes_per_token": kv_per_token,
            "default_loop": async_ms_per_token(folder, requests=3)}


@torch.inference_mode()
def sweep(folder: str, warps=(8, 16, 32), block_ns=(16, 32, 64), calls: int = 20) -> list[dict]:
    """µs per call of the kernel alone, for each (num_warps, block_n), at each context."""
    from nanovllm.kernels.decode_layers import DecodeLayers
    from nanovllm.models import load_model
    model, cfg = load_model(folder, torch.bfloat16, "cuda", load_format="dummy")
    page, max_ctx = 16, max(CONTEXTS) + 1
    shape = (cfg.num_hidden_layers, -(-max_ctx // page), page, cfg.num_key_value_heads, cfg.head_dim)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    table = torch.randperm(shape[1], dtype=torch.int32, device="cuda")
    rows = []
    for w in warps:
        for n in block_ns:
            kernel = DecodeLayers(model.model, k_cache, v_cache, num_warps=w, block_n=n)
            for context in CONTEXTS:
                ids = torch.tensor([7], device="cuda")
                pos = torch.tensor([context - 1], device="cuda")
                slot = (table[(context - 1) // page].long() * page + (context - 1) % page).view(1)
                ctx = torch.tensor([context], dtype=torch.int32, device="cuda")
                kernel(ids, pos, slot, ctx, table)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(calls):
                        kernel(ids, pos, slot, ctx, table)
                graph.replay()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(5):
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    times.append(1e3 * start.elapsed_time(end) / calls)
                rows.append({"num_warps": w, "block_n": n, "context": context, "us": statistics.median(times)})
                print(rows[-1], flush=True)
                del graph
    return rows


@torch.inference_mode()
def trace(folder: str, context: int = 144,
          variants=((8, 32, 32, True), (16, 32, 32, True), (8, 32, 32, False), (16, 32, 32, False),
                    (8, 32, 512, True))) -> list[dict]:
    """Where one call's time goes, from globaltimer stamps at every barrier of every program: per stage kind
    (A qkv, B attention, C o_proj, D gate_up, E down), the mean over layers of the slowest program's work
    (its departure from the barrier before to its arrival at this one) and of the barrier's own latency
    (the last arrival to the last departure)."""
    from nanovllm.kernels.decode_layers import DecodeLayers
    from nanovllm.models import load_model
    model, cfg = load_model(folder, torch.bfloat16, "cuda", load_format="dummy")
    page = 16
    shape = (cfg.num_hidden_layers, -(-(context + 1) // page), page, cfg.num_key_value_heads, cfg.head_dim)
    k_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    table = torch.arange(shape[1], dtype=torch.int32, device="cuda")
    args = (torch.tensor([7], device="cuda"), torch.tensor([context - 1], device="cuda"),
            torch.tensor([context - 1], device="cuda"), torch.tensor([context], dtype=torch.int32, device="cuda"),
            table)
    out = []
    for w, block_n, min_chunk, l2 in variants:
        kernel = DecodeLayers(model.model, k_cache, v_cache, num_warps=w, block_n=block_n, min_chunk=min_chunk,
                              l2_staging=l2)
        layers = cfg.num_hidden_layers
        kernel.trace = torch.zeros(kernel.programs, 5 * layers, 2, dtype=torch.int64, device="cuda")
        for _ in range(3):
            kernel(*args)
        torch.cuda.synchronize()
        t = kernel.trace.double().cpu()
        t0 = t[:, 0, 0].min()
        t = t - t0
        arrive, depart = t[:, :, 0], t[:, :, 1]  # (P, 5L); column 0: (start, end)
        kinds = {k: {"work_us": [], "barrier_us": []} for k in "ABCDE"}
        for stage in range(1, 5 * layers):
            before = depart[:, stage - 1] if stage > 1 else arrive[:, 0]
            kind = kinds["ABCDE"[(stage - 1) % 5]]
            kind["work_us"].append((arrive[:, stage] - before).max().item() / 1e3)
            kind["barrier_us"].append((depart[:, stage].max() - arrive[:, stage].max()).item() / 1e3)
        row = {"num_warps": w, "block_n": block_n, "min_chunk": min_chunk, "l2_staging": l2,
               "context": context, "total_us": (depart[:, 0].max() / 1e3).item(),
               **{k: {m: statistics.mean(v) for m, v in d.items()} for k, d in kinds.items()}}
        print(row, flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["1", "0", "0", "1"], choices=["0", "1"])
    parser.add_argument("--sweep", action="store_true", help="time the kernel alone per num_warps, block_n")
    parser.add_argument("--trace", action="store_true", help="where the kernel's time goes, per stage")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    name, tag = card_name()
    folder = model_dir()
    bw = copy_bandwidth_gbps()
    if args.trace:
        write_json(os.path.join(args.out_dir, f"decode_layers_trace-{tag}.json"),
                   {"card": name, "rows": trace(folder)})
        return
    if args.sweep:
        result = {"card": name, "copy_bw_gbps": bw, "rows": sweep(folder)}
        os.makedirs(args.out_dir, exist_ok=True)
        write_json(os.path.join(args.out_dir, f"decode_layers_sweep-{tag}.json"), result)
        return
    runs = []
    for setting in args.settings:
        os.environ["NANOVLLM_DECODE_KERNEL"] = setting
        run = {"setting": setting, **measure(folder)}
        for row in run["rows"]:
            row["floor_ms"] = (run["weight_bytes"] + row["context"] * run["kv_bytes_per_token"]) / bw / 1e6
        runs.append(run)
        print(setting, [(r["context"], round(r["gpu_ms"], 4)) for r in run["rows"]],
              round(run["default_loop"]["ms_per_token"], 4), flush=True)
    by_setting = {s: [r for r in runs if r["setting"] == s] for s in ("1", "0")}
    summary = {}
    for s, rs in by_setting.items():
        if rs:
            summary[s] = {"gpu_ms": {c: statistics.median(r["rows"][i]["gpu_ms"] for r in rs)
                                     for i, c in enumerate(CONTEXTS)},
                          "ms_per_token": statistics.median(r["default_loop"]["ms_per_token"] for r in rs)}
    if by_setting["1"] and by_setting["0"]:
        a, b = by_setting["1"][0]["rows"], by_setting["0"][0]["rows"]
        summary["token_agreement"] = [sum(x == y for x, y in zip(ra["tokens"], rb["tokens"])) / len(ra["tokens"])
                                      for ra, rb in zip(a, b)]
    floor = (runs[0]["weight_bytes"] + (128 + GEN_TOKENS) * runs[0]["kv_bytes_per_token"]) / bw / 1e6
    result = {"card": name, "model": "Qwen3-0.6B architecture, random bf16 weights", "copy_bw_gbps": bw,
              "floor_ms_bs1_ctx144": floor, "summary": summary, "runs": runs}
    print(summary, "floor", round(floor, 4))
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, f"decode_layers-{tag}.json"), result)


if __name__ == "__main__":
    main()
