"""Helpers for the training tests: a tiny trunk saved with a character-level tokenizer, and the tiny recipe.

The trunk is ``conftest.tiny_trunk("llama")`` (2 layers, hidden 64, vocab 128; SmolLM2-135M has 30 layers,
hidden 576, vocab 49152). The tokenizer maps each printable character to one id and fills the rest of the
128-id vocabulary with inert filler tokens, so every id the random trunk writes decodes to text.
"""

from __future__ import annotations

import os
import string

from conftest import tiny_trunk
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPE = os.path.join(REPO, "recipes", "configs", "tiny.yaml")
TRAIN_SCRIPT = os.path.join(REPO, "recipes", "train.py")
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)


def char_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    fillers = [f"~{i}~" for i in range(vocab_size - len(specials) - len(chars))]
    vocab = {t: i for i, t in enumerate(specials + chars + fillers)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_trunk(directory: str, seed: int = 0) -> str:
    """Write the tiny llama trunk and its tokenizer to ``directory`` (a loadable model path)."""
    trunk = tiny_trunk("llama", seed=seed)
    tok = char_tokenizer(trunk.config.vocab_size)
    trunk.config.eos_token_id = tok.eos_token_id
    trunk.config.pad_token_id = tok.pad_token_id
    trunk.generation_config.eos_token_id = tok.eos_token_id
    trunk.generation_config.pad_token_id = tok.pad_token_id
    trunk.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# The tiny recipe's prompts: the first 361 lines of the shipped prompts.txt, which tests/test_prompts_resource.py
# pins by checksum, so the tiny data set (and the pinned losses) do not move when the shipped file grows.
TINY_PROMPT_LINES = 361


def tiny_prompts(root: str) -> str:
    """Write the tiny recipe's prompt file under ``root`` (once) and return its path."""
    path = os.path.join(root, "tiny-prompts.txt")
    if not os.path.exists(path):
        shipped = os.path.join(REPO, "pdt_hf", "resources", "prompts.txt")
        with open(shipped, encoding="utf-8") as handle:
            lines = handle.read().splitlines()[:TINY_PROMPT_LINES]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
    return path


def tiny_overrides(root: str, trunk_dir: str) -> list[str]:
    """Overrides pointing the tiny recipe at ``trunk_dir``, its fixed prompts, and data/output dirs under ``root``."""
    return [
        f"model.name_or_path={trunk_dir}",
        f"data.build.source={tiny_prompts(root)}",
        f"data.path={os.path.join(root, 'data')}",
        f"train.output_dir={os.path.join(root, 'run')}",
    ]
