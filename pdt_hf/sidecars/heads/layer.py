"""Heads read off the trunk's last hidden states.

- ``NotesHead``: block states ``[N, T, d]`` + mask -> the block's M published notes ``[N, M, d_note]``
  (``publish``, one per chunk of its tokens) and their mean, the block note ``[N, d_note]`` (``forward``).
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


def chunk_means(hidden: torch.Tensor, member: torch.Tensor, chunks: int) -> torch.Tensor:
    """Means of ``chunks`` consecutive, equal chunks of each group's tokens: ``[N, T, d]``, ``[N, T, G]`` -> ``[N, G, M, d]``.

    ``member[n, t, g]`` says token t belongs to group g (a block). The i-th of a group's n tokens goes to chunk
    ``i * M // n``, so chunk sizes differ by at most one; a chunk left empty (a group shorter than M) takes the
    whole group's mean, and an empty group gives zeros. With M = 1 this is the group's masked mean.
    """
    w = member.to(hidden.dtype)  # [N, T, G]
    count = w.sum(1, keepdim=True)  # [N, 1, G]
    rank = w.cumsum(1) - 1.0
    index = torch.div(rank * chunks, count.clamp(min=1.0), rounding_mode="floor").long().clamp(0, chunks - 1)
    weights = w.unsqueeze(-1) * nn.functional.one_hot(index, chunks).to(hidden.dtype)  # [N, T, G, M]
    sums = torch.einsum("ntgm,ntd->ngmd", weights, hidden)
    sizes = weights.sum(1).unsqueeze(-1)  # [N, G, M, 1]
    whole = torch.einsum("ntg,ntd->ngd", w, hidden) / count.transpose(1, 2).clamp(min=1.0)  # [N, G, d]
    return torch.where(sizes > 0, sums / sizes.clamp(min=1.0), whole.unsqueeze(2))


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class NotesHead(nn.Module):
    """The notes a block publishes: the MLP on the mean state of each of M chunks of its tokens (M =
    ``notes_per_block``; M = 1 is one note of the whole block). ``forward`` is their mean, the block note the
    coverage, agreement and speculation heads and the alignment loss read."""

    def __init__(self, hidden_size: int, d_note: int, config: HeadsConfig, notes_per_block: int = 1) -> None:
        super().__init__()
        self.mlp = _mlp(hidden_size, config.hidden_size, d_note)
        self.notes_per_block = notes_per_block

    def from_states(self, states: torch.Tensor) -> torch.Tensor:
        """Pooled states ``[..., d]`` -> notes ``[..., d_note]``."""
        return self.mlp(rms_norm(states.to(self.mlp[0].weight.dtype)))

    def publish(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, T, d]``, ``[N, T]`` -> the block's published notes ``[N, M, d_note]``."""
        if self.notes_per_block == 1:  # the decode hot path's default: one masked mean, no chunk bookkeeping
            return self.from_states(masked_mean(hidden, mask)).unsqueeze(1)
        member = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None else mask
        return self.from_states(chunk_means(hidden, member.unsqueeze(-1), self.notes_per_block).squeeze(1))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, T, d]``, ``[N, T]`` -> the block note ``[N, d_note]`` (the mean of the published notes)."""
        return self.publish(hidden, mask).mean(1)


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

    def __init__(
        self, hidden_size: int, d_note: int, num_streams: int, config: HeadsConfig, notes_per_block: int = 1
    ) -> None:
        super().__init__()
        self.notes = NotesHead(hidden_size, d_note, config, notes_per_block)
        self.planner = PlannerHead(hidden_size, d_note, num_streams, config)
        self.coverage = CoverageHead(d_note, config)
        self.agreement = AgreementHead(hidden_size, d_note, config)
        self.speculation = SpeculationHead(d_note, config)
