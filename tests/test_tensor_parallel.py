"""Tensor parallelism on the CPU: 2 ranks over gloo, against the same engine on one rank.

Qwen3 splits its 2 KV heads one per rank; the Llama has a single KV head (replicated on both ranks), tied
embeddings, an odd vocabulary (999: the last rank's slice is padded), biases on the row-parallel o_proj and
down_proj (to be added once, not once per rank), and runs with chunked prefill.
"""
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import make_tiny_model
from tiny_tokenizer import save_tiny_tokenizer

import nanovllm
from nanovllm import LLM, SamplingParams
from nanovllm.config import ModelConfig
from nanovllm.distributed.parallel_state import all_reduce_backend, check_tp_size, get_tp_size

PROMPTS = [[5, 17, 300, 42, 9], list(range(100, 117)), [7] * 3, [(i * 37) % 990 + 3 for i in range(33)]]
ARCHS = {"qwen3": ({}, {}),
         "llama": ({"num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 999,
                    "attention_bias": True, "mlp_bias": True},
                   {"max_num_batched_tokens": 16})}


def greedy(max_tokens: int = 24, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def make_folder(arch: str, tmp_path_factory) -> str:
    folder = make_tiny_model(arch, tmp_path_factory.mktemp(arch), **ARCHS[arch][0])
    save_tiny_tokenizer(folder)
    return folder


def worker_pids(llm: LLM) -> list[int]:
    return [p.pid for p in llm.engine.model_runner.workers.processes]


def descendants(pid: int) -> list[int]:
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [d for kid in map(int, kids) for d in (kid, *descendants(kid))]


def assert_same_greedy(outputs, expected) -> None:
    """The same greedy tokens, and the sampled tokens' logprobs within 1e-4."""
    for ours, ref in zip(outputs, expected, strict=True):
        tokens = ref.outputs[0].token_ids
        assert ours.outputs[0].token_ids == tokens
        lps = [[step[t].logprob for step, t in zip(o.outputs[0].logprobs, tokens)] for o in (ours, ref)]
        torch.testing.assert_close(torch.tensor(lps[0]), torch.tensor(lps[1]), atol=1e-4, rtol=0)


def gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie of another parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(gone(pid) for pid in pids)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> str:
    return make_folder("qwen3", tmp_path_factory)


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_matches_tp1(arch, qwen3, tmp_path_factory):
    folder = qwen3 if arch == "qwen3" else make_folder(arch, tmp_path_factory)
    engine_args = ARCHS[arch][1]
    params = greedy(logprobs=2, prompt_logprobs=1)
    expected = LLM(folder, **engine_args).generate(PROMPTS, params, use_tqdm=False)
    with LLM(folder, tensor_parallel_size=2, **engine_args) as llm:
        pids = worker_pids(llm)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert get_tp_size() == 2 and all_reduce_backend() == "gloo"  # symmetric memory is CUDA only
    assert_same_greedy(outputs, expected)
    for ours, ref in zip(outputs, expected):
        plps = [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])] for o in (ours, ref)]
        torch.testing.assert_close(torch.tensor(plps[0]), torch.tensor(plps[1]), atol=1e-4, rtol=0)
    # close() stopped and reaped the workers and left the group: a one-rank engine works again.
    assert multiprocessing.active_children() == [] and all(gone(pid) for pid in pids)
    assert get_tp_size() == 1 and all_reduce_backend() == "none"


def test_tp2_decode_through_the_graph_protocol_matches_eager_tp1(qwen3, monkeypatch):
    """NANOVLLM_UNCAPTURED_GRAPHS=1 runs CPU decode steps through the CUDA-graph code, uncaptured: under TP
    rank 0 broadcasts the graphs' input buffers (DECODE) and the workers replay the same bucket, then share
    the LM head. Three seqs pad to bucket 4 (a row with slot -1 and context 0)."""
    params = greedy(logprobs=2)
    expected = LLM(qwen3).generate(PROMPTS[:3], params, use_tqdm=False)
    monkeypatch.setenv("NANOVLLM_UNCAPTURED_GRAPHS", "1")
    with LLM(qwen3, tensor_parallel_size=2) as llm:
        assert llm.engine.model_runner.graphs is not None
        outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert_same_greedy(outputs, expected)



