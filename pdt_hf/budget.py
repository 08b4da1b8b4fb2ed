"""Sidecar parameter budget: counts and share of the trunk (DESIGN.md: under 5% by default).

Trunks can be built on the ``meta`` device from a config, so the budget of a
7B-sized trunk is computed without allocating its weights.
"""

from __future__ import annotations

import torch
import transformers
from rich.console import Console
from rich.table import Table

from .config import PDTConfig
from .modeling import PDTForCausalLM, parameter_budget

# Published sizes of Qwen2.5-7B (config.json of Qwen/Qwen2.5-7B-Instruct).
QWEN25_7B = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
)
# Published sizes of SmolLM2-135M (config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)
META_TRUNKS = {
    "smollm2-135m": lambda: transformers.LlamaConfig(**SMOLLM2_135M),
    "qwen2.5-7b": lambda: transformers.Qwen2Config(**QWEN25_7B),
}


def meta_budget(name: str, config: PDTConfig | None = None) -> dict[str, float]:
    """Budget of the default (or given) sidecar on a trunk of a known size, built on the meta device."""
    if name not in META_TRUNKS:
        raise ValueError(f"unknown trunk size {name!r}; known: {sorted(META_TRUNKS)}.")
    with torch.device("meta"):
        trunk = transformers.AutoModelForCausalLM.from_config(META_TRUNKS[name]())
        model = PDTForCausalLM(trunk, config)
    return parameter_budget(model.sidecar, model.trunk)


def print_budget(rows: dict[str, dict[str, float]], console: Console | None = None) -> None:
    table = Table(title="PDT sidecar budget")
    for col in ("trunk", "trunk params", "sidecar params", "adapters", "snc", "heads", "share"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, b in rows.items():
        table.add_row(
            name,
            f"{b['trunk']:,}",
            f"{b['sidecar']:,}",
            f"{b['adapters']:,}",
            f"{b['snc']:,}",
            f"{b['heads']:,}",
            f"{100 * b['share']:.2f}%",
        )
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(table)
