"""Gated note cross-attention (SNC).

Design decisions:
- Queries come from the stream's hidden states, keys/values from notes; the
  attention itself goes through :mod:`pdt_kernels` (Triton on CUDA, PyTorch
  reference elsewhere), so a row that sees no notes gets an exact zero.
- The residual is ``h + tanh(alpha) * O(attn)`` with ``alpha = 0`` at init
  (torchtune's tanh gate): the delta is exactly zero at init, ``alpha`` still
  receives a gradient at step 0, and all projections start random so the path
  learns as soon as the gate opens.
- Note keys/values are a separate method (:meth:`project_notes`) so the note
  bus can compute them once at publish time and reads never recompute them.
"""

from __future__ import annotations

import pdt_kernels
import torch
from torch import nn

from ..norm import rms_norm
from .config import SNCConfig


class NoteCrossAttention(nn.Module):
    """``h + tanh(alpha) * O(attn(Q norm(h), K n, V n))`` over the notes a row may see."""

    def __init__(self, hidden_size: int, d_note: int, config: SNCConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim or max(1, d_note // config.num_heads)
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(d_note, inner, bias=False)
        self.v_proj = nn.Linear(d_note, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def project_notes(self, notes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of notes: ``[..., d_note]`` -> two ``[..., H, Dh]``."""
        notes = rms_norm(notes.to(self.k_proj.weight.dtype))
        shape = (*notes.shape[:-1], self.num_heads, self.head_dim)
        return self.k_proj(notes).view(shape), self.v_proj(notes).view(shape)

    def queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, T, d]`` -> ``[N, T, H, Dh]``."""
        q = self.q_proj(rms_norm(hidden.to(self.q_proj.weight.dtype)))
        return q.view(*hidden.shape[:-1], self.num_heads, self.head_dim)

    def output(self, attended: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[..., H, Dh]`` attention result -> gated ``[..., d]`` delta."""
        out = self.o_proj(attended.flatten(-2))
        return (torch.tanh(self.gate) * out).to(dtype)

    def delta_dense(
        self,
        hidden: torch.Tensor,
        notes: torch.Tensor,
        note_round: torch.Tensor,
        note_valid: torch.Tensor,
        query_round: torch.Tensor,
        lag: int,
    ) -> torch.Tensor:
        """Residual update when every row carries its own padded set of notes.

        Args:
            hidden: ``[N, T, d]``; notes: ``[N, M, d_note]``; note_round/note_valid: ``[N, M]``;
            query_round: ``[N, T]`` block round of each token. Token t sees note m iff
            ``note_valid[m]`` and ``note_round[m] <= query_round[t] - lag``.
        Returns:
            ``[N, T, d]``.
        """
        q = self.queries(hidden).transpose(1, 2)  # [N, H, T, Dh]
        k, v = self.project_notes(notes)  # [N, M, H, Dh]
        attn = pdt_kernels.note_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), query_round, note_round, note_valid, lag
        )  # [N, H, T, Dh]
        return self.output(attn.transpose(1, 2), hidden.dtype)

    def delta_packed(
        self,
        hidden: torch.Tensor,
        k_store: torch.Tensor,
        v_store: torch.Tensor,
        indices: torch.Tensor,
        offsets: torch.Tensor,
    ) -> torch.Tensor:
        """Residual update reading precomputed note keys/values from the bus.

        Args:
            hidden: ``[N, T, d]``; k_store/v_store: ``[C, H, Dh]``; indices: ``[nnz]``;
            offsets: ``[N * T + 1]`` CSR rows, one per (row, token).
        Returns:
            ``[N, T, d]``.
        """
        n, t, _ = hidden.shape
        q = self.queries(hidden).reshape(n * t, self.num_heads, self.head_dim)  # [N*T, H, Dh]
        attn = pdt_kernels.note_attention_decode(q, k_store, v_store, indices, offsets)  # [N*T, H, Dh]
        return self.output(attn.view(n, t, self.num_heads, self.head_dim), hidden.dtype)
