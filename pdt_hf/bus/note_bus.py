"""The Note Bus: storage for committed notes and their per-layer key/value projections (the note KV manager).

Design decisions:
- Bookkeeping apart from storage. Which rows a reader sees is decided by the pure functions of
  ``visibility.py`` from two int tags per row (stream, round); this module only owns the preallocated tensors
  and the row count.
- Append-only, rounds non-decreasing. ``publish`` is called only when a block commits, so a sibling never has
  to un-read a note; rows are appended in round order, so ``restore(r)`` (drop every note with round > r) is a
  count decrement found by binary search, and nothing is freed or copied.
- Note KV computed once. Every SNC layer's key/value projector runs exactly once per published note, at
  publish time, into per-layer storage [capacity, H, Dh]; reads return row indices into that storage and never
  recompute or copy it (``layer_kv`` hands out the storage itself).
- All or nothing. A publish that does not fit raises ``NoteBusFullError`` before any projector runs, and all
  projections are computed before the first write, so a failed publish leaves the bus unchanged.
- Stored notes and their K/V are detached (written under ``torch.no_grad``): the bus serves decoding. Training
  expresses the same visibility with ``visibility.lagged_visible`` over a batch of notes and keeps gradients.

Storage layout (capacity C, count n)::

    row          0      1    ...   n-1   |  n  ...  C-1
    notes      [C, d_note]               |  free
    stream     [C] int64                 |
    round      [C] int64 (non-decreasing)|
    k[l], v[l] [C, H, Dh] per SNC layer l|
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .visibility import SNAPSHOT_ROUND, csr_from_mask, expand_csr, pad_csr, synthesis_mask, visible_mask

__all__ = ["NoteBus", "NoteBusFullError", "NoteBusState", "NoteRead", "PaddedNoteRead", "ReadRecord"]

Projector = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class NoteBusFullError(RuntimeError):
    """A publish would exceed the bus's preallocated capacity (``PDTConfig.note_capacity``)."""


