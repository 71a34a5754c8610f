"""A batch-1 decode layer's attention block in one kernel of thread-block clusters, against the engine's three
Triton kernels (session 34; not in the engine: it did not make a step faster).

At one token the attention block is three PDL-chained kernels: qkv_proj with the RMSNorm folded in (the
staged gemv), the decode kernel (q/k norm, RoPE, the KV store, attention over a split of the keys) and the
merge of the splits. Each needs its predecessor's output for one KV head only, so qkv_attention.cu runs all
three in one cluster of CTAs a KV head, trading rows of q, k, v and softmax partials through distributed
shared memory behind hardware cluster barriers instead of kernel boundaries. Each CTA streams its rows of
W_qkv (one bulk copy) and its first two tiles of cached keys (16-byte async copies) before the PDL wait.

This script compiles it with nvcc, launches it through the CUDA driver API (cluster shape, PDL), and
- checks it against a torch reference (the unfused kernels' roundings) at 5 head shapes x 6 contexts, and
  in a CUDA graph replayed while the step inputs change in place;
- times it alone, 100 launches back to back in a graph, against the Triton chain doing the same work, and
  traces one launch's phases (clock64 per CTA, a -DTRACE=1 build);
- times batch-1 decode in the engine (Qwen3-0.6B, random bf16 weights) with LlamaAttention routed through it
  (clusters of 8 and of 16) or not, each setting in fresh processes, alternated over rounds, each setting
  with its own tuning file: the default loop's ms per token and a bare graph replay at two contexts.
Writes results/qkv_attention_cluster-<card>.json and a PNG.

    PYTHONPATH=.:benchmarks python benchmarks/megakernel/qkv_attention.py [--rounds 2]
    python benchmarks/megakernel/qkv_attention.py --plot benchmarks/results/qkv_attention_cluster-h100.json
"""
import argparse
import ctypes
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from nanovllm.kernels.add_rmsnorm import rmsnorm_ref
from nanovllm.kernels.paged_attention import paged_attention_ref
from nanovllm.kernels.rope_kv_store import rope_and_store_kv_ref

SOURCE = Path(__file__).with_name("qkv_attention.cu")
RESULTS = Path(__file__).resolve().parents[1] / "results"
THREADS, TILE, HEAD_DIM = 256, 32, 128  # as qkv_attention.cu has them
CONTEXTS = (168, 400, 2008, 8000)


def qkv_attention_ref(x, residual, norm_weight, norm_eps, w_qkv, q_norm_weight, k_norm_weight, qk_eps,
                      cos_sin_cache, k_cache, v_cache, block_tables, context_lens, slot_mapping, num_heads,
                      num_kv_heads, scale):
    """Plain torch, one decode token: stores its k and v in the cache and returns (attn (1, H * D), s), s = x
    [+ residual] the residual stream, each step rounded as the engine's unfused kernels round it."""
    stream = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    qkv = rmsnorm_ref(stream, norm_weight, norm_eps).float() @ w_qkv.float().T
    q, k, v = qkv.to(x.dtype).split([num_heads * HEAD_DIM, num_kv_heads * HEAD_DIM, num_kv_heads * HEAD_DIM], -1)
    q, k, v = (t.reshape(1, -1, HEAD_DIM).clone() for t in (q, k, v))
    rope_and_store_kv_ref(q, k, v, (context_lens - 1).long(), cos_sin_cache, k_cache, v_cache, slot_mapping,
                          q_norm_weight, k_norm_weight, qk_eps)
    cu_seqlens = torch.tensor([0, 1], dtype=torch.int32, device=x.device)
    attn = paged_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, 1, scale)
    return attn.flatten(1), stream


