"""Configuration of the small heads read off the trunk's hidden states."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HeadsConfig:
    """Notes, planner, coverage, agreement and speculation heads."""

    hidden_size: int = field(default=256, metadata={"help": "Width of the hidden layer inside each head's MLP."})

    def __post_init__(self) -> None:
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"heads.hidden_size must be a positive integer, got {self.hidden_size!r}; try 256.")
