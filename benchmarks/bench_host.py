"""Host (CPU) time of `LLMEngine.step` outside the model: scheduling and postprocessing, no model compute.

The model runner is replaced by a stand-in that samples a fixed token for every seq that reached its last
token, so what is timed is the engine's own Python work per step at a full decode batch (256 seqs, prompts
of 128 tokens, 512 output tokens, ignore_eos). Medians over the timed steps of thread CPU time, split into
schedule / runner / postprocess (the rest of step: appending tokens, stop checks, detokenization, building
outputs), and of the step's wall time. Two engines: token ids only (skip_tokenizer_init) and with a
tokenizer; each with streaming requests (an output per step) and with stream=False requests (what
`LLM.generate` adds: an output only when finished); each with and without async scheduling (where the step
also launches the next one before processing its own ids: "schedule" is then schedule_overlapped, and the
runner stand-in's launch and read-back; on a GPU this whole host time overlaps the step's GPU time).
Writes benchmarks/results/host-cpu.json. `--profile` prints a cProfile of the timed steps; `--baseline` keeps
another commit's run beside this one.
"""
import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny_models import make_tiny_model  # noqa: E402
from tiny_tokenizer import save_tiny_tokenizer  # noqa: E402

import nanovllm  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402
from nanovllm.engine.model_runner import StepOutput  # noqa: E402

# Thread CPU time: on a shared machine the wall clock also counts the time other processes hold the core,
# while for this single-threaded Python work CPU time is what an idle host's wall clock would show.
clock = time.thread_time
RESULTS = os.path.join(os.path.dirname(__file__), "results")
FIXED_TOKEN = 300  # "jum" in the tiny vocab: real text to detokenize (an id that decodes to "" would not be)


class Timer:
    """Wraps engine.scheduler.schedule and engine.model_runner.run to split step() into its parts."""

    def __init__(self, engine: LLMEngine):
        self.schedule_s = self.runner_s = 0.0
        def timed(schedule):
            def timed_schedule():
                t = clock()
                batch = schedule()
                self.schedule_s += clock() - t
                return batch
            return timed_schedule

        def fake_run(batch):
            t = clock()
            sampled = {seq.seq_id: FIXED_TOKEN for seq, n in zip(batch.seqs, batch.num_new_tokens)
                       if seq.num_computed_tokens + n == seq.num_tokens}
            out = StepOutput(sampled, {}, {})
            self.runner_s += clock() - t
            return out

        def fake_launch(batch, prev=None):
            t = clock()
            pending = FakePending(batch.seqs, self)
            self.runner_s += clock() - t
            return pending

        names = ("schedule", "schedule_overlapped", "run", "launch")
        self.restore = lambda: [delattr(engine.scheduler if name.startswith("s") else engine.model_runner, name)
                                for name in names]
        # Instance attributes shadow the methods until restore().
        engine.scheduler.schedule = timed(engine.scheduler.schedule)
        engine.scheduler.schedule_overlapped = timed(engine.scheduler.schedule_overlapped)
        engine.model_runner.run, engine.model_runner.launch = fake_run, fake_launch


class FakePending:
    """The stand-in for a launched step (PendingStep): every seq samples FIXED_TOKEN."""

    def __init__(self, seqs, timer: Timer):
        self.rows = {seq.seq_id: i for i, seq in enumerate(seqs)}  # as PendingStep builds them
        self.seqs, self.timer = seqs, timer

    def result(self) -> StepOutput:
        t = clock()
        out = StepOutput(dict.fromkeys(self.rows, FIXED_TOKEN), {}, {})
        self.timer.runner_s += clock() - t
        return out


def run_case(engine: LLMEngine, stream: bool, num_seqs: int, prompt_len: int, max_tokens: int,
             steps: int, profile: bool) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(num_seqs):  # distinct prompts: no prefix-cache sharing
        prompt = [(7 * i + j) % 900 + 50 for j in range(prompt_len)]
        engine.add_request(f"{stream}-{i}", prompt, params, stream=stream)
    timer = Timer(engine)  # the stand-in runner also serves the untimed prefill and drain steps
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for r in engine.requests.values() for seq in r.seqs):
        engine.step()
    assert engine.scheduler.num_running == num_seqs, "all seqs must be decoding together"
    profiler = cProfile.Profile() if profile else None
    parts = []  # per step: (total, schedule, runner, wall) seconds; medians resist the machine's other load
    for _ in range(steps):
        timer.schedule_s = timer.runner_s = 0.0
        if profiler:
            profiler.enable()
        t, wall = clock(), time.perf_counter()
        engine.step()
        total, wall = clock() - t, time.perf_counter() - wall
        if profiler:
            profiler.disable()
        parts.append((total, timer.schedule_s, timer.runner_s, wall))
    assert engine.scheduler.num_running == num_seqs, "no seq may finish while timed"
    assert (engine._inflight is not None) == engine.async_scheduling, "async: every timed step overlaps"
    while engine.has_unfinished_requests():
        engine.step()
    timer.restore()
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    median = [statistics.median(p) * 1e6 for p in zip(*parts)]
    post = statistics.median(total - sched - run for total, sched, run, _ in parts) * 1e6
    return {"step_us": median[0], "schedule_us": median[1], "runner_us": median[2], "postprocess_us": post,
            "step_wall_us": median[3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", default=os.path.join(RESULTS, "host-cpu.json"))
    parser.add_argument("--baseline", help="a JSON this script wrote for other code (e.g. an older commit, "
                        "run with PYTHONPATH at its nanovllm), copied into the report for comparison")
    parser.add_argument("--label", default="", help="what code this is (e.g. a commit), kept in the report")
    args = parser.parse_args()
    assert args.steps < args.max_tokens - 8, "every seq must still be running during the timed steps"
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("qwen3", tmp)
        save_tiny_tokenizer(path)
        for tokenizer, async_scheduling in [(t, a) for t in (False, True) for a in (False, True)]:
            engine = LLMEngine(path, skip_tokenizer_init=not tokenizer, load_format="dummy", device="cpu",
                               max_model_len=1024, max_num_seqs=args.num_seqs, num_kvcache_blocks=8192,
                               enforce_eager=True, async_scheduling=async_scheduling)
            for stream in (True, False):
                row = run_case(engine, stream, args.num_seqs, args.prompt_len, args.max_tokens, args.steps,
                               args.profile)
                row.update(tokenizer=tokenizer, stream=stream, async_scheduling=async_scheduling)
                results.append(row)
                print(f"tokenizer={tokenizer!s:5} stream={stream!s:5} async={async_scheduling!s:5}  step "
                      f"{row['step_us']:7.1f} us = schedule {row['schedule_us']:6.1f} + runner stand-in "
                      f"{row['runner_us']:5.1f} + postprocess {row['postprocess_us']:6.1f}  (CPU us; wall "
                      f"{row['step_wall_us']:7.1f} us)")
    report = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
              "num_seqs": args.num_seqs, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
              "steps": args.steps, "label": args.label, "results": results}
    if args.baseline:
        with open(args.baseline) as f:
            report["baseline"] = json.load(f)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} (nanovllm from {os.path.dirname(nanovllm.__file__)})")


if __name__ == "__main__":
    main()