@dataclass(frozen=True)
class NoteRead:
    """Packed CSR read: reader ``a`` sees storage rows ``indices[offsets[a]:offsets[a+1]]``.

    Attributes:
        indices: int64 [nnz], rows into the bus storage, ascending within a reader.
        offsets: int64 [A+1].
        counts: int64 [A], notes seen by each reader (0 gives an empty row).
        reader_streams: int64 [A], the stream of each reader row.
        round: the round the read was made for.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    reader_streams: torch.Tensor
    round: int

    @property
    def num_readers(self) -> int:
        return self.counts.numel()

    def row_ids(self) -> torch.Tensor:
        """int64 [nnz]: the reader row each entry of ``indices`` belongs to (for segment softmax)."""
        return torch.repeat_interleave(torch.arange(self.num_readers, device=self.counts.device), self.counts)


@dataclass(frozen=True)
class PaddedNoteRead:
    """Padded read: ``indices`` int64 [A, W] (padding holds row 0) and ``mask`` bool [A, W]."""

    indices: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class NoteBusState:
    """What ``NoteBus.state()`` reports: stored rows and the newest round among them (-1 when empty)."""

    count: int
    last_round: int


@dataclass(frozen=True)
class ReadRecord:
    """One logged read (CPU tensors): who read at which round, and the (stream, round) of every note they saw."""

    round: int
    reader_streams: torch.Tensor
    offsets: torch.Tensor
    note_streams: torch.Tensor
    note_rounds: torch.Tensor

    def notes_of(self, reader: int) -> list[tuple[int, int]]:
        """The (stream, round) pairs seen by reader row ``reader``."""
        lo, hi = int(self.offsets[reader]), int(self.offsets[reader + 1])
        return list(zip(self.note_streams[lo:hi].tolist(), self.note_rounds[lo:hi].tolist()))


class NoteBus:
    """Committed notes of K streams, their round tags and their per-SNC-layer key/value projections.

    Args:
        num_streams: K.
        d_note: note width.
        capacity: most notes the bus holds (``PDTConfig.note_capacity``).
        note_lag: Δ, rounds before a committed note is visible to siblings.
        note_window: W, most notes a reader sees (the newest), or None for no limit.
        read_own_notes: whether a stream reads its own notes.
        projectors: one callable per SNC layer, ``notes [n, d_note] -> (k [n, H, Dh], v [n, H, Dh])``.
        kv_shape: ``(H, Dh)`` of the projections to preallocate now; None discovers it at the first publish.
        device, dtype: of the storage.
        record: keep a ``ReadRecord`` of every read in ``self.reads``.
        on_read: called with the ``ReadRecord`` of every read.
    """

    def __init__(
        self,
        num_streams: int,
        d_note: int,
        capacity: int,
        note_lag: int,
        note_window: int | None,
        read_own_notes: bool = False,
        projectors: Sequence[Projector] = (),
        kv_shape: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        record: bool = False,
        on_read: Callable[[ReadRecord], None] | None = None,
    ) -> None:
        for name, value, hint in (
            ("num_streams", num_streams, "e.g. num_streams=3"),
            ("d_note", d_note, "e.g. d_note=256"),
            ("capacity", capacity, "raise PDTConfig.note_capacity, e.g. 512"),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}.")
        if isinstance(note_lag, bool) or not isinstance(note_lag, int) or note_lag < 0:
            raise ValueError(f"note_lag must be an integer >= 0, got {note_lag!r}; the default is 1.")
        if note_window is not None and (
            isinstance(note_window, bool) or not isinstance(note_window, int) or note_window < 1
        ):
            raise ValueError(f"note_window must be a positive integer or None, got {note_window!r}.")
        self.num_streams, self.d_note, self.capacity = num_streams, d_note, capacity
        self.note_lag, self.note_window, self.read_own_notes = note_lag, note_window, bool(read_own_notes)
        self.projectors = list(projectors)
        self.device, self.dtype = torch.device(device if device is not None else "cpu"), dtype
        self._notes = torch.zeros(capacity, d_note, device=self.device, dtype=dtype)  # [C, d_note]
        self._stream = torch.zeros(capacity, dtype=torch.long, device=self.device)  # [C]
        self._round = torch.zeros(capacity, dtype=torch.long, device=self.device)  # [C]
        self._count = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        if kv_shape is not None:
            self._allocate_kv([tuple(kv_shape)] * len(self.projectors))
        self.record = record
        self.on_read = on_read
        self.reads: list[ReadRecord] = []

    # ------------------------------------------------------------------ views
    @property
    def count(self) -> int:
        """Rows currently stored."""
        return self._count

    @property
    def notes(self) -> torch.Tensor:
        """Stored notes [count, d_note] (a view)."""
        return self._notes[: self._count]

    @property
    def streams(self) -> torch.Tensor:
        """Publishing stream of each stored row, int64 [count] (a view)."""
        return self._stream[: self._count]

    @property
    def rounds(self) -> torch.Tensor:
        """Round tag of each stored row, int64 [count] (a view); 0 marks snapshot notes."""
        return self._round[: self._count]

    def layer_kv(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full preallocated storage ``(k [capacity, H, Dh], v [capacity, H, Dh])`` of SNC layer ``slot`` (no copy).

        Rows past ``count`` are stale; index it with ``NoteRead.indices``.
        """
        if not 0 <= slot < len(self.projectors):
            raise IndexError(f"slot {slot} out of range: the bus has {len(self.projectors)} projector(s).")
        if not self._keys:
            raise RuntimeError("note K/V storage is not allocated yet: publish a note first or pass kv_shape=(H, Dh).")
        return self._keys[slot], self._values[slot]

    # ------------------------------------------------------------------ writes
    def publish(self, stream_ids: torch.Tensor, round: int, notes: torch.Tensor) -> torch.Tensor:
        """Append the notes of blocks that committed in ``round`` (>= 1) and project them once per SNC layer.

        Args:
            stream_ids: int64 [n], the publishing stream of each note.
            round: the decoding round the blocks were decoded in.
            notes: [n, d_note].

        Returns:
            int64 [n], the storage rows written.
        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 1:
            raise ValueError(f"round must be an integer >= 1, got {round!r}; planner notes go to publish_snapshot.")
        return self._append(stream_ids, round, notes)

    def publish_snapshot(self, notes: torch.Tensor, stream_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Append the planner's snapshot notes [n, d_note] (round 0); ``stream_ids`` defaults to ``arange(n)``."""
        if stream_ids is None:
            stream_ids = torch.arange(notes.shape[0] if notes.dim() == 2 else 0)
        return self._append(stream_ids, SNAPSHOT_ROUND, notes)

    def _append(self, stream_ids: torch.Tensor, round: int, notes: torch.Tensor) -> torch.Tensor:
        stream_ids = torch.as_tensor(stream_ids).to(device=self.device, dtype=torch.long).reshape(-1)  # [n]
        n = stream_ids.numel()
        if notes.dim() != 2 or notes.shape != (n, self.d_note):
            raise ValueError(
                f"notes must have shape [n, d_note] = [{n}, {self.d_note}] (one per stream id), got {tuple(notes.shape)}."
            )
        if n and (int(stream_ids.min()) < 0 or int(stream_ids.max()) >= self.num_streams):
            raise ValueError(f"stream_ids {stream_ids.tolist()} out of range for num_streams={self.num_streams}.")
        last = self.state().last_round
        if round < last:
            raise ValueError(
                f"round {round} is older than the newest stored round {last}: rounds are published in order; "
                f"call restore({round - 1}) first to rewind the bus."
            )
        if n == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        if self._count + n > self.capacity:
            raise NoteBusFullError(
                f"the note bus is full: {self._count} of capacity {self.capacity} rows used, cannot publish {n} more; "
                f"raise PDTConfig.note_capacity (e.g. to {max(2 * self.capacity, self._count + n)})."
            )
        with torch.no_grad():
            notes = notes.detach().to(device=self.device, dtype=self.dtype)
            projected = [self._project(slot, fn, notes) for slot, fn in enumerate(self.projectors)]
            if projected and not self._keys:
                self._allocate_kv([tuple(k.shape[1:]) for k, _ in projected])
            for slot, (k, _v) in enumerate(projected):
                if k.shape[1:] != self._keys[slot].shape[1:]:
                    raise ValueError(
                        f"projector {slot} returned k of shape {tuple(k.shape)}, storage holds "
                        f"[capacity, H, Dh] = {tuple(self._keys[slot].shape)}."
                    )
            rows = torch.arange(self._count, self._count + n, device=self.device)  # [n]
            self._notes[rows] = notes
            self._stream[rows] = stream_ids
            self._round[rows] = round
            for slot, (k, v) in enumerate(projected):
                self._keys[slot][rows] = k
                self._values[slot][rows] = v
        self._count += n
        return rows

    def _project(self, slot: int, fn: Projector, notes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = fn(notes)
        if k.dim() != 3 or v.shape != k.shape or k.shape[0] != notes.shape[0]:
            raise ValueError(
                f"projector {slot} must map notes [n, d_note] to (k [n, H, Dh], v [n, H, Dh]); "
                f"got k {tuple(k.shape)}, v {tuple(v.shape)} for n={notes.shape[0]}."
            )
        return k.to(self.dtype), v.to(self.dtype)

    def _allocate_kv(self, shapes: list[tuple[int, ...]]) -> None:
        self._keys = [torch.zeros(self.capacity, *s, device=self.device, dtype=self.dtype) for s in shapes]
        self._values = [torch.zeros(self.capacity, *s, device=self.device, dtype=self.dtype) for s in shapes]

    # ------------------------------------------------------------------ rewind
    def state(self) -> NoteBusState:
        """Row count and newest stored round (-1 when empty)."""
        last = int(self._round[self._count - 1]) if self._count else -1
        return NoteBusState(count=self._count, last_round=last)

    def restore(self, round: int) -> None:
        """Return to the state at the end of ``round``: drop every note with round > ``round`` (O(log n), no copy).

        ``restore(0)`` keeps only the snapshot notes, ``restore(-1)`` empties the bus.
        """
        if isinstance(round, bool) or not isinstance(round, int):
            raise ValueError(f"round must be an integer, got {round!r}.")
        # Rounds are non-decreasing in storage order, so the kept rows are a prefix.
        kept = torch.searchsorted(self._round[: self._count], torch.tensor([round], device=self.device), right=True)
        self._count = int(kept)

    def reset(self) -> None:
        """Drop every note (storage is kept)."""
        self._count = 0

    # ------------------------------------------------------------------ reads
    def visible(self, reader_streams: torch.Tensor, round: int) -> torch.Tensor:
        """bool [A, count]: which stored rows each reader sees at ``round``."""
        readers = torch.as_tensor(reader_streams).to(device=self.device, dtype=torch.long).reshape(-1)  # [A]
        if readers.numel() and (int(readers.min()) < 0 or int(readers.max()) >= self.num_streams):
            raise ValueError(f"reader_streams {readers.tolist()} out of range for num_streams={self.num_streams}.")
        if isinstance(round, bool) or not isinstance(round, int):
            raise ValueError(f"round must be an integer, got {round!r}.")
        return visible_mask(
            readers, round, self.streams, self.rounds, self.note_lag, self.note_window, self.read_own_notes
        )

    def read(self, reader_streams: torch.Tensor, round: int) -> NoteRead:
        """The notes every reader in ``reader_streams`` [A] sees while decoding ``round``, packed as CSR."""
        readers = torch.as_tensor(reader_streams).to(device=self.device, dtype=torch.long).reshape(-1)  # [A]
        return self._packed(self.visible(readers, round), readers, round)

    def read_synthesis(self) -> NoteRead:
        """What the synthesis stream reads once every stream has finished: every stored note (``synthesis_mask``).

        One reader row, stream id ``num_streams`` (the synthesis slot), at round ``last_round + 1``; the read is
        recorded like any other (``record``/``on_read``).
        """
        readers = torch.tensor([self.num_streams], device=self.device)  # [1]
        round = max(self.state().last_round, 0) + 1
        return self._packed(synthesis_mask(self.streams, self.num_streams), readers, round)

    def _packed(self, mask: torch.Tensor, readers: torch.Tensor, round: int) -> NoteRead:
        indices, offsets, counts = csr_from_mask(mask)
        result = NoteRead(indices=indices, offsets=offsets, counts=counts, reader_streams=readers, round=round)
        if self.record or self.on_read is not None:
            record = ReadRecord(
                round=round,
                reader_streams=readers.cpu(),
                offsets=offsets.cpu(),
                note_streams=self._stream[indices].cpu(),
                note_rounds=self._round[indices].cpu(),
            )
            if self.record:
                self.reads.append(record)
            if self.on_read is not None:
                self.on_read(record)
        return result

    def read_padded(self, reader_streams: torch.Tensor, round: int, width: int | None = None) -> PaddedNoteRead:
        """Like ``read`` but padded: indices [A, width] and mask [A, width]; width defaults to ``note_window``."""
        result = self.read(reader_streams, round)
        if width is None:
            most = int(result.counts.max()) if result.counts.numel() else 0
            width = self.note_window if self.note_window is not None else most
        indices, mask = pad_csr(result.indices, result.offsets, width)
        return PaddedNoteRead(indices=indices, mask=mask, counts=result.counts)

    @staticmethod
    def expand(read: NoteRead, tokens_per_reader: int) -> NoteRead:
        """Repeat each reader's row T times for T query tokens: A rows -> A*T rows (row a*T + t is reader a)."""
        indices, offsets, counts = expand_csr(read.indices, read.offsets, tokens_per_reader)
        readers = read.reader_streams.repeat_interleave(tokens_per_reader)  # [A*T]
        return NoteRead(indices=indices, offsets=offsets, counts=counts, reader_streams=readers, round=read.round)
