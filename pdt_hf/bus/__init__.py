"""Note Bus: committed notes, who may read them (``visibility``) and their per-layer K/V (``note_bus``)."""

from .note_bus import NoteBus, NoteBusFullError, NoteBusState, NoteRead, PaddedNoteRead, ReadRecord
from .visibility import (
    SNAPSHOT_EFFECTIVE_ROUND,
    SNAPSHOT_ROUND,
    effective_round,
    lagged_visible,
    visible_mask,
)

__all__ = [
    "SNAPSHOT_EFFECTIVE_ROUND",
    "SNAPSHOT_ROUND",
    "NoteBus",
    "NoteBusFullError",
    "NoteBusState",
    "NoteRead",
    "PaddedNoteRead",
    "ReadRecord",
    "effective_round",
    "lagged_visible",
    "visible_mask",
]
