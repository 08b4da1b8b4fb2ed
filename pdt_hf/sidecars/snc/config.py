"""Configuration of the gated note cross-attention (SNC)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SNCConfig:
    """Gated cross-attention from stream hidden states to visible notes, ``h + g_s * O(attn(Qh, Kn, Vn))``."""

    num_heads: int = field(default=4, metadata={"help": "Attention heads of each SNC layer."})
    head_dim: int | None = field(
        default=None, metadata={"help": "Width of one SNC head; None means d_note // num_heads."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"snc.num_heads must be a positive integer, got {self.num_heads!r}; try 4.")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ValueError(f"snc.head_dim must be a positive integer or None, got {self.head_dim!r}.")
