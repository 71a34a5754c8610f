"""The batch-1 decode step's column-parallel gemvs tuned inside the step rather than alone (Qwen3-0.6B, bf16).

At one token qkv_proj and gate_up_proj run the dispatcher's gemv with the RMSNorm folded into its load of x
(gate_up_proj also SiLU-and-mul in its epilogue), o_proj and down_proj the gemv with the residual add,
launched with PDL between the kernels of the step. The tuner picks each tiling by timing the projection
alone (no norm, no epilogue, each call after itself); the engine then re-tunes them inside the step
itself (DecodeGraphs.tune_step, since session 16), so with NANOVLLM_TUNE_IN_STEP=0 this starts from the
alone choices, and otherwise from the engine's own. Here every PDL tiling of the chosen kernels
(TUNE_KERNELS, default "gemv"; "staged" for staged_gemv) that can run the projection's epilogue is forced
in turn, projection after projection (TUNE_PROJECTIONS, default "gate_up_proj qkv_proj"; each keeps its
best before the next is swept), the batch-1 decode graphs are recaptured and a bare replay of the step is
timed (after a 128-token prompt and 16 decoded tokens). Writes tune_in_step-<card><suffix>.json.

With TUNE_COMBOS (a JSON list of {projection: tiling name, optionally "env": {variable: value} set while
the graphs are recaptured}) it times those joint choices instead, each twice in alternation, beside the
engine's own: what one projection's tiling costs depends on what the
kernels around it leave free of each SM (registers, shared memory) for its programs to start early.

    python benchmarks/tune_in_step.py [--out-dir benchmarks/results] [--suffix=-staged]
    TUNE_KERNELS=staged TUNE_PROJECTIONS="qkv_proj o_proj gate_up_proj down_proj" python benchmarks/tune_in_step.py
"""
import argparse
import json
import os

import torch
from bench_latency import RESULTS_DIR, card_name, replay_ms, write_json
from profile_decode_chain import batch1_engine

from nanovllm.kernels import fused_attention_output as foa


def step_ms(runner) -> float:
    """GPU ms of the batch-1 greedy step, its graphs recaptured with the current choices (the static inputs
    kept: capture clears them)."""
    graphs = runner.graphs
    saved = graphs.dev64.clone(), graphs.dev32.clone()
    graphs._capture(runner.model)
    graphs.dev64.copy_(saved[0])
    graphs.dev32.copy_(saved[1])
    return replay_ms(runner, 1, reps=300)


def sweep(runner, key: tuple, gated: bool, kinds: list[str], save) -> dict:
    """The step's time with each tiling for this projection; `save(rows)` after each (a partial record)."""
    chosen = foa._BEST[key]
    timed = [(step_ms(runner), chosen)]  # (ms, config) of each tiling that ran
    rows = [{"config": str(chosen), "alone_choice": True, "ms": timed[0][0]}]
    for config in foa.candidate_configs(1, key[2], key[3], key[1], pdl=True):
        if (config.kernel not in kinds or not config.pdl or config == chosen
                or (gated and not foa._gates(config, None))):
            continue
        foa._BEST[key] = config
        try:
            timed.append((step_ms(runner), config))
            rows.append({"config": str(config), "ms": timed[-1][0]})
        except Exception as e:  # e.g. too much shared memory: note it, go on
            rows.append({"config": str(config), "error": f"{type(e).__name__}: {e}"[:200]})
        print(rows[-1], flush=True)
        save(rows)
    foa._BEST[key] = best = min(timed, key=lambda pair: pair[0])[1]
    alone = foa.TUNING_LOG.get(key)  # µs of each tiling alone, if this process tuned it (not recalled)
    return {"alone_choice": str(chosen), "best_in_step": str(best), "rows": rows, "alone_us": alone}


def combos(runner, keys: dict, original: dict, wanted: list[dict]) -> list[dict]:
    """The step's time with each joint choice (projections it leaves out keep the tuner's), twice each in
    alternation; the first row is the tuner's own choices."""
    by_name = {p: {str(c): c for c in foa.candidate_configs(1, k[2], k[3], k[1], pdl=True)} for p, k in keys.items()}
    settings = [{p: str(c) for p, c in original.items()}] + [{**{p: str(c) for p, c in original.items()}, **w}
                                                              for w in wanted]
    rows = [{"choices": {p: n for p, n in setting.items() if p != "env"}, "env": setting.get("env", {}), "ms": []}
            for setting in settings]
    for _ in range(2):
        for row in rows:
            for p, name in row["choices"].items():
                foa._BEST[keys[p]] = by_name[p][name]
            saved = {v: os.environ.get(v) for v in row["env"]}
            os.environ.update(row["env"])  # e.g. NANOVLLM_FUSED_DECODE_ROPE, read as the graphs are captured
            row["ms"].append(step_ms(runner))
            for v, value in saved.items():
                os.environ.pop(v) if value is None else os.environ.__setitem__(v, value)
            print(row, flush=True)
    return rows


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suffix", default="", help="appended to the file name")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    name, tag = card_name()
    llm = batch1_engine()
    runner, cfg = llm.engine.model_runner, llm.engine.model_config
    qkv_n = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    q_k = cfg.num_attention_heads * cfg.head_dim
    projections = {  # (n, k, gated, fused: with the residual add)
        "gate_up_proj": (2 * cfg.intermediate_size, cfg.hidden_size, True, False),
        "qkv_proj": (qkv_n, cfg.hidden_size, False, False), "o_proj": (cfg.hidden_size, q_k, False, True),
        "down_proj": (cfg.hidden_size, cfg.intermediate_size, False, True)}
    projections = {p: projections[p] for p in os.environ.get("TUNE_PROJECTIONS", "gate_up_proj qkv_proj").split()}
    kinds = os.environ.get("TUNE_KERNELS", "gemv").split()
    keys = {p: next(k for k in foa._BEST if k[2:4] == (n, kk) and k[5] == 1 and k[7] == fused)
            for p, (n, kk, _, fused) in projections.items()}  # as warmup tuned them: see foa.tuning_key
    original = {p: foa._BEST[k] for p, k in keys.items()}
    result = {"card": name, "model": "Qwen3-0.6B architecture, random bf16 weights", "context": 144}
    path = os.path.join(args.out_dir, f"tune_in_step-{tag}{args.suffix}.json")
    os.makedirs(args.out_dir, exist_ok=True)
    if os.environ.get("TUNE_COMBOS"):
        result["combos"] = combos(runner, keys, original, json.loads(os.environ["TUNE_COMBOS"]))
        write_json(path, result)
        llm.close()
        return
    for p, (_, _, gated, _) in projections.items():
        result[p] = sweep(runner, keys[p], gated, kinds, lambda rows, p=p: write_json(path, {**result, p: rows}))
    chosen = {p: foa._BEST[k] for p, k in keys.items()}
    ab = []
    for setting in ("alone", "in_step", "alone", "in_step"):  # alternated, so drift shows
        for p, k in keys.items():
            foa._BEST[k] = original[p] if setting == "alone" else chosen[p]
        ab.append({"choices": setting, "ms": step_ms(runner)})
    result["alternated"] = ab
    print(ab)
    write_json(path, result)
    llm.close()


if __name__ == "__main__":
    main()
