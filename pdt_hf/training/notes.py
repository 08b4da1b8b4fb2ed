"""Assembling the notes each training row may read, in the same visibility rule as decoding.

Each example has, per stream j, one planner note (snapshot 0, always visible) and M = ``notes_per_block``
notes per block r (published at the end of round r; M = 1 below). Row ``n = e * K + k`` carries all of
example e's notes as a padded list and the rule of :class:`~pdt_hf.sidecars.context.DenseNotes` does the
rest: token t of the row sees note m iff it is valid, comes from a sibling (``j != k`` unless
``read_own_notes``) and ``note_round <= query_round[t] - lag``. Layout for K = 2, R = 2 (K * (1 + R) = 6
notes per row)::

    note slot m       0        1    2    3        4    5
    source stream     0        0    0    1        1    1
    note round      ALWAYS     1    2  ALWAYS     1    2
    row k = 0 sees    -        -    -    y      r>=1+Δ r>=2+Δ   (own notes hidden)

A row reads at most ``(K - 1) * (1 + R M)`` notes; :func:`check_window` rejects data whose rounds would make
that exceed the note window W (training applies no window, so it must never bind).
"""

from __future__ import annotations

import torch

from ..sidecars.context import ALWAYS_VISIBLE_ROUND, DenseNotes

__all__ = ["ablate_block_notes", "check_window", "row_notes", "visible_summary"]


def row_notes(
    planner: torch.Tensor,
    blocks: torch.Tensor,
    block_valid: torch.Tensor,
    example_index: torch.Tensor,
    stream_ids: torch.Tensor,
    query_round: torch.Tensor,
    lag: int,
    read_own: bool,
) -> DenseNotes:
    """Dense notes for N rows.

    Args:
        planner: ``[E, K, d]`` planner notes; blocks: ``[E, K, R, d]`` block notes, or ``[E, K, R, M, d]`` with M
        notes per block; block_valid: ``[E, K, R]``.
        example_index / stream_ids: ``[N]``; query_round: ``[N, T]`` round of every token of the row.
    Returns:
        :class:`DenseNotes` with ``notes`` ``[N, K * (1 + R M), d]``.
    """
    if blocks.dim() == 4:
        blocks = blocks.unsqueeze(3)
    e, k, r, m, d = blocks.shape
    block_rounds = torch.arange(1, r + 1, device=blocks.device).repeat_interleave(m)  # [R M]
    rounds = torch.cat([block_rounds.new_full((1,), ALWAYS_VISIBLE_ROUND), block_rounds]).expand(e, k, -1)
    notes = torch.cat([planner.unsqueeze(2), blocks.flatten(2, 3)], dim=2)  # [E, K, 1 + R M, d]
    valid = torch.cat([torch.ones_like(block_valid[:, :, :1]), block_valid.repeat_interleave(m, dim=2)], dim=2)
    source = torch.arange(k, device=blocks.device).view(1, k, 1).expand(e, k, 1 + r * m)
    per_row_valid = valid[example_index].flatten(1)  # [N, M]
    if not read_own:
        per_row_valid = per_row_valid & (source[example_index].flatten(1) != stream_ids.unsqueeze(1))
    return DenseNotes(
        notes=notes[example_index].flatten(1, 2),  # [N, M, d]
        note_round=rounds[example_index].flatten(1),
        note_valid=per_row_valid,
        query_round=query_round,
        lag=lag,
    )


def ablate_block_notes(
    blocks: torch.Tensor, block_valid: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sibling block notes for the usage contrast: ``shuffle`` takes example ``(e + 1) % E``'s notes (``drop``
    when E == 1), ``drop`` removes them. Planner notes are left alone (the plan is in the prompt anyway)."""
    if mode == "shuffle" and blocks.shape[0] > 1:
        return blocks.roll(1, dims=0), block_valid.roll(1, dims=0)
    return torch.zeros_like(blocks), torch.zeros_like(block_valid)


def visible_summary(notes: DenseNotes, block_rounds: int) -> torch.Tensor:
    """Mean of the notes a row sees in each round 1..R -> ``[N, R, d]`` (zeros where none is visible)."""
    n, m, _ = notes.notes.shape
    query = torch.arange(1, block_rounds + 1, device=notes.notes.device).view(1, -1, 1)  # [1, R, 1]
    visible = notes.note_valid.unsqueeze(1) & (notes.note_round.unsqueeze(1) <= query - notes.lag)  # [N, R, M]
    w = visible.to(notes.notes.dtype)
    return torch.einsum("nrm,nmd->nrd", w, notes.notes) / w.sum(-1, keepdim=True).clamp(min=1.0)


def check_window(
    num_streams: int, max_blocks: int, note_window: int, read_own: bool, notes_per_block: int = 1
) -> None:
    """Training reads every visible note; that matches decoding only if the window W never binds."""
    readers = num_streams if read_own else num_streams - 1
    most = readers * (1 + max_blocks * notes_per_block)
    if most > note_window:
        raise ValueError(
            f"a row may read up to {most} notes ({readers} streams x (1 planner + {max_blocks} blocks x "
            f"{notes_per_block} notes)) but note_window is {note_window}; raise pdt.note_window to >= {most} or "
            "shorten sections (data.build.section_max_tokens)."
        )
