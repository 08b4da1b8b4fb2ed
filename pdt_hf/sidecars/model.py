"""The sidecar: every trainable PDT module, as one ``nn.Module``.

``PDTSidecar`` holds an adapter and an SNC layer per instrumented decoder layer
and the five heads. With ``config.synthesis`` every adapter has one more slot,
index ``num_streams``, for the synthesis stream (family ``synthesis``; the
``adapters`` family is the K section slots). It is a child of the wrapper, so ``.to()``,
``state_dict()``, DDP and FSDP see it. Its :meth:`layer_delta` is what the
forward hook adds to a decoder layer's output.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PDTConfig
from .adapter.layer import StreamAdapter
from .context import DenseNotes, PackedNotes, SidecarContext
from .heads.layer import PDTHeads
from .snc.layer import NoteCrossAttention

SIDECAR_FAMILIES = ("adapters", "snc", "heads", "synthesis")


class PDTSidecar(nn.Module):
    """Adapters and SNC keyed by decoder-layer index (as strings), plus ``heads``."""

    def __init__(self, config: PDTConfig, hidden_size: int) -> None:
        super().__init__()
        if config.d_note is None or config.instrumented_layers is None:
            raise ValueError("PDTSidecar needs a resolved config; call config.resolve(trunk.config) first.")
        self.config = config
        layers = [str(i) for i in config.instrumented_layers]
        self.adapters = nn.ModuleDict(
            {i: StreamAdapter(hidden_size, config.num_streams, config.adapter, config.synthesis) for i in layers}
        )
        self.snc = nn.ModuleDict({i: NoteCrossAttention(hidden_size, config.d_note, config.snc) for i in layers})
        self.heads = PDTHeads(hidden_size, config.d_note, config.num_streams, config.heads, config.notes_per_block)
        self.context: SidecarContext | None = None

    @property
    def snc_layers(self) -> list[NoteCrossAttention]:
        """SNC layers in decoder order; position in this list is the bus's layer slot."""
        return [self.snc[str(i)] for i in self.config.instrumented_layers]

    def layer_delta(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``layer_idx``'s output ``[N, T, d]`` -> updated hidden state (same shape)."""
        ctx = self.context
        if ctx is None:
            return hidden
        key = str(layer_idx)
        if ctx.stream_ids.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"stream_ids has {ctx.stream_ids.shape[0]} rows but the batch has {hidden.shape[0]}; "
                "pass one stream id per row."
            )
        mask = None if ctx.token_mask is None else ctx.token_mask.unsqueeze(-1).to(hidden.dtype)  # [N, T, 1]
        delta = self.adapters[key].delta(hidden, ctx.stream_ids)
        hidden = hidden + (delta if mask is None else delta * mask)
        notes = ctx.notes
        snc = self.snc[key]
        if isinstance(notes, DenseNotes):
            note_round, note_valid, query_round = notes.resolved(hidden.shape[1])
            delta = snc.delta_dense(hidden, notes.notes, note_round, note_valid, query_round, notes.lag)
        elif isinstance(notes, PackedNotes):
            slot = self.config.instrumented_layers.index(layer_idx)
            k_store, v_store = notes.store.layer_kv(slot)
            delta = snc.delta_packed(hidden, k_store, v_store, notes.indices, notes.offsets)
        else:
            return hidden
        return hidden + (delta if mask is None else delta * mask)

    def family_parameters(self, family: str) -> list[nn.Parameter]:
        """Parameters of one family: ``adapters`` (the K section slots), ``synthesis`` (the synthesis slot),
        ``snc``, ``heads`` or ``heads.<name>``."""
        root, _, sub = family.partition(".")
        if root not in SIDECAR_FAMILIES:
            raise ValueError(f"unknown sidecar family {family!r}; use one of {SIDECAR_FAMILIES} or heads.<name>.")
        if root == "adapters":
            return [p for adapter in self.adapters.values() for p in adapter.section_parameters()]
        if root == "synthesis":
            if not self.config.synthesis:
                raise ValueError(
                    "this sidecar has no synthesis slot (PDTConfig.synthesis is false); set pdt.synthesis: true "
                    "to train the synthesis stage."
                )
            return [p for adapter in self.adapters.values() for p in adapter.synthesis_parameters()]
        module = getattr(self, root)
        if sub:
            if not hasattr(module, sub):
                raise ValueError(f"unknown head {sub!r}; heads are notes, planner, coverage, agreement, speculation.")
            module = getattr(module, sub)
        return list(module.parameters())