def test_tp2_seeded_rows_draw_by_their_keys_in_the_sharded_graphs(qwen3, monkeypatch):
    """Seeded rows at TP 2 (graph code uncaptured on CPU): temperature-only ones draw in the sharded graphs,
    every rank by the keys rank 0 broadcasts with the step's inputs; while a top-p one runs (no FILTER graphs
    under TP) every row takes the full Sampler on the gathered logits, so the others switch paths when it
    ends. Each makes TP 1's eager tokens, in a batch of four and in one of three."""
    hot = dict(max_tokens=20, ignore_eos=True)
    params = [SamplingParams(temperature=1.0, seed=21, **hot), SamplingParams(temperature=0.8, seed=22, **hot),
              SamplingParams(temperature=1.2, top_p=0.9, seed=23, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=24, **hot)]
    expected = [o.outputs[0].token_ids for o in LLM(qwen3).generate(PROMPTS, params, use_tqdm=False)]
    monkeypatch.setenv("NANOVLLM_UNCAPTURED_GRAPHS", "1")
    with LLM(qwen3, tensor_parallel_size=2) as llm:
        four = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        three = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2] + PROMPTS[3:], params[:2] + params[3:],
                                                              use_tqdm=False)]
    assert four == expected and three == expected[:2] + expected[3:]
    assert len({tuple(t) for t in expected}) == 4


def test_tp2_samples_inside_the_graphs_without_gathering_logits(qwen3, monkeypatch):
    """Under TP a decode graph ends with each rank's logits slice, its per-chunk bests (Gumbel-perturbed at
    the rows' temperatures) and an all-gather of those pairs only. Plain greedy steps (the sharded argmax)
    and near-zero temperature steps (the sharded draw) give TP 1's greedy tokens."""
    expected = LLM(qwen3).generate(PROMPTS[:3], greedy(), use_tqdm=False)
    monkeypatch.setenv("NANOVLLM_UNCAPTURED_GRAPHS", "1")
    with LLM(qwen3, tensor_parallel_size=2) as llm:
        graphs, sampling = llm.engine.model_runner.graphs, []
        replay = graphs.replay

        def counted(seqs, temperatures=None, *args, **kwargs):
            sampling.append(temperatures is not None and not kwargs.get("logits"))
            return replay(seqs, temperatures, *args, **kwargs)
        graphs.replay = counted
        plain = llm.generate(PROMPTS[:3], greedy(), use_tqdm=False)
        steps = len(sampling)
        cold = llm.generate(PROMPTS[:3], SamplingParams(temperature=1e-4, max_tokens=24, ignore_eos=True),
                            use_tqdm=False)
    assert steps >= 20 and not any(sampling[:steps]) and all(sampling[steps:])
    for outputs in (plain, cold):
        assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]


def test_tp2_with_dummy_weights_and_the_fused_output_matches_tp1(qwen3):
    """load_format="dummy" streams one random checkpoint through the loader, so every tensor-parallel size
    slices the same model; with the fused output path under TP the residual is added after the all-reduce."""
    params = greedy(logprobs=2)
    expected = LLM(qwen3, load_format="dummy").generate(PROMPTS, params, use_tqdm=False)
    with LLM(qwen3, load_format="dummy", tensor_parallel_size=2, use_fused_output=True) as llm:
        assert all(m.fuses_residual for m in llm.engine.model_runner.model.modules() if hasattr(m, "fuses_residual"))
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert_same_greedy(outputs, expected)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_killed_worker_raises_a_clear_error(qwen3, async_scheduling):
    """Also with async scheduling, where the death may surface while rank 0 launches the next step or
    while it waits for the one in flight."""
    llm = LLM(qwen3, tensor_parallel_size=2, async_scheduling=async_scheduling)
    pid = worker_pids(llm)[0]
    with pytest.raises(ValueError, match="already running"):  # one group per process
        LLM(qwen3, tensor_parallel_size=2)
    assert len(multiprocessing.active_children()) == 1
    with pytest.raises(RuntimeError, match=r"tensor-parallel worker 1 died \(killed by signal 9\)"):
        for i, _ in enumerate(llm.stream(PROMPTS, greedy(200))):
            if i == 8:  # mid-run: a few steps done, many to go
                os.kill(pid, signal.SIGKILL)
                start = time.monotonic()
    assert i >= 8 and time.monotonic() - start < 30
    with pytest.raises(RuntimeError, match="worker 1 died"):  # and it stays refused
        llm.generate(PROMPTS[:1], greedy(4), use_tqdm=False)
    llm.close()
    assert multiprocessing.active_children() == [] and gone(pid)
    assert get_tp_size() == 1


