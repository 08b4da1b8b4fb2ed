"""Next-token choice for each stream: logits processors, stopping criteria and seeded sampling.

Processors are applied per stream with that stream's own token history
(``[1, len]``), because streams have different lengths; the same
``LogitsProcessorList`` objects users pass to ``generate`` work unchanged.

The speculative acceptance rule for a draft that is a point mass (prompt lookup, a greedy draft model) lives
here too, next to the sampling it must leave unchanged: with p the processed next-token distribution, draft
token t is accepted with probability p(t) (``accept_draft``); on rejection the next token is drawn from the
residual, p with t removed and renormalised (``residual_scores``: t's score set to -inf before the softmax).
Accept-or-residual then gives token x with probability p(t)[x = t] + (1 - p(t)) p(x) / (1 - p(t)) [x != t]
= p(x): sampling with drafts writes what sampling without them would, in distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def accept_draft(probs: torch.Tensor, token: int, uniform: float | torch.Tensor) -> bool:
    """Point-mass draft rule: accept ``token`` iff ``uniform < probs[token]``, ``probs`` ``[V]``, uniform in [0, 1).

    For ``uniform`` drawn from U[0, 1) this accepts with probability exactly ``probs[token]``.
    """
    return bool(uniform < probs[token])


def residual_scores(scores: torch.Tensor, token: int) -> torch.Tensor:
    """Scores ``[..., V]`` whose softmax is the residual of a rejected point-mass draft ``token`` (a copy).

    ``softmax(residual_scores(s, t)) = p with p(t) set to 0, renormalised``, where ``p = softmax(s)``.
    """
    out = scores.clone()
    out[..., token] = float("-inf")
    return out


@dataclass
class SamplingSettings:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logits_processor: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    stopping_criteria: StoppingCriteriaList = field(default_factory=StoppingCriteriaList)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")


class TokenChooser:
    """Applies processors and picks the next token of one stream."""

    def __init__(self, settings: SamplingSettings, device: torch.device) -> None:
        self.settings = settings
        processors = LogitsProcessorList(list(settings.logits_processor))
        if settings.do_sample:
            if settings.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k:
                processors.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                processors.append(TopPLogitsWarper(settings.top_p))
        self.processors = processors
        self.generator = torch.Generator(device=device)
        if settings.seed is not None:
            self.generator.manual_seed(settings.seed)
        else:
            self.generator.seed()

    def scores(self, history: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Processed scores ``[1, V]`` of next-token ``logits`` ``[V]`` after ``history`` ``[1, len]``."""
        return self.processors(history, logits.float().unsqueeze(0)) if self.processors else logits.float()[None]

    def choose(
        self, history: torch.Tensor, logits: torch.Tensor, banned: int | None = None
    ) -> tuple[int, torch.Tensor]:
        """``history`` ``[1, len]``, ``logits`` ``[V]`` -> (token, processed scores ``[1, V]``).

        ``banned``: a rejected draft token; sampling then draws from the residual (``residual_scores``).
        """
        scores = self.scores(history, logits)
        if self.settings.do_sample:
            probs = torch.softmax(scores if banned is None else residual_scores(scores, banned), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        else:
            token = int(scores.argmax(dim=-1))
        return token, scores

    def should_stop(self, history: torch.Tensor, scores: torch.Tensor) -> bool:
        if not self.settings.stopping_criteria:
            return False
        return bool(self.settings.stopping_criteria(history, scores).any())
