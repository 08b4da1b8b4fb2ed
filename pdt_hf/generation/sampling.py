"""Next-token choice for each stream: logits processors, stopping criteria and seeded sampling.

Processors are applied per stream with that stream's own token history
(``[1, len]``), because streams have different lengths; the same
``LogitsProcessorList`` objects users pass to ``generate`` work unchanged.
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

    def choose(self, history: torch.Tensor, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """``history`` ``[1, len]``, ``logits`` ``[V]`` -> (token, processed scores ``[1, V]``)."""
        scores = self.processors(history, logits.float().unsqueeze(0)) if self.processors else logits.float()[None]
        if self.settings.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        else:
            token = int(scores.argmax(dim=-1))
        return token, scores

    def should_stop(self, history: torch.Tensor, scores: torch.Tensor) -> bool:
        if not self.settings.stopping_criteria:
            return False
        return bool(self.settings.stopping_criteria(history, scores).any())
