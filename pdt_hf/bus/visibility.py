"""Which notes a reader may see: pure index arithmetic over stream and round tags, no storage.

Design decisions:
- Rounds, not tokens, are the unit of the lag Δ. Decoding rounds are numbered 1, 2, 3, ...; the planner's
  snapshot notes carry round 0 (``SNAPSHOT_ROUND``) and are visible to every sibling from the start, whatever Δ.
- One rule, two spellings. Decoding asks ``visible_mask`` (all readers at once, window included). Training
  kernels use the predicate ``kv_valid and kv_round <= q_round - lag`` (``lagged_visible``); there a snapshot
  note takes the effective round ``SNAPSHOT_EFFECTIVE_ROUND`` = -2**40, so the same comparison admits it for
  any realistic lag.
- The window keeps the newest W eligible notes. "Newest" is the order (round, stream, row) ascending, last W
  kept: a higher round is newer; within a round the higher stream index is newer (streams commit in index order
  within a round); within one stream and round the later-published row is newer. Snapshot notes count toward W
  and, having the lowest effective round, are the first to fall out of it.
- Everything is vectorised over readers and notes (two stable sorts and one cumulative sum, no Python loop).
- The synthesis (combiner) stream reads after every stream has committed its last block: it sees every stored
  note of every stream, snapshot notes included, with no lag (all are committed) and no window
  (``synthesis_mask``). It publishes nothing, so no stream ever reads it.
- A read is packed CSR: ``indices`` [nnz] (note rows, ascending within a reader) and ``offsets`` [A+1]; reader
  ``a`` owns ``indices[offsets[a]:offsets[a+1]]``. ``expand_csr`` repeats each row T times for T query tokens,
  ``pad_csr`` gives the [A, W] padded form with a mask.

Visibility for reader stream k = 1 at round r = 4 with lag Δ = 2, window W = 3, read_own = False::

    note row         0    1    2    3    4    5    6    7    8
    note stream      0    1    2    0    2    0    1    2    0
    note round       0    0    0    1    1    2    2    2    3
    effective   -2^40 -2^40 -2^40    1    1    2    2    2    3
    sibling?         y    n    y    y    y    y    n    y    y
    round<=r-Δ=2     y    y    y    y    y    y    y    y    n
    eligible         y    .    y    y    y    y    .    y    .
    newest-first rank (over eligible, order (round, stream, row) descending):
                     6    .    5    4    3    2    .    1    .
    visible (W=3)    .    .    .    .    y    y    .    y    .      -> rows [4, 5, 7]
"""

from __future__ import annotations

import torch

__all__ = [
    "SNAPSHOT_EFFECTIVE_ROUND",
    "SNAPSHOT_ROUND",
    "age_order",
    "csr_from_mask",
    "effective_round",
    "expand_csr",
    "lagged_visible",
    "pad_csr",
    "synthesis_mask",
    "visible_mask",
]

SNAPSHOT_ROUND = 0
"""Round tag of the planner's snapshot notes (decoding rounds start at 1)."""

SNAPSHOT_EFFECTIVE_ROUND = -(2**40)
"""Round a snapshot note takes in the kernel predicate form, so that ``kv_round <= q_round - lag`` always holds."""


def effective_round(note_round: torch.Tensor) -> torch.Tensor:
    """Map raw note rounds [N] to the rounds used by the predicate form (round 0 -> ``SNAPSHOT_EFFECTIVE_ROUND``).

    Args:
        note_round: int tensor [N] (any shape) of raw rounds; 0 marks a snapshot note.

    Returns:
        int64 tensor of the same shape: snapshot notes at ``SNAPSHOT_EFFECTIVE_ROUND``, the others unchanged.
    """
    note_round = note_round.long()
    return torch.where(note_round == SNAPSHOT_ROUND, torch.full_like(note_round, SNAPSHOT_EFFECTIVE_ROUND), note_round)


