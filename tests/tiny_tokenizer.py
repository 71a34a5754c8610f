"""A small byte-level BPE tokenizer (vocab <= 1000) trained in-process, so tiny random model folders are
complete HF checkpoints: config.json, safetensors, tokenizer.json, tokenizer_config.json with a ChatML template."""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1 (bos), 2 (eos): as tests/tiny_models.py's config
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
          "def add(a, b):\n    return a + b\n", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1024",
          "café naïve 東京 😀 emoji and unicode", "Hello world! How are you today?"] * 20


def save_tiny_tokenizer(folder: str, vocab_size: int = 1000, corpus: list[str] = CORPUS,
                        specials: list[str] = SPECIALS, bos: str = "<|im_start|>", eos: str = "<|im_end|>") -> int:
    """Trains the tokenizer on `corpus` (specials take the first ids), writes it into `folder`, and returns
    its vocab size. The byte alphabet is always in the vocab, so any text encodes."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": False, "chat_template": CHATML}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok.get_vocab_size()
