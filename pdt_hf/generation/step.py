"""One decode step of a block: choose the A streams' next tokens, read their notes, run one batched forward.

A block repeats this step B times for the same streams (fewer once a stream stops) with the same visible
notes, since notes are published only at block boundaries. Two paths share one contract:

    path        token choice                      notes                     sidecar delta        stream cache
    fast        one processor call on [A, V]      read once per block        SidecarDecodeStep    static layout,
                when every processor is row-wise  (and per change of rows)   (bound per block)    views per step
    reference   per stream, [1, len] history      read every step            PDTSidecar           prefix + suffix,
                                                                             .layer_delta         cat per step

Design decisions:
- The fast path is the default; ``reference_step()`` selects the reference for a block of code (tests compare
  the two). Token choice, note reads and the stream cache layout are exact rearrangements (same values, same
  tokens); only the sidecar delta differs, within float tolerance (see ``sidecars.decode_step``).
- Batched token choice applies only to processors known to act row by row without reading the history
  (``ROWWISE_PROCESSORS``); any other processor keeps that stream's own history. Greedy picks take
  ``max(...).indices`` (the first maximum, as ``argmax``); sampling draws one row at a time from the same
  generator, in stream order, as the reference does.
- Speculative decoding (``generation.speculate``) adds verify forwards of T > 1 tokens per row
  (``forward_chunk``): every token of a row reads the notes of that row's one-token step (``chunk_notes``
  repeats the block's read T times), and the sidecar delta takes the reference path for them.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers import (
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..bus import NoteBus
from ..sidecars.context import PackedNotes
from ..sidecars.decode_step import SidecarDecodeStep
from .sampling import TokenChooser, residual_scores

__all__ = ["ROWWISE_PROCESSORS", "StepRunner", "reference_step", "reference_step_active"]

ROWWISE_PROCESSORS = (SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
"""Processor types whose output row depends only on that row's scores (never on ``input_ids``)."""

_REFERENCE = contextvars.ContextVar("pdt_reference_step", default=False)


@contextmanager
def reference_step() -> Iterator[None]:
    """Generations started inside the block decode with the reference step (module docstring)."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def reference_step_active() -> bool:
    return _REFERENCE.get()


class StepRunner:
    """The per-token work of decode blocks for one generation.

    Args:
        model: the :class:`~pdt_hf.modeling.PDTForCausalLM`.
        chooser: the generation's :class:`TokenChooser`.
        use_notes: whether SNC reads the bus.
        fast: the fast path (else the reference).
    """

    def __init__(self, model, chooser: TokenChooser, use_notes: bool, fast: bool) -> None:
        self.model, self.chooser, self.use_notes, self.fast = model, chooser, use_notes, fast
        self.device = next(model.trunk.parameters()).device
        processors = chooser.processors
        self.batched_choice = fast and all(type(p) in ROWWISE_PROCESSORS for p in processors)
        self.sidecar_step = SidecarDecodeStep(model.sidecar) if fast else None
        self._no_history = torch.zeros(1, 0, dtype=torch.long, device=self.device)
        self._rows: list[int] | None = None
        self._notes: tuple[PackedNotes | None, list[int]] = (None, [])
        self._read = None

    def start_block(self) -> None:
        """A new block: the bus may hold new notes, so the next ``notes`` call reads it again."""
        self._rows = None

    def hooks(self):
        """Context for a block's steps: the fast sidecar delta in the trunk's hooks, or nothing to change."""
        if self.sidecar_step is None:
            return nullcontext()
        return self.model.hooks.using(self.sidecar_step.layer_delta)

    # ------------------------------------------------------------------ token choice
    def choose(
        self,
        rows: list[int],
        next_logits: torch.Tensor,
        history: Callable[[int], torch.Tensor],
        banned: list[int | None] | None = None,
    ) -> tuple[list[int], list[torch.Tensor]]:
        """Next token of each stream in ``rows`` from ``next_logits`` [K, V]; also each row's scores [1, V].

        ``history(k)`` gives stream k's ids [1, len] for processors that read them (reference path).
        ``banned``: per row, a rejected draft token to sample around (``sampling.residual_scores``), or None.
        """
        banned = banned if banned is not None else [None] * len(rows)
        if not self.batched_choice:
            picks = [self.chooser.choose(history(k), next_logits[k], b) for k, b in zip(rows, banned)]
            return [t for t, _ in picks], [s for _, s in picks]
        contiguous = rows == list(range(len(rows)))
        scores = self.process(next_logits[: len(rows)] if contiguous else next_logits[rows])  # [A, V]
        rows_scores = list(scores.split(1))  # A x [1, V]
        if self.chooser.settings.do_sample:
            gen = self.chooser.generator
            tokens = [
                int(torch.multinomial(torch.softmax(s if b is None else residual_scores(s, b), -1), 1, generator=gen))
                for s, b in zip(rows_scores, banned)
            ]
        else:
            tokens = scores.max(dim=-1).indices.tolist()  # argmax (first maximum too), several times faster on CPU
        return tokens, rows_scores

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Row-wise processors on logits ``[N, V]`` (batched choice only: no processor reads the history)."""
        scores = logits.float()
        if self.chooser.processors:
            scores = self.chooser.processors(self._no_history.expand(scores.shape[0], 0), scores)
        return scores

    # ------------------------------------------------------------------ notes
    def notes(self, bus, rows: list[int], round: int) -> tuple[PackedNotes | None, list[int]]:
        """The notes the rows read at ``round`` and how many each sees; fast: read once per block and rows."""
        if self.fast and rows == self._rows:
            return self._notes
        notes, counts, read = None, [0] * len(rows), None
        if self.use_notes:
            read = bus.read(torch.tensor(rows, device=self.device), round)
            notes, counts = PackedNotes(bus, read.indices, read.offsets), read.counts.tolist()
        if self.fast:
            self.sidecar_step.bind(rows, bus, read)
            self._rows, self._notes = list(rows), (notes, counts)
        self._read = read
        return notes, counts

    def chunk_notes(self, bus, tokens_per_row: int) -> PackedNotes | None:
        """The last ``notes`` read with each row repeated for ``tokens_per_row`` query tokens (row a*T + t)."""
        if self._read is None:
            return None
        read = NoteBus.expand(self._read, tokens_per_row)
        return PackedNotes(bus, read.indices, read.offsets)

    # ------------------------------------------------------------------ forward
    def forward(self, rows: list[int], tokens: list[int], notes: PackedNotes | None, cache, step_masks):
        """One batched forward of one token per row; ``step_masks`` adapts the cache's step kwargs to the trunk."""
        streams = torch.tensor(rows, device=self.device)
        with cache.step(streams, 1) as kw:
            kw = step_masks(self.model.trunk.config, kw)
            return self.model(
                input_ids=torch.tensor(tokens, device=self.device)[:, None],
                stream_ids=streams,
                notes=notes,
                cache=cache,
                compute_heads=False,
                **kw,
            )

    def forward_chunk(self, rows: list[int], ids: torch.Tensor, notes: PackedNotes | None, cache, step_masks):
        """One batched forward of ``ids`` [A, T] (T tokens per row, right-padded by the caller); see ``forward``."""
        streams = torch.tensor(rows, device=self.device)
        with cache.step(streams, ids.shape[1]) as kw:
            kw = step_masks(self.model.trunk.config, kw)
            return self.model(input_ids=ids, stream_ids=streams, notes=notes, cache=cache, compute_heads=False, **kw)
