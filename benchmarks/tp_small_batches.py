"""Tensor parallelism at decode steps of 1-4 seqs (2 GPUs): greedy tokens with PDL on and off, and TP 1 beside.

Steps of up to 4 tokens launch with PDL and, at 2 tokens, run qkv_proj and gate_up_proj on the gemv with the
RMSNorm folded in; under TP 2 those paths also meet the all-reduce. Four prompts whose outputs end one after
another (24, 40, 56 and 72 tokens) make decode steps of 4, 3, 2 and 1 seqs. Runs: TP 2 with PDL, the same
again, TP 2 without PDL (NANOVLLM_PDL=0) and TP 1. The repeat reuses the kernels the first run tuned (the
tuning file), so it must give the same tokens: a race would show there. PDL itself changes no bit, but
without it the tuner picks other projection kernels (the staged gemv needs PDL), whose sums round
otherwise, and TP 1 sums in another order too: so those runs may part where two tokens of the
random-weight model are nearly tied, as bench_tp.py reports for the 8B. Random weights repeat a token for
a while and then switch, and a near-tie moves a switch by a step.
Qwen3-0.6B architecture, random bf16 weights, CUDA graphs; each engine in its own process.
Writes tp_small_batches-<card>.json: each run's tokens and, per pair of runs, the first differing token of
each prompt (null: none).

    python benchmarks/tp_small_batches.py [--out-dir benchmarks/results]
"""
import argparse
import json
import os
import sys

PROMPTS = [[5, 17, 300, 42, 9], list(range(100, 117)), [7] * 3, [(i * 37) % 990 + 3 for i in range(33)]]
MAX_TOKENS = [24, 40, 56, 72]
RUNS = [("tp2_pdl", 2, {}), ("tp2_pdl_again", 2, {}), ("tp2_no_pdl", 2, {"NANOVLLM_PDL": "0"}), ("tp1", 1, {})]


def child(tp: int) -> None:
    """Prints the greedy tokens of one engine at tensor_parallel_size tp as JSON."""
    from bench_latency import model_dir

    from nanovllm import LLM, SamplingParams
    with LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, tensor_parallel_size=tp,
             max_model_len=1024) as llm:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    print(json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)


def first_differences(a: list[list[int]], b: list[list[int]]) -> list[int | None]:
    return [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), None) for p, q in zip(a, b)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--runs", nargs="+", choices=[r[0] for r in RUNS], default=[r[0] for r in RUNS])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    import torch
    from bench_latency import card_name, child_json, write_json
    if torch.cuda.device_count() < 2:
        sys.exit("needs 2 GPUs")
    tokens = {}
    for name, tp, env in [r for r in RUNS if r[0] in args.runs]:
        tokens[name] = child_json(__file__, "--child", str(tp), env={**os.environ, **env}, timeout=300)
        print(name, [len(t) for t in tokens[name]], flush=True)
    names = list(tokens)
    pairs = {f"{a} vs {b}": first_differences(tokens[a], tokens[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    for pair, diffs in pairs.items():
        print(f"{pair}: first differing token per prompt {diffs}")
    card, tag = card_name()
    os.makedirs(args.out_dir, exist_ok=True)
    write_json(os.path.join(args.out_dir, f"tp_small_batches-{tag}.json"),
               {"card": card, "gpus": 2, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "first_difference": pairs,
                "tokens": tokens})


if __name__ == "__main__":
    main()
