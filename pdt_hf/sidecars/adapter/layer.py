"""Per-stream bottleneck adapters.

Design decisions:
- Each stream owns its own ``down``/``up`` matrices, stored stacked as
  ``[S, d, r]`` / ``[S, r, d]`` so one batched forward serves rows of different
  streams: weights are gathered by ``stream_ids`` and applied with ``bmm``.
- ``up`` starts at exactly zero (LoRA's choice), so the residual delta is
  exactly zero at init while gradients still reach ``up`` at step 0.
- ``g_a`` is a plain per-stream scale starting at 1, so opening the path needs
  only non-zero ``up`` weights.
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

    def __init__(self, hidden_size: int, num_streams: int, config: AdapterConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.norm_weight = nn.Parameter(torch.ones(num_streams, hidden_size))
        self.down = nn.Parameter(torch.empty(num_streams, hidden_size, config.rank))
        self.up = nn.Parameter(torch.zeros(num_streams, config.rank, hidden_size))
        self.gate = nn.Parameter(torch.ones(num_streams))
        nn.init.kaiming_uniform_(self.down.view(-1, config.rank), a=math.sqrt(5))

    def delta(self, hidden: torch.Tensor, stream_ids: torch.Tensor) -> torch.Tensor:
        """Residual update.

        Args:
            hidden: ``[N, T, d]`` output of a decoder layer.
            stream_ids: ``[N]`` stream index of each row.
        Returns:
            ``[N, T, d]`` delta, exactly zero at init.
        """
        dtype = self.down.dtype
        x = rms_norm(hidden.to(dtype)) * self.norm_weight[stream_ids].unsqueeze(1)  # [N, T, d]
        z = _ACTIVATIONS[self.activation](torch.bmm(x, self.down[stream_ids]))  # [N, T, r]
        out = torch.bmm(z, self.up[stream_ids])  # [N, T, d]
        return (out * self.gate[stream_ids].view(-1, 1, 1)).to(hidden.dtype)