def lagged_visible(
    q_round: torch.Tensor | int, kv_round: torch.Tensor, lag: int, kv_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The kernel form of the rule: ``kv_valid and kv_round <= q_round - lag`` (broadcasting).

    Args:
        q_round: query (reader) rounds, int or int tensor broadcastable against ``kv_round``, e.g. [Tq, 1].
        kv_round: *effective* note rounds (see ``effective_round``), e.g. [1, N].
        lag: Δ >= 0.
        kv_valid: optional bool tensor broadcastable against ``kv_round`` (padding / sibling mask).

    Returns:
        bool tensor of the broadcast shape, e.g. [Tq, N].
    """
    _check_lag(lag)
    visible = kv_round <= (q_round - lag)
    return visible if kv_valid is None else visible & kv_valid


def visible_mask(
    reader_stream: torch.Tensor,
    reader_round: torch.Tensor | int,
    note_stream: torch.Tensor,
    note_round: torch.Tensor,
    lag: int,
    window: int | None,
    read_own: bool = False,
) -> torch.Tensor:
    """Which notes each reader sees, window included.

    Args:
        reader_stream: int tensor [A], the reading streams.
        reader_round: the round being decoded, an int or an int tensor [A] (one per reader).
        note_stream: int tensor [N], the stream that published each note.
        note_round: int tensor [N], raw rounds (0 = snapshot).
        lag: Δ >= 0, rounds before a committed note becomes visible to siblings.
        window: W >= 1, most notes a reader sees (the newest ones), or None for no limit.
        read_own: whether a reader also sees its own stream's notes.

    Returns:
        bool tensor [A, N]: ``mask[a, i]`` is True iff reader ``a`` sees note ``i``.
    """
    _check_lag(lag)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}; the default note_window is 16.")
    device = note_stream.device
    reader_stream = reader_stream.to(device=device, dtype=torch.long).reshape(-1)  # [A]
    num_notes = note_stream.numel()
    eff = effective_round(note_round.to(device)).reshape(1, num_notes)  # [1, N]
    if isinstance(reader_round, torch.Tensor):
        q_round = reader_round.to(device=device, dtype=torch.long).reshape(-1, 1)  # [A, 1]
    else:
        q_round = int(reader_round)
    stream = note_stream.to(dtype=torch.long).reshape(1, num_notes)  # [1, N]
    eligible = lagged_visible(q_round, eff, lag)  # [A or 1, N]
    if not read_own:
        eligible = eligible & (stream != reader_stream[:, None])  # [A, N]
    eligible = eligible.expand(reader_stream.numel(), num_notes)  # [A, N]
    if window is None or num_notes == 0:
        return eligible.clone()
    order = age_order(eff.reshape(-1), stream.reshape(-1))  # [N], oldest first
    in_order = eligible[:, order]  # [A, N]
    # Number of eligible notes at or after each position (i.e. at least as new): reverse cumulative sum.
    newer_or_same = in_order.flip(-1).long().cumsum(-1).flip(-1)  # [A, N]
    keep = in_order & (newer_or_same <= window)
    mask = torch.empty_like(keep)
    mask[:, order] = keep
    return mask


def synthesis_mask(note_stream: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Which notes the synthesis stream sees: every note of streams ``0..K-1``, any round, no window.

    Args:
        note_stream: int tensor [N], the stream that published each note.
        num_streams: K, the section streams.

    Returns:
        bool tensor [1, N] (one reader)::

            note stream   0  1  2  0  1  2  0  2
            note round    0  0  0  1  1  1  2  2
            visible       y  y  y  y  y  y  y  y
    """
    stream = note_stream.to(dtype=torch.long).reshape(1, -1)  # [1, N]
    return (stream >= 0) & (stream < num_streams)


def age_order(eff_round: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """Permutation [N] sorting notes oldest first by (effective round, stream, row), via two stable sorts."""
    by_stream = torch.sort(stream, stable=True).indices  # [N]
    by_round = torch.sort(eff_round[by_stream], stable=True).indices  # [N]
    return by_stream[by_round]


def csr_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack a bool mask [A, N] into CSR: ``(indices [nnz], offsets [A+1], counts [A])``, all int64.

    ``indices`` lists, reader by reader, the note rows the reader sees in ascending order::

        mask = [[0 1 1 0],        counts  = [2, 0, 1]
                [0 0 0 0],   ->   offsets = [0, 2, 2, 3]
                [1 0 0 0]]        indices = [1, 2, 0]
    """
    counts = mask.sum(dim=1)  # [A]
    offsets = torch.zeros(mask.shape[0] + 1, dtype=torch.long, device=mask.device)  # [A+1]
    torch.cumsum(counts, dim=0, out=offsets[1:])
    indices = mask.nonzero()[:, 1]  # [nnz], row-major so grouped by reader
    return indices, offsets, counts


def expand_csr(
    indices: torch.Tensor, offsets: torch.Tensor, tokens_per_reader: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat each CSR row T times, for T query tokens per reader: A rows -> A*T rows (row a*T + t is reader a).

    ::

        offsets = [0, 2, 3], indices = [4, 7, 5], T = 2
        -> counts = [2, 2, 1, 1], offsets = [0, 2, 4, 5, 6], indices = [4, 7, 4, 7, 5, 5]

    Returns:
        ``(indices [nnz*T], offsets [A*T+1], counts [A*T])``.
    """
    if isinstance(tokens_per_reader, bool) or not isinstance(tokens_per_reader, int) or tokens_per_reader < 1:
        raise ValueError(f"tokens_per_reader must be a positive integer, got {tokens_per_reader!r}.")
    device = offsets.device
    counts = (offsets[1:] - offsets[:-1]).repeat_interleave(tokens_per_reader)  # [A*T]
    new_offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=device)  # [A*T+1]
    torch.cumsum(counts, dim=0, out=new_offsets[1:])
    row = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)  # [nnz*T]
    within = torch.arange(row.numel(), device=device) - new_offsets[row]  # position inside its row
    source = offsets[row // tokens_per_reader] + within  # [nnz*T] positions in the input CSR
    return indices[source], new_offsets, counts


def pad_csr(indices: torch.Tensor, offsets: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded form of a CSR read: ``(indices [A, width], mask [A, width])``; padding slots hold row 0, mask False.

    ::

        offsets = [0, 2, 2, 3], indices = [1, 2, 0], width = 3
        -> indices = [[1, 2, 0], [0, 0, 0], [0, 0, 0]]
           mask    = [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    """
    counts = offsets[1:] - offsets[:-1]  # [A]
    most = int(counts.max()) if counts.numel() else 0
    if isinstance(width, bool) or not isinstance(width, int) or width < most:
        raise ValueError(
            f"width must be an integer >= the largest row ({most} notes), got {width!r}; "
            "use the bus's note_window, or leave width=None."
        )
    slot = torch.arange(width, device=offsets.device)  # [W]
    mask = slot[None, :] < counts[:, None]  # [A, W]
    if indices.numel() == 0:
        return torch.zeros(mask.shape, dtype=torch.long, device=offsets.device), mask
    source = (offsets[:-1, None] + slot[None, :]).clamp(max=indices.numel() - 1)  # [A, W]
    padded = torch.where(mask, indices[source], torch.zeros_like(source))
    return padded, mask


def _check_lag(lag: int) -> None:
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
        raise ValueError(f"lag must be an integer >= 0, got {lag!r}; the default note_lag is 1.")
