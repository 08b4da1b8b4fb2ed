"""Per-call context read by the sidecar hooks: which stream each row is, and which notes it sees.

Design decision: the context is stored on the sidecar when a forward starts
and is *not* popped when it ends. A checkpointing wrapper that recomputes a
layer during backward therefore runs the hooks with the same stream ids and
notes as the original forward (the reference implementation popped it and
recomputed without notes). The next forward replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# Round given to notes that every reader may always see (snapshot 0 in the kernels' ``round <= q - lag`` form).
ALWAYS_VISIBLE_ROUND = -(2**40)
# Query round that sees every (valid) note.
SEES_ALL_ROUND = 2**40


@dataclass
class DenseNotes:
    """Each row carries its own padded notes (training, tests).

    ``notes`` ``[N, M, d_note]``; ``note_round``/``note_valid`` ``[N, M]``; ``query_round`` ``[N, T]`` or None
    (every valid note visible to every token). Token t sees note m iff
    ``note_valid[m] and note_round[m] <= query_round[t] - lag``.
    """

    notes: torch.Tensor
    note_round: torch.Tensor | None = None
    note_valid: torch.Tensor | None = None
    query_round: torch.Tensor | None = None
    lag: int = 0

    def resolved(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(note_round [N, M], note_valid [N, M], query_round [N, T])`` with defaults filled in."""
        n, m, _ = self.notes.shape
        device = self.notes.device
        note_round = self.note_round
        if note_round is None:
            note_round = torch.full((n, m), ALWAYS_VISIBLE_ROUND, dtype=torch.long, device=device)
        note_valid = self.note_valid
        if note_valid is None:
            note_valid = torch.ones(n, m, dtype=torch.bool, device=device)
        query_round = self.query_round
        if query_round is None:
            query_round = torch.full((n, num_tokens), SEES_ALL_ROUND, dtype=torch.long, device=device)
        return note_round, note_valid, query_round


class NoteStore(Protocol):
    def layer_kv(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class PackedNotes:
    """Notes read from the bus: precomputed per-layer K/V plus CSR rows, one per (row, token)."""

    store: NoteStore
    indices: torch.Tensor
    offsets: torch.Tensor


@dataclass
class SidecarContext:
    """``stream_ids`` ``[N]``, the notes the rows may read (None: no notes, SNC skipped), and an optional
    ``token_mask`` ``[N, T]``: sidecar deltas apply only where it is true (the shared prompt prefix is read by
    the bare trunk, in training as in decoding)."""

    stream_ids: torch.Tensor
    notes: DenseNotes | PackedNotes | None = None
    token_mask: torch.Tensor | None = None
