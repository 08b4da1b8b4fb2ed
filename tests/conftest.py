"""Shared fixtures: tiny random trunks built from configs (never downloaded).

Tiny sizes (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 128) stand in for
the real ones, e.g. SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads,
vocab 49152; Qwen2.5-7B: 28 layers, hidden 3584, 28 heads, 4 KV heads, vocab 152064.
Type-specific values keep their real meaning at tiny scale: Phi-3-mini (32 layers,
hidden 3072, window 2047); Gemma-2-2B (26 layers, hidden 2304, window 4096, logit
soft-cap 30, attention soft-cap 50); Gemma-3-1B (26 layers, hidden 1152, window 512,
5 sliding layers per full one); OLMo-2-1B (16 layers, hidden 2048); Granite-3.0-2B
(40 layers, hidden 2048, logits_scaling 8); StableLM-2-1.6B (24 layers, hidden 2048,
partial rotary 0.25). Windows are 16 here, so the tests' prompts exceed them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")  # transformers >= 5.25 turns Hub kernels on in from_pretrained

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=16),
    "gpt_oss": lambda: transformers.GptOssConfig(
        **{**TINY, "intermediate_size": 64}, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16
    ),
    "phi3": lambda: transformers.Phi3Config(**TINY, sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": lambda: transformers.Gemma2Config(
        **TINY, head_dim=16, sliding_window=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **TINY,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0,
    ),
    "olmo2": lambda: transformers.Olmo2Config(**TINY, pad_token_id=0, eos_token_id=2),
    "granite": lambda: transformers.GraniteConfig(
        **TINY, logits_scaling=8.0, embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625
    ),
    "stablelm": lambda: transformers.StableLmConfig(**TINY, partial_rotary_factor=0.25),
}
EAGER_TYPES = {"gpt_oss", "gemma2", "gemma3"}
"""Types built with eager attention: gpt_oss has no sdpa path in transformers 5.x; sdpa cannot soft-cap
attention scores, and Gemma recommends eager."""


def tiny_trunk(model_type: str = "llama", seed: int = 0, **overrides: object) -> transformers.PreTrainedModel:
    """A randomly initialised 2-layer trunk of ``model_type`` in fp32, eval mode."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    for key, value in overrides.items():
        setattr(config, key, value)
    attn = "eager" if model_type in EAGER_TYPES else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.eval()


@pytest.fixture
def llama_trunk() -> transformers.PreTrainedModel:
    return tiny_trunk("llama")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


def tiny_tokenizer():
    """A character-level tokenizer (100 ids, fits the tiny trunks' vocab of 128) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    vocab["\n"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()
