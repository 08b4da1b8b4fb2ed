"""Multi-stream streamers.

The built-in Transformers streamers refuse batches larger than one. These take
``(stream, text)`` events for *committed* text only, and ``(stream, rollback)``
events, so rolled-back text never reaches a reader.

With ``generate(synthesis=True)`` the synthesis stream's conclusion arrives once, after every section, as
stream K (one past the last section stream).

- :class:`MultiStreamStreamer`: base class; override :meth:`on_text`, :meth:`on_rollback`, :meth:`on_end`.
- :class:`MultiStreamPrinter`: prints ``[stream k] text`` lines.
- :class:`MultiStreamIteratorStreamer`: a queue-backed iterator for servers (``for event in streamer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from queue import Queue
from typing import Literal


@dataclass(frozen=True)
class StreamEvent:
    """``kind`` is "text" (committed text of ``stream``), "rollback" (``tokens`` removed) or "end"."""

    kind: Literal["text", "rollback", "end"]
    stream: int
    text: str = ""
    tokens: int = 0
    round: int = 0


class MultiStreamStreamer:
    """Receives committed text and rollbacks for each stream."""

    def on_text(self, stream: int, text: str, round: int) -> None:  # noqa: B027
        """Committed text of one block of ``stream``."""

    def on_rollback(self, stream: int, tokens: int, round: int) -> None:  # noqa: B027
        """A block of ``tokens`` tokens of ``stream`` was rolled back (it was never shown)."""

    def on_end(self) -> None:  # noqa: B027
        """Generation finished (or was interrupted)."""


class MultiStreamPrinter(MultiStreamStreamer):
    def on_text(self, stream: int, text: str, round: int) -> None:
        print(f"[stream {stream}] {text}", flush=True)


class MultiStreamIteratorStreamer(MultiStreamStreamer):
    """Iterator over :class:`StreamEvent`; ``timeout`` seconds per event (None waits forever)."""

    def __init__(self, timeout: float | None = None) -> None:
        self.queue: Queue[StreamEvent] = Queue()
        self.timeout = timeout

    def on_text(self, stream: int, text: str, round: int) -> None:
        self.queue.put(StreamEvent("text", stream, text=text, round=round))

    def on_rollback(self, stream: int, tokens: int, round: int) -> None:
        self.queue.put(StreamEvent("rollback", stream, tokens=tokens, round=round))

    def on_end(self) -> None:
        self.queue.put(StreamEvent("end", -1))

    def __iter__(self) -> MultiStreamIteratorStreamer:
        return self

    def __next__(self) -> StreamEvent:
        event = self.queue.get(timeout=self.timeout)
        if event.kind == "end":
            raise StopIteration
        return event
