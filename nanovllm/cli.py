"""The `nanovllm` command: generate, chat, serve, bench."""
import argparse
import sys

from nanovllm.utils.args import add_engine_args, add_sampling_args, engine_kwargs, sampling_params


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except ValueError as e:  # user errors: a clear message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanovllm", description="A small, readable and fast LLM inference engine. With no --model, "
        "every command uses SmolLM2-135M-Instruct.")
    sub = parser.add_subparsers(metavar="COMMAND")

    gen = sub.add_parser("generate", help="Generate completions for one or more prompts.",
                         description="Generate completions for prompts given as arguments or in a file.")
    gen.add_argument("prompts", nargs="*", help="Prompts to complete.")
    gen.add_argument("--prompts-file", help="A file with one prompt per line (added to the arguments).")
    gen.add_argument("--chat", action="store_true", help="Wrap each prompt as a user message in the model's "
                     "chat template.")
    gen.add_argument("--json", action="store_true", help="Print one JSON object per prompt.")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="Chat interactively; replies stream as they are generated.",
                          description="Interactive chat with the model's chat template. Type /exit or send EOF "
                          "(Ctrl-D) to quit, /reset to clear the history.")
    chat.add_argument("--system", default=None, help="A system prompt.")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512)
    chat.set_defaults(func=_chat)

    try:
        from nanovllm.server.cli import add_bench_parser, add_serve_parser
    except ImportError:  # the server's dependencies are optional for offline use
        pass
    else:
        add_serve_parser(sub)
        add_bench_parser(sub)
    return parser


def _generate(args: argparse.Namespace) -> int:
    import json

    from nanovllm import LLM
    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("Give at least one prompt (as an argument or with --prompts-file).")
    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    if args.chat:
        inputs = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:
        inputs = prompts
    outputs = llm.generate(inputs, params, use_tqdm=len(prompts) > 1)
    for prompt, output in zip(prompts, outputs):
        for completion in output.outputs:
            if args.json:
                print(json.dumps({"prompt": prompt, "text": completion.text, "token_ids": completion.token_ids,
                                  "finish_reason": completion.finish_reason}, ensure_ascii=False))
            else:
                print(completion.text if len(prompts) == 1 and params.n == 1
                      else f"[{prompt!r}] {completion.text}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from nanovllm import LLM
    params = sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    history = [{"role": "system", "content": args.system}] if args.system else []
    start = list(history)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for output in llm.stream([llm.apply_chat_template(history)], params):
            delta = output.outputs[0].delta_text
            reply += delta
            print(delta, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0


if __name__ == "__main__":
    sys.exit(main())
