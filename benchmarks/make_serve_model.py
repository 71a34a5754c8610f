"""Writes the model folder benchmarks/gpu_serve.sh serves: the Qwen3-0.6B config (random weights are drawn at
load with --load-format dummy) with SmolLM2's 49,152-token vocabulary and tokenizer, so every id the random
model emits decodes to text. Run here, then carry the folder to the GPU machine (it is git-ignored).

    python benchmarks/make_serve_model.py [--out .gpuserve/qwen3-0.6b]
"""
import argparse
import json
import os

from nanovllm.utils.default_model import default_model_path
from nanovllm.utils.tokenizer import Tokenizer

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "qwen3-0.6b.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".gpuserve/qwen3-0.6b")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    tokenizer = Tokenizer.from_gguf(default_model_path())
    with open(CONFIG) as f:
        config = json.load(f)
    config["vocab_size"] = tokenizer.vocab_size
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tokenizer.backend_tokenizer.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
                   "chat_template": tokenizer.chat_templates["default"]}, f)
    print(f"wrote {out}: vocab {tokenizer.vocab_size}")


if __name__ == "__main__":
    main()