def test_kv_heads_must_divide_or_be_divided_by_tp():
    config = ModelConfig("llama", 100, 48, 96, 1, num_attention_heads=6, num_key_value_heads=3, head_dim=8)
    check_tp_size(config, 3, torch.device("cpu"))  # one KV head per rank
    with pytest.raises(ValueError, match="number of KV heads"):
        check_tp_size(config, 2, torch.device("cpu"))
    config.num_attention_heads, config.num_key_value_heads = 8, 2
    check_tp_size(config, 4, torch.device("cpu"))  # each KV head on 2 ranks
    with pytest.raises(ValueError, match="must divide the number of attention heads"):
        check_tp_size(config, 3, torch.device("cpu"))


@pytest.mark.parametrize("engine_args, match", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer"),
    (dict(tensor_parallel_size=3), "must divide the number of attention heads"),
    (dict(tensor_parallel_size=2, device="cuda"), "visible CUDA device"),
])
def test_bad_tensor_parallel_size(qwen3, engine_args, match):
    if engine_args.get("device") == "cuda" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ValueError, match=match):
        LLM(qwen3, **engine_args)
    assert multiprocessing.active_children() == []  # refused before any worker started


_SCRIPT = """
import faulthandler, signal, sys, time
from nanovllm import LLM, SamplingParams
if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for the stacks of a hang
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the suite runs as a background job
    # (which starts with SIGINT ignored, and Python then installs no handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    llm = LLM(sys.argv[1], tensor_parallel_size=2)
    print(*[p.pid for p in llm.engine.model_runner.workers.processes], flush=True)
    while True:
        llm.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_no_orphans_when_rank0_stops(qwen3, tmp_path, sig):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or a SIGKILL of rank 0 alone,
    mid-generation: the workers exit too."""
    script = tmp_path / "run_tp.py"
    script.write_text(_SCRIPT)
    root = os.path.dirname(os.path.dirname(nanovllm.__file__))  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(script), qwen3], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env, start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1
        time.sleep(1.0)  # generating
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.kill()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # rank 0 dumps its threads' stacks into stderr
            time.sleep(2)
            stderr.seek(0)
            pytest.fail("rank 0 did not exit within 30 s of the signal; its stderr:\n" + stderr.read()[-6000:])
        assert wait_gone(pids), "a tensor-parallel worker outlived rank 0"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stderr.close()


def test_server_with_tensor_parallelism_serves_the_offline_tokens_and_exits_cleanly(qwen3, tmp_path):
    """`nanovllm serve --tensor-parallel-size 2`: the engine process starts its own worker, a greedy
    completion equals the offline one-rank engine's, and SIGTERM leaves no process behind."""
    from test_server import ServerProcess
    params = greedy(8)
    expected = LLM(qwen3).generate(["hello world"], params, use_tqdm=False)[0].outputs[0]
    server = ServerProcess(["--model", qwen3, "--tensor-parallel-size", "2", "--max-model-len", "256"],
                           str(tmp_path / "server.log"))
    children = descendants(server.proc.pid)  # the engine process, its TP worker, multiprocessing's tracker
    try:
        out = server.client().completions.create(model=qwen3, prompt="hello world", max_tokens=8, temperature=0)
        assert out.choices[0].text == expected.text
        assert out.usage.completion_tokens == len(expected.token_ids)
    finally:
        rc = server.stop()
    assert rc == 0 and "Traceback" not in server.log(), server.log()[-3000:]
    assert len(children) >= 2 and wait_gone(children)