def smem_bytes(group: int, cluster: int, hidden: int) -> int:
    """The kernel's dynamic shared memory, as qkv_attention.cu lays it out (+ alignment slack)."""
    rows, d = (group + 2) * HEAD_DIM, HEAD_DIM
    bf16 = (rows // cluster) * hidden + 4 * TILE * d
    f32 = rows // cluster + rows + group * d + 2 * d + group * TILE + 3 * group + group * d + cluster * group
    return bf16 * 2 + f32 * 4 + 16


def supports(hidden: int, num_heads: int, num_kv_heads: int, cluster: int) -> bool:
    rows = (num_heads // num_kv_heads + 2) * HEAD_DIM
    return (rows % cluster == 0 and (rows // cluster) % (THREADS // 32) == 0 and hidden % THREADS == 0
            and smem_bytes(num_heads // num_kv_heads, cluster, hidden) <= 227 * 1024)


def qkv_attention(x, residual, norm_weight, norm_eps, w_qkv, q_norm_weight, k_norm_weight, qk_eps, cos_sin_cache,
                  k_cache, v_cache, block_tables, context_lens, slot_mapping, num_heads, num_kv_heads, scale,
                  cluster=16, trace=None):
    """qkv_attention_ref's result in one launch, with no host sync (a CUDA graph can hold it): bf16 x,
    weights and cache, head_dim 128. trace (int64 (CTAs, 16)): the -DTRACE=1 build, which stamps phases."""
    group, hidden, has_norm = num_heads // num_kv_heads, x.shape[1], q_norm_weight is not None
    fn, smem = _kernel(x.device.index or 0, group, cluster, hidden, has_norm, cos_sin_cache.dtype == torch.bfloat16,
                       trace is not None)
    out = torch.empty(1, num_heads * HEAD_DIM, dtype=x.dtype, device=x.device)
    stream = x if residual is None else torch.empty_like(x)
    P, F, Int, L = ctypes.c_uint64, ctypes.c_float, ctypes.c_int32, ctypes.c_int64
    norms = (q_norm_weight, k_norm_weight) if has_norm else (norm_weight, norm_weight)  # unused without
    args = [P(x.data_ptr()), P(0 if residual is None else residual.data_ptr()), P(stream.data_ptr()),
            P(norm_weight.data_ptr()), F(norm_eps), P(w_qkv.data_ptr()), P(norms[0].data_ptr()),
            P(norms[1].data_ptr()), F(qk_eps), P(cos_sin_cache.data_ptr()), L(cos_sin_cache.stride(0)),
            P(k_cache.data_ptr()), P(v_cache.data_ptr()), *(L(s) for s in k_cache.stride()[:3]),
            *(L(s) for s in v_cache.stride()[:3]), P(block_tables.data_ptr()), P(context_lens.data_ptr()),
            P(slot_mapping.data_ptr()), Int(k_cache.shape[1]), F(scale * 1.4426950408889634), P(out.data_ptr()),
            Int(num_heads), Int(num_kv_heads)] + ([] if trace is None else [P(trace.data_ptr())])
    _launch(fn, num_kv_heads * cluster, cluster, smem, torch.cuda.current_stream(x.device).cuda_stream, args)
    return out, stream


# --- nvcc and the CUDA driver API ------------------------------------------------------------------------------

class _Dim3(ctypes.Structure):
    _fields_ = [("x", ctypes.c_uint), ("y", ctypes.c_uint), ("z", ctypes.c_uint)]


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("cluster_dim", _Dim3), ("flag", ctypes.c_int),
                ("_align", ctypes.c_uint64)]


class _Attr(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint)]


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check(result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: {msg.value.decode() if msg.value else result}")


@functools.cache
def _kernel(device: int, group: int, cluster: int, hidden: int, has_norm: bool, cos_sin_bf16: bool, trace: bool):
    """(CUfunction, dynamic shared memory bytes), compiled for the device and loaded into its primary context."""
    major, minor = torch.cuda.get_device_capability(device)
    defines = dict(HEAD_DIM=HEAD_DIM, GROUP=group, CLUSTER=cluster, HIDDEN=hidden, HAS_NORM=int(has_norm),
                   COS_SIN_BF16=int(cos_sin_bf16), TRACE=int(trace))
    with tempfile.TemporaryDirectory() as tmp:
        flags = [f"-D{k}={v}" for k, v in defines.items()]
        subprocess.run(["nvcc", f"-arch=sm_{major}{minor}", "-cubin", "-O3", *flags, "-o", f"{tmp}/k.cubin",
                        str(SOURCE)], check=True)
        cubin = Path(f"{tmp}/k.cubin").read_bytes()
    cu, context, dev = _driver(), ctypes.c_void_p(), ctypes.c_int()
    _check(cu.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet")
    _check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(context), dev), "cuDevicePrimaryCtxRetain")
    _check(cu.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
    module, fn = ctypes.c_void_p(), ctypes.c_void_p()
    try:
        _check(cu.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), "cuModuleLoadData")
    finally:
        _check(cu.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())), "cuCtxPopCurrent")
    _check(cu.cuModuleGetFunction(ctypes.byref(fn), module, b"qkv_attention_kernel"), "cuModuleGetFunction")
    smem = smem_bytes(group, cluster, hidden)
    _check(cu.cuFuncSetAttribute(fn, 8, smem), "cuFuncSetAttribute")  # MAX_DYNAMIC_SHARED_SIZE_BYTES
    if cluster > 8:
        _check(cu.cuFuncSetAttribute(fn, 14, 1), "cuFuncSetAttribute")  # NON_PORTABLE_CLUSTER_SIZE_ALLOWED
    return fn, smem


def _launch(fn, grid: int, cluster: int, smem: int, stream: int, args: list) -> None:
    attrs = (_Attr * 2)()
    attrs[0].id, attrs[0].value.cluster_dim = 4, _Dim3(cluster, 1, 1)  # CLUSTER_DIMENSION
    attrs[1].id, attrs[1].value.flag = 6, 1  # PROGRAMMATIC_STREAM_SERIALIZATION (PDL)
    config = _LaunchConfig((grid, 1, 1), (THREADS, 1, 1), smem, stream, attrs, 2)
    params = (ctypes.c_void_p * len(args))(*(ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args))
    _check(_driver().cuLaunchKernelEx(ctypes.byref(config), fn, params, None), "cuLaunchKernelEx")


# --- checks and timings ----------------------------------------------------------------------------------------

def case(heads: int, kv_heads: int, qk_norm: bool, ctx_len: int, page: int, residual: bool) -> dict:
    """Random inputs for one decode token at ctx_len - 1 over a shuffled paged cache of random keys."""
    from nanovllm.layers.rotary_embedding import RotaryEmbedding
    gen = torch.Generator(device="cuda").manual_seed(ctx_len * 7 + heads)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)
    hidden, d, blocks = 1024, HEAD_DIM, -(-ctx_len // page)
    table = torch.randperm(blocks + 3, generator=gen, device="cuda")[:blocks].int()[None]
    cache_shape = (blocks + 3, page, kv_heads, d)
    return dict(
        x=rand(1, hidden), residual=rand(1, hidden) if residual else None, norm_weight=1 + rand(hidden, scale=0.1),
        norm_eps=1e-6, w_qkv=rand((heads + 2 * kv_heads) * d, hidden, scale=0.03),
        q_norm_weight=1 + rand(d, scale=0.1) if qk_norm else None,
        k_norm_weight=1 + rand(d, scale=0.1) if qk_norm else None, qk_eps=1e-6,
        cos_sin_cache=RotaryEmbedding(d, 8192, 1e6).cos_sin_cache.cuda(), k_cache=rand(*cache_shape),
        v_cache=rand(*cache_shape), block_tables=table, context_lens=torch.tensor([ctx_len], dtype=torch.int32,
                                                                                  device="cuda"),
        slot_mapping=(table[0, (ctx_len - 1) // page] * page + (ctx_len - 1) % page).long().view(1),
        num_heads=heads, num_kv_heads=kv_heads, scale=d ** -0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.inference_mode()
def check() -> dict:
    """The kernel against the reference: attention output (rel. err. < 1e-2), the residual stream (exact), the
    new k and v in the cache, every other slot untouched; then one graph replayed over changing inputs."""
    worst = 0.0
    shapes = [(8, 16, 8, True), (16, 16, 8, True), (16, 32, 8, True), (8, 8, 8, False), (16, 8, 8, False)]
    contexts = [(1, 16, False), (2, 16, True), (17, 16, False), (168, 16, True), (1000, 256, False), (4099, 16, True)]
    for cluster, heads, kv_heads, qk_norm in shapes:
        for ctx_len, page, residual in contexts:
            args = case(heads, kv_heads, qk_norm, ctx_len, page, residual)
            assert supports(1024, heads, kv_heads, cluster)
            ref_args = {**args, "k_cache": args["k_cache"].clone(), "v_cache": args["v_cache"].clone()}
            before = args["k_cache"].clone(), args["v_cache"].clone()
            out, stream = qkv_attention(**args, cluster=cluster)
            ref, ref_stream = qkv_attention_ref(**ref_args)
            assert torch.equal(stream, ref_stream)
            worst = max(worst, rel_err(out, ref))
            slot = args["slot_mapping"].item()
            new = slot // page, slot % page
            for cache, ref_cache, old in zip((args["k_cache"], args["v_cache"]),
                                             (ref_args["k_cache"], ref_args["v_cache"]), before):
                assert rel_err(cache[new], ref_cache[new]) < 1e-2
                cache[new], old[new] = 0, 0
                assert torch.equal(cache, old)
    args = case(16, 8, True, 300, 16, False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = qkv_attention(**args)
    for ctx_len in (300, 5, 64, 299, 1):
        step = case(16, 8, True, ctx_len, 16, False)
        for name in ("x", "block_tables", "context_lens", "slot_mapping"):
            args[name].zero_()[..., :step[name].shape[-1]].copy_(step[name])
        ref_args = {**args, "k_cache": args["k_cache"].clone(), "v_cache": args["v_cache"].clone()}
        graph.replay()
        worst = max(worst, rel_err(out, qkv_attention_ref(**ref_args)[0]))
    assert worst < 1e-2, worst
    return {"cases": len(shapes) * len(contexts) + 5, "max_rel_err": worst}


def graph_us(step, n: int = 100) -> float:
    """µs a call of `step`, n calls back to back in a CUDA graph (PDL edges kept)."""
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


PHASES = ["start", "pre-wait loads issued", "PDL wait returned", "x normalized", "weights in", "qkv pushed + barrier",
          "q/k norm + RoPE", "tile 0 in", "scores", "softmax", "P @ V", "keys done", "partials pushed + barrier",
          "merged"]


@torch.inference_mode()
def alone() -> dict:
    """Each kernel alone against the engine's Triton chain (rmsnorm_project's staged gemv, the decode kernel
    with RoPE, the merge), Qwen3-0.6B's shapes; and a trace of the kernel's phases at 168 keys."""
    from nanovllm.kernels.fused_attention_output import rmsnorm_project
    from nanovllm.kernels.paged_attention import NewTokenRope, paged_attention
    result = {}
    for cluster in (8, 16):
        row = {}
        for ctx in CONTEXTS:
            a = case(16, 8, True, ctx, 16, False)
            row[f"us_at_{ctx}_keys"] = graph_us(lambda: qkv_attention(**a, cluster=cluster))
        trace = torch.zeros(8 * cluster, 16, dtype=torch.int64, device="cuda")
        a = case(16, 8, True, 168, 16, False)
        graph_us(lambda: qkv_attention(**a, cluster=cluster, trace=trace))
        cycles = (trace.cpu() - trace.cpu()[:, 2:3]).float()[:, :len(PHASES)]  # from each CTA's wait, last launch
        row["trace_cycles_from_wait"] = {name: {"median": m, "min": lo, "max": hi} for name, m, lo, hi in
                                         zip(PHASES, cycles.median(0).values.tolist(), cycles.min(0).values.tolist(),
                                             cycles.max(0).values.tolist())}
        result[f"clusters_of_{cluster}"] = row
    triton = {}
    for ctx in CONTEXTS:
        a = case(16, 8, True, ctx, 16, False)
        cu_q = torch.tensor([0, 1], dtype=torch.int32, device="cuda")

        def step(a=a, cu_q=cu_q):
            qkv, _ = rmsnorm_project(a["x"], a["norm_weight"], 1e-6, a["w_qkv"])
            q, k, v = qkv.split([2048, 1024, 1024], -1)
            rope = NewTokenRope(k.view(1, 8, 128), v.view(1, 8, 128), a["cos_sin_cache"], a["slot_mapping"],
                                a["q_norm_weight"], a["k_norm_weight"], 1e-6)
            return paged_attention(q.view(1, 16, 128), a["k_cache"], a["v_cache"], a["block_tables"], cu_q,
                                   a["context_lens"], 1, 128 ** -0.5, rope=rope)
        triton[f"us_at_{ctx}_keys"] = graph_us(step)
    result["triton_chain"] = triton
    return result


def route_attention_through_clusters(cluster: int) -> None:
    """LlamaAttention's one-token decode steps run qkv_attention in place of its qkv_proj and attention."""
    from nanovllm.layers.layernorm import Normed
    from nanovllm.models.llama import LlamaAttention
    from nanovllm.utils.context import get_context
    original = LlamaAttention.forward

    def forward(self, positions, hidden_states, norm, residual=None, next_norm=None):
        context = get_context()
        if not (self.use_triton and self.attn.k_cache.numel() and hidden_states.shape[0] == 1
                and not isinstance(residual, Normed) and context is not None and context.max_q_len == 1):
            return original(self, positions, hidden_states, norm, residual, next_norm)
        qk = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        attn, stream = qkv_attention(hidden_states, residual, norm.weight, norm.eps, self.qkv_proj.weight, *qk,
                                     self.q_norm.eps if self.q_norm is not None else 1e-6,
                                     self.rotary_emb.cos_sin_cache, self.attn.k_cache, self.attn.v_cache,
                                     context.block_tables, context.context_lens_t, context.slot_mapping,
                                     self.num_heads, self.num_kv_heads, self.attn.scale, cluster=cluster)
        if self.fuses_residual:
            return self.o_proj.forward_add(attn, stream, next_norm)
        return self.o_proj(attn), stream
    LlamaAttention.forward = forward


def engine_child(cluster: int) -> dict:
    """One process's batch-1 engine: the default loop's ms per token (4 requests after an untimed one) and a
    bare decode-graph replay at two contexts."""
    from bench_latency import PROMPT_LEN, model_dir, replay_ms, request_ms_per_token

    from nanovllm import LLM, SamplingParams
    if cluster:
        route_attention_through_clusters(cluster)
    llm = LLM(model_dir(), load_format="dummy", skip_tokenizer_init=True, max_num_seqs=1, max_model_len=4096)
    gen, tokens = torch.Generator().manual_seed(0), 256
    per_token = request_ms_per_token(llm, gen, tokens, requests=4)
    replays = {PROMPT_LEN + tokens: replay_ms(llm.engine.model_runner, 1)}  # inputs as the last step left them
    llm.generate([torch.randint(0, 10000, (2000,), generator=gen).tolist()],
                 SamplingParams(temperature=0, ignore_eos=True, max_tokens=8), use_tqdm=False)
    replays[2008] = replay_ms(llm.engine.model_runner, 1)
    llm.close()
    return {"ms_per_token": statistics.median(per_token), "ms_per_token_each": per_token, "replay_ms": replays}


def engine(rounds: int, settings=(0, 16, 8)) -> dict:
    runs = {s: [] for s in settings}
    cache_root = tempfile.mkdtemp()
    for _ in range(rounds):
        for s in settings:
            env = {**os.environ, "NANOVLLM_CACHE_DIR": f"{cache_root}/{s}"}  # each setting tunes its own step
            done = subprocess.run([sys.executable, __file__, "--child", str(s)], env=env, check=True, text=True,
                                  stdout=subprocess.PIPE)
            runs[s].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(s, runs[s][-1]["ms_per_token"], runs[s][-1]["replay_ms"], flush=True)
    return {("triton" if s == 0 else f"clusters_of_{s}"): r for s, r in runs.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["triton_chain", "clusters_of_8", "clusters_of_16"]
    for name in names:
        row = result["alone"][name]
        left.plot(CONTEXTS, [row[f"us_at_{c}_keys"] for c in CONTEXTS], "o-", label=name.replace("_", " "))
    left.set(xscale="log", xlabel="keys", ylabel="µs a layer", title="attention block alone, back to back")
    left.set_xticks(CONTEXTS, [str(c) for c in CONTEXTS])
    left.minorticks_off()
    left.legend()
    for i, (name, runs) in enumerate(result["engine"].items()):
        right.scatter([i] * len(runs), [r["ms_per_token"] for r in runs], label=f"{name}: default loop")
        right.scatter([i + 0.2] * len(runs), [r["replay_ms"]["384"] for r in runs], marker="x",
                      label=f"{name}: graph replay, 384 keys")
    right.set(xticks=range(len(result["engine"])), xticklabels=list(result["engine"]), ylabel="ms per token",
              title="batch-1 decode in the engine")
    right.legend(fontsize=7)
    fig.suptitle(f"Qwen3-0.6B attention block as one cluster kernel, {result['card']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", type=int, help="cluster size (0: the Triton kernels); what each process does")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--plot", metavar="JSON", help="only redraw the PNG of this result file")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    if args.child is not None:
        print(json.dumps(engine_child(args.child)))
        return
    card = torch.cuda.get_device_name()
    result = {"card": card, "check": check()}
    print(result, flush=True)
    result["alone"] = alone()
    print(json.dumps(result["alone"]), flush=True)
    result["engine"] = engine(args.rounds)
    out = Path(args.out_dir) / f"qkv_attention_cluster-{'h200' if 'H200' in card else 'h100'}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
