"""The per-call settings of a multi-stream decode: the DESIGN.md symbols plus the switches of baselines and ablations."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DecodeSettings"]


@dataclass
class DecodeSettings:
    """Per-call values of the DESIGN.md symbols plus switches used by baselines and ablations."""

    num_streams: int
    block_size: int
    commit_horizon: int
    note_lag: int
    note_window: int
    agreement_threshold: float
    max_retries: int
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    use_notes: bool = True
    """False: SNC reads nothing (the bus is still kept for the heads)."""
    note_ablation: str | None = None
    """None, "zero" (published notes are zeros) or "shuffle" (notes of one round permuted across streams)."""
    rollback: bool = True
    """False: every block commits (same as tau = 0)."""
    fast_attention: bool | None = None
    """Cascade decode attention reading the prefix once (None: on CUDA, for trunks without sliding layers or
    soft-capped attention)."""
    speculate: str | None = None
    """Speculative decoding: the proposer's name ("prompt-lookup", "draft", ...), or None (one token per step)."""
    num_speculative_tokens: int = 0
    """n, the most draft tokens a stream proposes per forward."""
    synthesis_max_new_tokens: int = 0
    """Most tokens of the synthesis stream (used when ``run`` is given its prompt)."""

    _FROM_CONFIG = (
        "num_streams",
        "block_size",
        "commit_horizon",
        "note_lag",
        "note_window",
        "agreement_threshold",
        "max_retries",
    )
    """The fields that default to the sidecar config's value of the same name."""

    @classmethod
    def from_config(cls, config, max_new_tokens: int, **overrides) -> DecodeSettings:
        """The sidecar config's values of the DESIGN.md symbols; ``overrides`` that are None keep the config's."""
        values = {name: getattr(config, name) for name in cls._FROM_CONFIG}
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(max_new_tokens=max_new_tokens, **values)
