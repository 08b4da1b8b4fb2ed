"""Per-stream bottleneck adapters.

Design decisions:
- Each stream owns its own ``down``/``up`` matrices, stored stacked as
  ``[S, d, r]`` / ``[S, r, d]`` so one batched forward serves rows of different
  streams: weights are gathered by ``stream_ids`` and applied with ``bmm``.
- ``up`` starts at exactly zero (LoRA's choice), so the residual delta is
  exactly zero at init while gradients still reach ``up`` at step 0.
- ``g_a`` is a plain per-stream scale starting at 1, so opening the path needs
  only non-zero ``up`` weights.
- The synthesis (combiner) stream has its own slot, index ``num_streams``, held in
  separate ``synthesis_*`` parameters ``[1, ...]`` rather than in the stacked ones:
  a sidecar saved without the slot keeps its exact state-dict layout, and training
  the slot alone leaves the section slots' tensors byte-identical (they are other
  parameters, never touched by its optimizer). ``stacked()`` concatenates the two,
  so rows of stream ``num_streams`` gather the slot like any other stream. The slot draws its
  ``down`` init under a forked RNG, so a sidecar built with the slot equals, tensor for tensor, the one built
  without it from the same seed, plus the slot::

      slot      0 .. K-1            K
      tensors   norm_weight [K, d]  synthesis_norm_weight [1, d]
                down [K, d, r]      synthesis_down [1, d, r]
                up [K, r, d] (0)    synthesis_up [1, r, d] (0)
                gate [K] (1)        synthesis_gate [1] (1)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..norm import rms_norm
from .config import AdapterConfig

_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}


class StreamAdapter(nn.Module):
    """``h + g_a[s] * up[s](act(down[s](norm_s(h))))`` for every row's stream ``s``."""

    def __init__(self, hidden_size: int, num_streams: int, config: AdapterConfig, synthesis: bool = False) -> None:
        super().__init__()
        self.activation = config.activation
        self.num_streams = num_streams
        self.norm_weight = nn.Parameter(torch.ones(num_streams, hidden_size))
        self.down = nn.Parameter(torch.empty(num_streams, hidden_size, config.rank))
        self.up = nn.Parameter(torch.zeros(num_streams, config.rank, hidden_size))
        self.gate = nn.Parameter(torch.ones(num_streams))
        nn.init.kaiming_uniform_(self.down.view(-1, config.rank), a=math.sqrt(5))
        self.has_synthesis = bool(synthesis)
        if self.has_synthesis:
            self.synthesis_norm_weight = nn.Parameter(torch.ones(1, hidden_size))
            self.synthesis_down = nn.Parameter(torch.empty(1, hidden_size, config.rank))
            self.synthesis_up = nn.Parameter(torch.zeros(1, config.rank, hidden_size))
            self.synthesis_gate = nn.Parameter(torch.ones(1))
            with torch.random.fork_rng(devices=[]):  # the slot's draws leave the rest of the sidecar's init as is
                nn.init.kaiming_uniform_(self.synthesis_down.view(-1, config.rank), a=math.sqrt(5))

    @property
    def num_slots(self) -> int:
        """Adapter slots: K, plus one for the synthesis stream when the sidecar has it."""
        return self.num_streams + int(self.has_synthesis)

    def synthesis_parameters(self) -> list[nn.Parameter]:
        """The synthesis slot's own parameters (empty without the slot)."""
        if not self.has_synthesis:
            return []
        return [self.synthesis_norm_weight, self.synthesis_down, self.synthesis_up, self.synthesis_gate]

    def section_parameters(self) -> list[nn.Parameter]:
        """The K section slots' parameters (the ``adapters`` family)."""
        return [self.norm_weight, self.down, self.up, self.gate]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(norm_weight [S, d], down [S, d, r], up [S, r, d], gate [S])`` over all S = ``num_slots`` slots."""
        if not self.has_synthesis:
            return self.norm_weight, self.down, self.up, self.gate
        return (
            torch.cat([self.norm_weight, self.synthesis_norm_weight]),
            torch.cat([self.down, self.synthesis_down]),
            torch.cat([self.up, self.synthesis_up]),
            torch.cat([self.gate, self.synthesis_gate]),
        )

    def delta(self, hidden: torch.Tensor, stream_ids: torch.Tensor) -> torch.Tensor:
        """Residual update.

        Args:
            hidden: ``[N, T, d]`` output of a decoder layer.
            stream_ids: ``[N]`` stream index of each row (``num_streams``: the synthesis slot).
        Returns:
            ``[N, T, d]`` delta, exactly zero at init.
        """
        dtype = self.down.dtype
        norm_weight, down, up, gate = self.stacked()  # no test of which ids are present: that would sync a GPU
        x = rms_norm(hidden.to(dtype)) * norm_weight[stream_ids].unsqueeze(1)  # [N, T, d]
        z = _ACTIVATIONS[self.activation](torch.bmm(x, down[stream_ids]))  # [N, T, r]
        out = torch.bmm(z, up[stream_ids])  # [N, T, d]
        return (out * gate[stream_ids].view(-1, 1, 1)).to(hidden.dtype)
