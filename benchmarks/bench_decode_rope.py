"""RoPE + KV store inside the decode kernel against its own kernel ahead of it (Qwen3-0.6B, random bf16 weights).

A decode step can skip the RoPE + store kernel: the decode attention kernel then normalizes and rotates q
and the new k itself, and the split that holds the new token stores k and v (paged_attention.NewTokenRope;
which step sizes do so by default, paged_attention.rope_in_decode, comes from this file). This captures each
decode graph (greedy, 1 to 256 seqs) both ways, alternated, at two contexts, and times bare replays of each
right after its capture (bench_graph_taint.py: nothing launched in between). The graphs' static inputs are a
real step's, so the new token's k and v are stored as in the engine. It also reports how many greedy
tokens agree both ways (the scores are summed in another order, so bf16 near-ties may flip). Writes
decode_rope-<card>.json and a PNG of the change by batch (--plot redraws it from a JSON).

    python benchmarks/bench_decode_rope.py [--rounds 3]
    python benchmarks/bench_decode_rope.py --plot benchmarks/results/decode_rope-h100.json
"""
import argparse
import json
import os
import statistics

import torch
from bench_latency import RESULTS_DIR, card_name, model_dir, write_json

from nanovllm import LLM, SamplingParams
from nanovllm.engine.cuda_graph import replay_us

SWITCH = "NANOVLLM_DECODE_ROPE"
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def prompts(count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 10000, (length,), generator=gen).tolist() for _ in range(count)]


def generate(llm: LLM, batch: list[list[int]], tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=tokens)
    return [out["token_ids"] for out in llm.generate(batch, params, use_tqdm=False)]


@torch.inference_mode()
def recapture(llm: LLM, setting: str) -> None:
    """Every decode graph again, with NANOVLLM_DECODE_ROPE at setting ("0": never, "all": always)."""
    os.environ[SWITCH] = setting
    runner = llm.engine.model_runner
    runner.graphs._capture(runner.model)


@torch.inference_mode()
def step_times(llm: LLM, context: int, rounds: int) -> list[dict]:
    """Bare-replay µs of each batch's greedy graph without and with RoPE in the decode kernel, after a
    step of 8 seqs at this context (the static inputs it leaves: real slots, the new token at context - 1)."""
    generate(llm, prompts(max(BATCHES), context - 16, seed=context), 16)
    runner = llm.engine.model_runner
    times = {(bs, on): [] for bs in BATCHES for on in (False, True)}
    for _ in range(rounds):
        for bs in BATCHES:
            for on in (False, True):
                os.environ[SWITCH] = "all" if on else "0"
                graph = runner.graphs._capture_one(runner.model, bs, False)
                times[bs, on].append(replay_us(graph, reps=50, rounds=7))
                del graph
    rows = []
    for bs in BATCHES:
        off, on = statistics.median(times[bs, False]), statistics.median(times[bs, True])
        rows.append({"context": context, "batch": bs, "separate_us": off, "in_decode_us": on,
                     "change_pct": 100 * (on / off - 1), "separate_us_each_round": times[bs, False],
                     "in_decode_us_each_round": times[bs, True]})
        print(f"context {context} batch {bs}: separate {off:7.1f} µs, in decode {on:7.1f} µs "
              f"({rows[-1]['change_pct']:+.1f} %)")
    return rows


def plot(path: str) -> None:
    """The step's change with RoPE in the decode kernel, by batch and context; the batches that take it by
    default (paged_attention.rope_in_decode) shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanovllm.kernels.paged_attention import rope_in_decode
    with open(path) as f:
        data = json.load(f)
    fig, ax = plt.subplots(figsize=(6, 4))
    for context in sorted({r["context"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["context"] == context]
        ax.plot([r["batch"] for r in rows], [r["change_pct"] for r in rows], "o-", label=f"{context} keys")
    os.environ.pop(SWITCH, None)  # the default rule
    for batch in BATCHES:
        if rope_in_decode(batch):
            ax.axvspan(batch / 2 ** 0.25, batch * 2 ** 0.25, color="tab:green", alpha=0.12, lw=0)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
    ax.set_xlabel("seqs in the decode step (shaded: RoPE in the decode kernel by default)")
    ax.set_ylabel("step time change, % (negative: faster)")
    ax.set_title(f"RoPE + KV store in the decode kernel, {data['card']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.replace(".json", ".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plot", metavar="JSON", help="only redraw the PNG of this result file")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot)
    name, tag = card_name()
    os.environ[SWITCH] = "0"
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=max(BATCHES),
              max_model_len=2048, enable_prefix_caching=False)
    # Greedy tokens both ways: 5 seqs of different prompt lengths at batch 5, then one alone, 64 tokens each.
    agree = {}
    for batch in ([prompts(1, n, seed=n)[0] for n in (7, 60, 128, 300, 999)], prompts(1, 200, seed=1)):
        recapture(llm, "0")
        want = generate(llm, batch, 64)
        recapture(llm, "all")
        got = generate(llm, batch, 64)
        agree[len(batch)] = {"seqs_equal": sum(a == b for a, b in zip(got, want)), "seqs": len(batch),
                             "tokens_before_first_difference": [next((i for i, (x, y) in enumerate(zip(a, b))
                                                                      if x != y), len(a)) for a, b in zip(got, want)]}
    print("greedy tokens both ways:", agree)
    rows = [row for context in (144, 1040) for row in step_times(llm, context, args.rounds)]
    result = {"card": name, "model": "Qwen3-0.6B architecture, random bf16 weights", "switch": SWITCH,
              "greedy_agreement": agree, "rounds": args.rounds, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"decode_rope-{tag}.json")
    write_json(path, result)
    llm.close()
    plot(path)


if __name__ == "__main__":
    main()
