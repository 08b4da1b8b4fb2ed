"""Stream KV: one prompt prefill shared by K streams, each with its own suffix cache and length.

``lengths`` holds the index arithmetic (positions, masks, rollback checks), ``cache`` the transformers ``Cache``
with its storage, ``attention`` the fast single-token path that reads the shared prefix once, and ``masks`` the
step masks of trunks with sliding-window layers.
"""

from .attention import STREAM_ATTENTION, stream_attention, stream_attention_forward
from .cache import StreamKVCache, StreamKVLayer
from .lengths import (
    StreamKVFullError,
    StreamLengths,
    StreamStep,
    check_rollback,
    flat_write_index,
    step_positions,
    step_visibility,
    visibility_to_mask,
    write_slots,
)

__all__ = [
    "STREAM_ATTENTION",
    "StreamKVCache",
    "StreamKVFullError",
    "StreamKVLayer",
    "StreamLengths",
    "StreamStep",
    "check_rollback",
    "flat_write_index",
    "step_positions",
    "step_visibility",
    "stream_attention",
    "stream_attention_forward",
    "visibility_to_mask",
    "write_slots",
]
