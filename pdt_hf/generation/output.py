"""``MultiStreamOutput``: what multi-stream ``generate`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers.utils import ModelOutput


@dataclass
class Telemetry:
    """Per-round events and timings of one multi-stream generation."""

    commits: list[dict[str, Any]] = field(default_factory=list)
    """One entry per judged block: stream, round, tokens, score, committed, flagged, retry."""
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    """stream, round, tokens removed, retry."""
    coverage: list[float] = field(default_factory=list)
    """Per stream: coverage-head probability that its committed blocks cover its plan item (max over blocks)."""
    notes_read: list[int] = field(default_factory=list)
    """Per stream: total notes read over all decode steps."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: plan, prefill, decode, total; first_token; step times list under 'steps'."""
    decoded_tokens: int = 0
    rolled_back_tokens: int = 0
    interrupted: bool = False
    selection: dict[str, Any] | None = None
    """Stream selection (``plan_candidates``): every candidate with its scores and why it was kept or dropped
    (``generation.select.Selection.to_dict``); None without selection."""

    @property
    def rollback_rate(self) -> float:
        return self.rolled_back_tokens / self.decoded_tokens if self.decoded_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "commits": self.commits,
            "rollbacks": self.rollbacks,
            "coverage": self.coverage,
            "notes_read": self.notes_read,
            "timings": self.timings,
            "decoded_tokens": self.decoded_tokens,
            "rolled_back_tokens": self.rolled_back_tokens,
            "rollback_rate": self.rollback_rate,
            "interrupted": self.interrupted,
            "selection": self.selection,
        }


@dataclass
class MultiStreamOutput(ModelOutput):
    """``sequences``: per-stream committed token ids; ``texts``: per-stream text; ``answer``: sections
    assembled in plan order; ``plan``: the section prompts; ``telemetry``: :class:`Telemetry`."""

    sequences: list[list[int]] | None = None
    texts: list[str] | None = None
    answer: str | None = None
    plan: list[str] | None = None
    finish_reasons: list[str] | None = None
    telemetry: Telemetry | None = None
