"""Configuration of the per-stream bottleneck adapters."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdapterConfig:
    """Per-stream adapter ``h + g_a * up(act(down(norm(h))))``."""

    rank: int = field(default=16, metadata={"help": "Bottleneck width of each stream's adapter."})
    activation: str = field(default="gelu", metadata={"help": "Activation between down and up: gelu, silu or relu."})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter.rank must be a positive integer, got {self.rank!r}; try 16.")
        if self.activation not in ("gelu", "silu", "relu"):
            raise ValueError(f"adapter.activation {self.activation!r} is unknown; use 'gelu', 'silu' or 'relu'.")
