"""Tensor parallelism on 2 GPUs: the same model at tensor_parallel_size 1 and 2, agreement and speed.

For each architecture (Qwen3-8B, then Qwen3-4B; random bf16 weights, which `load_format="dummy"` draws as
one checkpoint that every TP size slices, so TP 1 and 2 run the same model), one engine per TP size does:
  - agreement: 8 prompts x 64 greedy tokens, with the top-20 logprobs of each step; then TP 2's tokens
    against TP 1's (rate, first divergence, and the logprob gap in TP 1's distribution there: bf16
    near-ties), and "logits close": both engines score the same text (TP 1's output, teacher-forced as
    prompt logprobs) and we report the largest and mean absolute logprob difference;
  - batch-1 decode latency: median engine step over 64 steps (bench_latency.time_decode, no bare replay);
  - throughput: nano-vllm's workload, as benchmarks/bench_throughput.py runs it (256 requests, in/out
    uniform in [100, 1024], temperature 0.6).
Writes benchmarks/results/tp-<card>.json; its top-level keys are the 8B figures.

    python benchmarks/bench_tp.py [--out-dir benchmarks/results] [--archs qwen3-8b qwen3-4b]
                                  [--agreement-only qwen3-4b]
"""
import argparse
import gc
import json
import os
import random
import time

import torch
from bench_latency import card_name, model_dir, write_json
from bench_throughput import timed_generate, warm_up, workload

from nanovllm import LLM, SamplingParams

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
NUM_PROMPTS, PROMPT_LEN, STEPS, TOP = 8, 64, 64, 20
BS1_STEPS = 64


def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, 900) for _ in range(PROMPT_LEN)] for _ in range(NUM_PROMPTS)]


def greedy_run(llm: LLM) -> tuple[list[list[int]], list[list[dict[int, float]]]]:
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=TOP)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    lps = [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]
    return tokens, lps


def scored(llm: LLM, texts: list[list[int]]) -> list[list[float]]:
    """Each text's prompt logprobs (the logprob of token j given tokens < j), j >= 1."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate(texts, params, use_tqdm=False)
    return [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] for o in outs]


def bs1_ms(llm: LLM) -> float:
    """Median wall time of an engine step with one seq decoding (prompt 128 tokens)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=BS1_STEPS + 9, ignore_eos=True)
    engine.add_request("bs1", list(range(100, 228)), params)
    for _ in range(9):  # prefill, then warm steps
        engine.step()
    times = []
    for _ in range(BS1_STEPS):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_unfinished_requests():
        engine.step()
    return 1e3 * sorted(times)[len(times) // 2]


def run_engine(folder: str, tp: int, texts: list[list[int]] | None, speed: bool = True,
               before_close=lambda result: None) -> dict:
    """One engine's agreement runs (and with `speed`, its latency and throughput); `before_close(result)`
    runs before the engine closes, so what was measured is kept even if closing hangs."""
    t0 = time.perf_counter()
    llm = LLM(folder, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
              tensor_parallel_size=tp)
    result = {"tp": tp, "startup_s": time.perf_counter() - t0,
              "num_kvcache_blocks": llm.engine.stats()["num_blocks"]}
    print(f"tp={tp}: engine ready in {result['startup_s']:.0f} s", flush=True)
    result["tokens"], result["logprobs"] = greedy_run(llm)
    result["scored"] = scored(llm, texts or [p + t for p, t in zip(prompts(), result["tokens"])])
    if speed:
        measure_speed(llm, result)
    before_close(result)
    t0 = time.perf_counter()
    llm.close()
    print(f"tp={tp}: closed in {time.perf_counter() - t0:.1f} s", flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def measure_speed(llm: LLM, result: dict) -> None:
    tp = result["tp"]
    result["ms_per_token_bs1"] = bs1_ms(llm)
    print(f"tp={tp}: batch-1 step {result['ms_per_token_bs1']:.3f} ms", flush=True)
    warm_up(llm)
    reqs, params = workload()
    spent = timed_generate(llm, reqs, params)
    result["output_tokens"] = sum(p.max_tokens for p in params)
    result["throughput"] = spent
    result["output_tok_per_s"] = result["output_tokens"] / spent["seconds"]
    print(f"tp={tp}: {result['output_tok_per_s']:.0f} output tok/s", flush=True)


def compare(one: dict, two: dict) -> dict:
    """TP 2 against TP 1: greedy agreement (with TP 1's logprob gap at each first divergence) and the
    logprob differences on the same teacher-forced text."""
    equal = total = 0
    firsts, gaps = [], []
    for a, b, lps in zip(two["tokens"], one["tokens"], one["logprobs"]):
        equal += sum(x == y for x, y in zip(a, b))
        total += len(b)
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        firsts.append(first)
        if first is not None:
            step = lps[first]
            gaps.append(step[b[first]] - step[a[first]] if a[first] in step else None)
    diffs = [abs(x - y) for sa, sb in zip(one["scored"], two["scored"]) for x, y in zip(sa, sb)]
    return {"greedy_agreement": equal / total, "first_divergence": firsts, "gaps_at_divergence": gaps,
            "max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--archs", nargs="+", default=["qwen3-8b", "qwen3-4b"])
    parser.add_argument("--agreement-only", nargs="*", default=[], metavar="ARCH",
                        help="for these archs, only the agreement (no latency or throughput)")
    args = parser.parse_args()
    card, tag = card_name()
    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    result = {"card": card, "cards": cards, "workload": "nano-vllm bench.py: 256 reqs, in/out uniform [100, "
              "1024], seed 0, temperature 0.6; random bf16 weights", "archs": {}}
    for arch in args.archs:
        folder = model_dir(os.path.join(CONFIGS, f"{arch}.json"))
        speed = arch not in args.agreement_only
        one = run_engine(folder, 1, None, speed)
        texts = [p + t for p, t in zip(prompts(), one["tokens"])]
        run_engine(folder, 2, texts, speed, before_close=lambda two: record(arch, one, two, result, args.out_dir, tag))


def record(arch: str, one: dict, two: dict, result: dict, out_dir: str, tag: str) -> None:
    """Adds arch's row (TP 2 against TP 1) to result and writes the JSON: after each arch, so a timeout
    or a hang later keeps what was measured."""
    row = compare(one, two)
    if "output_tok_per_s" in one:
        row.update({"tp1_output_tok_per_s": one["output_tok_per_s"], "tp2_output_tok_per_s": two["output_tok_per_s"],
                    "tp2_speedup": two["output_tok_per_s"] / one["output_tok_per_s"],
                    "tp1_ms_per_token_bs1": one["ms_per_token_bs1"], "tp2_ms_per_token_bs1": two["ms_per_token_bs1"]})
    for r in (one, two):
        row[f"tp{r['tp']}_detail"] = {k: r[k] for k in ("startup_s", "num_kvcache_blocks", "output_tokens",
                                                       "throughput") if k in r}
    result["archs"][arch] = row
    print(arch, json.dumps(row, indent=1), flush=True)
    headline = result["archs"].get("qwen3-8b", row)
    result.update({k: headline[k] for k in ("tp1_output_tok_per_s", "tp2_output_tok_per_s",
                                            "tp1_ms_per_token_bs1", "tp2_ms_per_token_bs1") if k in headline})
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"tp-{tag}.json"), result)

if __name__ == "__main__":
    main()
