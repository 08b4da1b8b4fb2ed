"""Heads read off the trunk's last hidden states.

- ``NotesHead``: block summary ``[N, T, d]`` + mask -> note ``[N, d_note]``.
- ``PlannerHead``: pooled prompt+plan-item state and stream id -> snapshot-0 note.
- ``CoverageHead``: block note vs plan-item notes -> logits ``[N, P]``.
- ``AgreementHead``: pooled block state, visible-notes summary, coverage and
  provisional note -> logit (score = sigmoid(logit) in [0, 1]).
- ``SpeculationHead``: a note -> the predicted note of the next block.

All heads are small two-layer MLPs; none of them touches the residual stream,
so they cannot break the identity of the trunk at init.
"""

from __future__ import annotations

import torch
from torch import nn

from ..norm import rms_norm
from .config import HeadsConfig


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over T of ``[N, T, d]`` where ``mask`` ``[N, T]`` is true; all-false rows give zeros."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [N, T, 1]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class NotesHead(nn.Module):
    def __init__(self, hidden_size: int, d_note: int, config: HeadsConfig) -> None:
        super().__init__()
        self.mlp = _mlp(hidden_size, config.hidden_size, d_note)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, T, d]``, ``[N, T]`` -> ``[N, d_note]``."""
        return self.mlp(rms_norm(masked_mean(hidden, mask).to(self.mlp[0].weight.dtype)))


class PlannerHead(nn.Module):
    def __init__(self, hidden_size: int, d_note: int, num_streams: int, config: HeadsConfig) -> None:
        super().__init__()
        self.stream_embedding = nn.Embedding(num_streams, hidden_size)
        nn.init.normal_(self.stream_embedding.weight, std=0.02)
        self.mlp = _mlp(hidden_size, config.hidden_size, d_note)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, stream_ids: torch.Tensor) -> torch.Tensor:
        """Pooled ``[N, T, d]`` state of prompt + stream's plan item, ``[N]`` ids -> ``[N, d_note]``."""
        pooled = rms_norm(masked_mean(hidden, mask).to(self.mlp[0].weight.dtype))
        return self.mlp(pooled + self.stream_embedding(stream_ids))


class CoverageHead(nn.Module):
    def __init__(self, d_note: int, config: HeadsConfig) -> None:
        super().__init__()
        self.block = nn.Linear(d_note, config.hidden_size)
        self.item = nn.Linear(d_note, config.hidden_size)
        self.bias = nn.Parameter(torch.zeros(()))
        self.scale = config.hidden_size**-0.5

    def forward(self, block_note: torch.Tensor, plan_notes: torch.Tensor) -> torch.Tensor:
        """``[N, d_note]`` block note vs ``[N, P, d_note]`` plan-item notes -> logits ``[N, P]``."""
        b = self.block(rms_norm(block_note)).unsqueeze(1)  # [N, 1, h]
        p = self.item(rms_norm(plan_notes))  # [N, P, h]
        return (b * p).sum(-1) * self.scale + self.bias


class AgreementHead(nn.Module):
    def __init__(self, hidden_size: int, d_note: int, config: HeadsConfig) -> None:
        super().__init__()
        self.mlp = _mlp(hidden_size + 2 * d_note + 1, config.hidden_size, 1)

    def forward(
        self,
        block_state: torch.Tensor,
        notes_summary: torch.Tensor,
        coverage: torch.Tensor,
        provisional_note: torch.Tensor,
    ) -> torch.Tensor:
        """Features ``[N, d]``, ``[N, d_note]``, ``[N]``, ``[N, d_note]`` -> logit ``[N]``."""
        return self.mlp[-1](self.hidden(block_state, notes_summary, coverage, provisional_note)).squeeze(-1)

    def hidden(
        self,
        block_state: torch.Tensor,
        notes_summary: torch.Tensor,
        coverage: torch.Tensor,
        provisional_note: torch.Tensor,
    ) -> torch.Tensor:
        """The activations the output layer reads, ``[N, hidden]`` (``calibrate-rollback --fit-head`` refits it)."""
        dtype = self.mlp[0].weight.dtype
        features = torch.cat(
            [
                rms_norm(block_state.to(dtype)),
                notes_summary.to(dtype),
                coverage.to(dtype).unsqueeze(-1),
                provisional_note.to(dtype),
            ],
            dim=-1,
        )  # [N, d + 2 d_note + 1]
        return self.mlp[:-1](features)


class SpeculationHead(nn.Module):
    def __init__(self, d_note: int, config: HeadsConfig) -> None:
        super().__init__()
        self.mlp = _mlp(d_note, config.hidden_size, d_note)

    def forward(self, note: torch.Tensor) -> torch.Tensor:
        """``[N, d_note]`` -> predicted next-block note ``[N, d_note]``."""
        return note + self.mlp(rms_norm(note))


class PDTHeads(nn.Module):
    """The five heads as one module (``sidecar.heads.notes`` etc.)."""

    def __init__(self, hidden_size: int, d_note: int, num_streams: int, config: HeadsConfig) -> None:
        super().__init__()
        self.notes = NotesHead(hidden_size, d_note, config)
        self.planner = PlannerHead(hidden_size, d_note, num_streams, config)
        self.coverage = CoverageHead(d_note, config)
        self.agreement = AgreementHead(hidden_size, d_note, config)
        self.speculation = SpeculationHead(d_note, config)
