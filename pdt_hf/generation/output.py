"""``MultiStreamOutput``: what multi-stream ``generate`` returns, and its :class:`Telemetry`.

Throughput is reported three ways, over the same wall time (``timings["total"]``: prefill plus decoding, from
the decoder's start to its end; an outline pass that writes the plan comes before it and is not included):
committed tokens/s (what the answer holds), decoded tokens/s (every token the trunk wrote, rolled-back ones
included) and the rollback share (rolled-back tokens / decoded tokens, DESIGN.md's rollback rate).

Speculative decoding (``generate(speculate=...)``) is counted in draft tokens proposed and accepted and in decode
forwards: ``forwards`` batched forwards after the prefill, ``stream_forwards`` the streams in them summed, so
``tokens_per_forward`` (decoded tokens / stream forwards) is exactly 1 without drafts and 1 + the accepted drafts
per stream forward with them.
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
    speculate: str | None = None
    """Speculative decoding: "prompt-lookup", "draft", a custom proposer's class name, or None (off)."""
    num_speculative_tokens: int = 0
    """n, the most draft tokens a stream proposes per forward (0 when off)."""
    draft_tokens: int = 0
    """Draft tokens proposed (all streams)."""
    accepted_draft_tokens: int = 0
    """Draft tokens the trunk's verification accepted (each also counts in ``decoded_tokens``)."""
    forwards: int = 0
    """Batched decode forwards (one-token steps and verify forwards; prefills excluded)."""
    stream_forwards: int = 0
    """Streams per decode forward, summed over forwards (K per forward while all K streams run)."""
    synthesis_tokens: int = 0
    """Tokens the synthesis stream wrote (``generate(synthesis=True)``; 0 without it); not in ``committed_tokens``."""
    synthesis_notes_read: int = 0
    """Notes the synthesis stream read (every note of every stream); 0 without synthesis."""

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when none were proposed)."""
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Decoded tokens per stream per decode forward: 1 without drafts (0 when nothing was decoded)."""
        return self.decoded_tokens / self.stream_forwards if self.stream_forwards else 0.0

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
        """One line: committed and decoded tokens/s and the rollback share (and drafts), as ``pdt generate`` ends."""
        seconds = self.timings.get("total", 0.0)
        line = (
            f"{self.committed_tokens} committed tokens in {seconds:.1f}s: {self.committed_tokens_per_s:.1f} committed "
            f"tokens/s, {self.decoded_tokens_per_s:.1f} decoded tokens/s, rollback share "
            f"{100 * self.rollback_rate:.0f}% ({self.rolled_back_tokens} of {self.decoded_tokens} decoded tokens, "
            f"{len(self.rollbacks)} rollbacks)"
        )
        if self.synthesis_tokens:
            line += f"; synthesis {self.synthesis_tokens} tokens reading {self.synthesis_notes_read} notes"
        if self.speculate is not None:
            line += (
                f"; {self.speculate} drafts: {self.accepted_draft_tokens} of {self.draft_tokens} accepted "
                f"({100 * self.acceptance_rate:.0f}%), {self.tokens_per_forward:.2f} tokens per stream forward"
            )
        return line

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
            "speculate": self.speculate,
            "num_speculative_tokens": self.num_speculative_tokens,
            "draft_tokens": self.draft_tokens,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "acceptance_rate": self.acceptance_rate,
            "forwards": self.forwards,
            "stream_forwards": self.stream_forwards,
            "tokens_per_forward": self.tokens_per_forward,
            "synthesis_tokens": self.synthesis_tokens,
            "synthesis_notes_read": self.synthesis_notes_read,
        }


@dataclass
class MultiStreamOutput(ModelOutput):
    """``sequences``: per-stream committed token ids; ``texts``: per-stream text; ``answer``: sections
    assembled in plan order (then the synthesis, if any); ``plan``: the section prompts; ``telemetry``:
    :class:`Telemetry`; ``synthesis_ids`` / ``synthesis`` / ``synthesis_finish_reason``: what the synthesis
    stream wrote (``generate(synthesis=True)``), None without it."""

    sequences: list[list[int]] | None = None
    texts: list[str] | None = None
    answer: str | None = None
    plan: list[str] | None = None
    finish_reasons: list[str] | None = None
    telemetry: Telemetry | None = None
    synthesis_ids: list[int] | None = None
    synthesis: str | None = None
    synthesis_finish_reason: str | None = None
