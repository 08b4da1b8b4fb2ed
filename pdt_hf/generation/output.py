"""``MultiStreamOutput``: what multi-stream ``generate`` returns, and its :class:`Telemetry`.

Throughput is reported three ways, over the same wall time (``timings["total"]``: prefill plus decoding, from
the decoder's start to its end; an outline pass that writes the plan comes before it and is not included):
committed tokens/s (what the answer holds), decoded tokens/s (every token the trunk wrote, rolled-back ones
included) and the rollback share (rolled-back tokens / decoded tokens, DESIGN.md's rollback rate).
"""

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
    """Seconds: prefill, decode (the rounds), total; first_token, first_commit; step times list under 'steps'."""
    decoded_tokens: int = 0
    """Tokens the trunk decoded, rolled-back ones included."""
    rolled_back_tokens: int = 0
    committed_tokens: int = 0
    """Tokens in the returned sequences (all streams)."""
    interrupted: bool = False
    selection: dict[str, Any] | None = None
    """Stream selection (``plan_candidates``): every candidate with its scores and why it was kept or dropped
    (``generation.select.Selection.to_dict``); None without selection."""
    step_path: str = "fast"
    """Which decode step ran: "fast" or "reference" (``pdt_hf.generation.step``)."""

    @property
    def rollback_rate(self) -> float:
        """Rollback share: rolled-back tokens / decoded tokens (0 when nothing was decoded)."""
        return self.rolled_back_tokens / self.decoded_tokens if self.decoded_tokens else 0.0

    def _per_second(self, tokens: int) -> float:
        seconds = self.timings.get("total", 0.0)
        return tokens / seconds if seconds > 0 else 0.0

    @property
    def committed_tokens_per_s(self) -> float:
        """Committed tokens / total seconds: the answer's throughput."""
        return self._per_second(self.committed_tokens)

    @property
    def decoded_tokens_per_s(self) -> float:
        """Decoded tokens (rolled-back ones included) / total seconds: the trunk's throughput."""
        return self._per_second(self.decoded_tokens)

    def summary(self) -> str:
        """One line: committed and decoded tokens/s and the rollback share, as ``pdt generate`` ends with."""
        seconds = self.timings.get("total", 0.0)
        return (
            f"{self.committed_tokens} committed tokens in {seconds:.1f}s: {self.committed_tokens_per_s:.1f} committed "
            f"tokens/s, {self.decoded_tokens_per_s:.1f} decoded tokens/s, rollback share "
            f"{100 * self.rollback_rate:.0f}% ({self.rolled_back_tokens} of {self.decoded_tokens} decoded tokens, "
            f"{len(self.rollbacks)} rollbacks)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "commits": self.commits,
            "rollbacks": self.rollbacks,
            "coverage": self.coverage,
            "notes_read": self.notes_read,
            "timings": self.timings,
            "decoded_tokens": self.decoded_tokens,
            "rolled_back_tokens": self.rolled_back_tokens,
            "committed_tokens": self.committed_tokens,
            "rollback_rate": self.rollback_rate,
            "committed_tokens_per_s": self.committed_tokens_per_s,
            "decoded_tokens_per_s": self.decoded_tokens_per_s,
            "interrupted": self.interrupted,
            "selection": self.selection,
            "step_path": self.step_path,
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
