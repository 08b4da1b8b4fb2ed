"""``StreamKVCache``: a transformers ``Cache`` holding one shared prompt prefix and K per-stream suffixes.

Design decisions:
- The prompt is prefilled once with a plain ``DynamicCache`` (batch 1); ``from_prefix`` keeps those prefix tensors
  (no copy) and preallocates per-stream suffix storage [K, Hkv, S_cap, D] per layer. Storage never moves: steps
  write in place, rollbacks only change ``lengths`` (see ``lengths.py``).
- A step is bracketed by ``begin_step`` / ``end_step`` (or the ``step`` context manager). ``begin_step`` returns
  the ``position_ids`` and the 4D ``attention_mask`` the trunk needs for a batched forward of A streams x T tokens;
  transformers 5.x passes an already-4D mask through unchanged, so the trunk's modeling code is untouched.
- Simple path: ``update`` returns the prefix expanded (a view) concatenated with the stepped streams' suffix rows,
  [A, Hkv, P + S_step, D]; the concatenation copies the prefix once per stream and step. The fast path
  (``attention.py``) instead receives only the suffix rows and reads the prefix once inside a kernel.
- Static layout (``from_prefix(..., static=True)``): one preallocated buffer [K, Hkv, P + S_cap, D] per layer holds
  every stream's copy of the prefix followed by its suffix slots, so a simple-path step of all streams returns a
  view ``buffer[:, :, :P + S_step]`` and copies nothing (a subset of streams is one gather). It trades K - 1 extra
  prefix copies, made once, for the per-step concatenation; storage never moves, the shape CUDA graphs need.
  ``prefix_keys`` and ``suffix_keys`` are then views of the buffer.
- The additive mask of single-token steps is kept in a preallocated [K, 1, 1, P + S_cap] buffer updated in place
  (one column opened per step, columns closed on rollback) and its first P + S_step columns copied out, instead
  of being rebuilt from the lengths every step; its values are exactly those ``visibility_to_mask`` gives.
- ``get_seq_length`` reports P + the longest suffix. Trunks only use it to invent positions when none are
  given, which is right for a single stream only; always pass the ``position_ids`` from ``begin_step``.
- Full-attention layers only: a sliding-window layer in the prefix cache is rejected with a clear error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .lengths import StreamLengths, StreamStep, flat_write_index, step_visibility, visibility_to_mask

__all__ = ["StreamKVCache", "StreamKVLayer"]


class StreamKVLayer(CacheLayerMixin):
    """One decoder layer's storage: prefix K/V [1, Hkv, P, D] shared, suffix K/V [K, Hkv, S_cap, D] per stream."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        num_streams: int,
        capacity: int,
        static: bool = False,
    ) -> None:
        super().__init__()
        if prefix_keys.dim() != 4 or prefix_keys.shape[0] != 1 or prefix_values.shape[:3] != prefix_keys.shape[:3]:
            raise ValueError(
                f"prefix K/V must be [1, Hkv, P, D] from a batch-1 prefill, got keys {tuple(prefix_keys.shape)} and "
                f"values {tuple(prefix_values.shape)}; prefill the prompt once with batch size 1."
            )
        _, heads, prefix_len, k_dim = prefix_keys.shape
        kw = dict(dtype=prefix_keys.dtype, device=prefix_keys.device)
        self.static = static
        self.buffer_keys = self.buffer_values = None
        if static:
            # Zeros, not empty: masked slots still enter the scores, and stale NaNs would poison the softmax.
            self.buffer_keys = torch.zeros(num_streams, heads, prefix_len + capacity, k_dim, **kw)  # [K, Hkv, P+S, D]
            self.buffer_values = torch.zeros(num_streams, heads, prefix_len + capacity, prefix_values.shape[-1], **kw)
            self.buffer_keys[:, :, :prefix_len] = prefix_keys
            self.buffer_values[:, :, :prefix_len] = prefix_values
            self.prefix_keys = self.buffer_keys[:1, :, :prefix_len]  # [1, Hkv, P, D], a view of stream 0's copy
            self.prefix_values = self.buffer_values[:1, :, :prefix_len]
            self.suffix_keys = self.buffer_keys[:, :, prefix_len:]  # [K, Hkv, S_cap, D], a view
            self.suffix_values = self.buffer_values[:, :, prefix_len:]
        else:
            self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
            self.suffix_keys = torch.zeros(num_streams, heads, capacity, k_dim, **kw)  # [K, Hkv, S_cap, D]
            self.suffix_values = torch.zeros(num_streams, heads, capacity, prefix_values.shape[-1], **kw)
        self.keys, self.values = self.suffix_keys, self.suffix_values
        self.dtype, self.device = prefix_keys.dtype, prefix_keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Storage is allocated up front from the prefix; nothing to do."""

    @property
    def write_geometry(self) -> tuple[int, int, int]:
        """``(Hkv, S_tot, offset)`` of the storage the new K/V go to (see ``lengths.flat_write_index``)."""
        store = self.buffer_keys if self.static else self.suffix_keys
        return store.shape[1], store.shape[2], self.prefix_keys.shape[2] if self.static else 0

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        step: StreamStep | None = None,
        write_index: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's new K/V [A, Hkv, T, D] at each stream's length; return what attention reads.

        ``write_index`` is ``flat_write_index`` for this layer's geometry (the cache computes it once per step and
        shares it between layers); one ``index_copy_`` per tensor writes all rows.

        Returns:
            simple path: K/V [A, Hkv, P + S_step, D] (prefix then suffix slots 0..S_step-1; views of the buffer
            when the layout is static and all K streams step in order);
            ragged step: suffix K/V only, [A, Hkv, S_step, D] (views when all K streams step in order).
        """
        if step is None:
            raise RuntimeError(
                "StreamKVCache received K/V outside a step: call cache.begin_step(streams, num_tokens) and pass its "
                "position_ids and attention_mask to the trunk forward."
            )
        num, _, tokens, _ = key_states.shape
        if num != step.streams.numel() or tokens != step.num_tokens:
            raise ValueError(
                f"the forward carries {num} sequences x {tokens} tokens but begin_step planned "
                f"{step.streams.numel()} streams x {step.num_tokens} tokens; input_ids must be [A, T] in step order."
            )
        if write_index is None:
            write_index = flat_write_index(step.streams, step.slots, *self.write_geometry)
        store_k = self.buffer_keys if self.static else self.suffix_keys
        store_v = self.buffer_values if self.static else self.suffix_values
        new_k = key_states.to(self.dtype).reshape(-1, store_k.shape[-1])  # [A * Hkv * T, D]
        new_v = value_states.to(self.dtype).reshape(-1, store_v.shape[-1])
        store_k.view(-1, store_k.shape[-1]).index_copy_(0, write_index, new_k)
        store_v.view(-1, store_v.shape[-1]).index_copy_(0, write_index, new_v)
        if self.static and not step.ragged:
            width = self.prefix_keys.shape[2] + step.suffix_width
            if step.all_streams:
                return self.buffer_keys[:, :, :width], self.buffer_values[:, :, :width]  # [K, Hkv, P+S_step, D]
            return self.buffer_keys[step.streams, :, :width], self.buffer_values[step.streams, :, :width]
        keys, values = self.suffix_rows(step)
        if step.ragged:
            return keys, values
        prefix_k = self.prefix_keys.expand(num, -1, -1, -1)  # [A, Hkv, P, D], a view
        prefix_v = self.prefix_values.expand(num, -1, -1, -1)
        return torch.cat([prefix_k, keys], dim=2), torch.cat([prefix_v, values], dim=2)

    def suffix_rows(self, step: StreamStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Suffix K/V of the stepped streams, slots 0..S_step-1: [A, Hkv, S_step, D] (a view for all streams)."""
        width = step.suffix_width
        if step.all_streams:
            return self.suffix_keys[:, :, :width], self.suffix_values[:, :, :width]
        return self.suffix_keys[step.streams, :, :width], self.suffix_values[step.streams, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("StreamKVCache answers mask sizes itself")

    def get_seq_length(self) -> int:
        raise NotImplementedError("StreamKVCache answers sequence lengths itself")

    def get_max_length(self) -> int:
        return self.prefix_keys.shape[2] + self.suffix_keys.shape[2]

    def reset(self) -> None:
        raise NotImplementedError("reset the lengths of a StreamKVCache with rollback, or build a new one")


class StreamKVCache(Cache):
    """Shared prompt prefix plus K independent suffix caches with their own lengths.

    Args:
        layers: one ``StreamKVLayer`` per decoder layer (use ``from_prefix``).
        num_streams: K.
        suffix_capacity: S_cap, most suffix tokens per stream.
        commit_horizon: L, most tokens one ``rollback`` may remove (None: only the stream's length bounds it).
    """

    def __init__(
        self, layers: list[StreamKVLayer], num_streams: int, suffix_capacity: int, commit_horizon: int | None = None
    ) -> None:
        super().__init__(layers=layers)
        prefix_len = layers[0].prefix_keys.shape[2]
        if any(layer.prefix_keys.shape[2] != prefix_len for layer in layers):
            raise ValueError("every layer of the prefix cache must hold the same number of prompt tokens.")
        self.bookkeeping = StreamLengths(num_streams, prefix_len, suffix_capacity, commit_horizon)
        self.current_step: StreamStep | None = None
        self.ragged_decode = False
        # Mask of single-token steps, [K, 1, 1, P + S_cap] additive: column P + s is open (0) iff s < lengths[k] or
        # s is the open step's slot of k, else the dtype's min. Built at the first such step, updated in place.
        self._step_mask: torch.Tensor | None = None
        self._write_indices: dict[tuple[int, int, int], torch.Tensor] = {}  # per step, by layer geometry

    @classmethod
    def from_prefix(
        cls,
        prefix_cache: Cache,
        num_streams: int,
        suffix_capacity: int,
        commit_horizon: int | None = None,
        static: bool = False,
    ) -> StreamKVCache:
        """Build from the batch-1 ``DynamicCache`` of a prompt prefill.

        ``static=False`` keeps the prefix tensors (no copy) apart from the suffix storage; ``static=True`` copies the
        prefix into one [K, Hkv, P + S_cap, D] buffer per layer, so simple-path steps read views (module docstring).
        """
        layers = getattr(prefix_cache, "layers", None)
        if not layers:
            raise ValueError(f"prefix_cache must be a filled transformers Cache, got {type(prefix_cache).__name__}.")
        for i, layer in enumerate(layers):
            if type(layer) is not DynamicLayer or not layer.is_initialized:
                raise ValueError(
                    f"prefix cache layer {i} is a {type(layer).__name__}"
                    f"{'' if layer.is_initialized else ' (empty)'}; StreamKVCache supports full-attention layers "
                    "filled by a plain prefill (DynamicCache), not sliding-window or linear-attention layers."
                )
        return cls(
            [StreamKVLayer(layer.keys, layer.values, num_streams, suffix_capacity, static) for layer in layers],
            num_streams,
            suffix_capacity,
            commit_horizon,
        )

    # ------------------------------------------------------------------ bookkeeping views
    @property
    def num_streams(self) -> int:
        return self.bookkeeping.num_streams

    @property
    def prefix_length(self) -> int:
        """P, the shared prompt tokens."""
        return self.bookkeeping.prefix_len

    @property
    def suffix_capacity(self) -> int:
        return self.bookkeeping.capacity

    @property
    def lengths(self) -> torch.Tensor:
        """Suffix length of every stream, int64 [K] (a copy)."""
        return self.bookkeeping.lengths.clone()

    # ------------------------------------------------------------------ steps
    def begin_step(
        self, streams: torch.Tensor, num_tokens: int, mask_dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Plan a batched forward of ``input_ids`` [A, T] for ``streams`` [A] (in that batch order).

        Args:
            streams: int64 [A], distinct stream ids; finished streams are simply left out.
            num_tokens: T, new tokens per stream.
            mask_dtype: ``torch.bool`` for a bool mask, or a float dtype for an additive one (default: the cache
                dtype, which suits both ``sdpa`` and ``eager`` attention).

        Returns:
            ``{"position_ids": [A, T], "attention_mask": [A, 1, T, P + S_step]}`` to pass to the trunk with
            ``cache=self`` (``past_key_values=self`` before transformers 5.24).
        """
        if self.current_step is not None:
            raise RuntimeError("a step is already open: call end_step() (or cancel_step()) before the next one.")
        device = self.layers[0].device
        step = self.bookkeeping.plan(streams, num_tokens, device)
        if self.ragged_decode and num_tokens == 1:
            step = dataclasses.replace(step, ragged=True)
        dtype = mask_dtype if mask_dtype is not None else self.layers[0].dtype
        if num_tokens == 1 and dtype == self.layers[0].dtype and dtype.is_floating_point:
            mask = self._open_step_mask(step)
        else:
            visible = step_visibility(self.prefix_length, step.lengths, num_tokens, step.suffix_width)  # [A,T,P+S]
            mask = visibility_to_mask(visible, dtype)
        self.current_step = step
        self._write_indices = {}
        return {"position_ids": step.positions, "attention_mask": mask}

    def _open_step_mask(self, step: StreamStep) -> torch.Tensor:
        """Open each stepped stream's new column in the preallocated mask; return its [A, 1, 1, P + S_step] part."""
        p = self.prefix_length
        if self._step_mask is None:
            layer = self.layers[0]
            columns = torch.arange(p + self.suffix_capacity, device=layer.device)  # [P + S_cap]
            lengths = self.bookkeeping.lengths.to(layer.device)
            visible = columns[None, None, :] < p + lengths[:, None, None]  # [K, 1, P + S_cap]
            self._step_mask = visibility_to_mask(visible, layer.dtype)  # [K, 1, 1, P + S_cap]
        self._step_mask[step.streams, 0, 0, p + step.lengths] = 0.0
        width = p + step.suffix_width
        if step.all_streams:
            return self._step_mask[:, :, :, :width].contiguous()  # one small copy: SDPA reads dense masks faster
        return self._step_mask[step.streams, :, :, :width]

    def _close_columns(self, streams: torch.Tensor, start: torch.Tensor, count: int) -> None:
        """Mask suffix slots ``start[a] .. start[a] + count - 1`` of ``streams[a]`` again (rollback, cancelled step)."""
        if self._step_mask is None or count == 0:
            return
        slots = start[:, None] + torch.arange(count, device=start.device)  # [A, n]
        self._step_mask[streams[:, None], 0, 0, self.prefix_length + slots] = torch.finfo(self._step_mask.dtype).min

    def end_step(self) -> None:
        """Advance the stepped streams' lengths by T, after the forward has run."""
        if self.current_step is None:
            raise RuntimeError("end_step() without begin_step().")
        self.bookkeeping.advance(self.current_step)
        if self.current_step.num_tokens > 1:
            self._step_mask = None  # rebuilt from the lengths at the next single-token step
        self.current_step = None

    def cancel_step(self) -> None:
        """Drop an open step without advancing lengths (what it wrote stays masked)."""
        step, self.current_step = self.current_step, None
        if step is not None and step.num_tokens == 1:
            self._close_columns(step.streams, step.lengths, 1)

    @contextmanager
    def step(self, streams: torch.Tensor, num_tokens: int, mask_dtype: torch.dtype | None = None) -> Iterator[dict]:
        """``with cache.step(streams, T) as kw: trunk(ids, cache=cache, **kw)``; ends or cancels the step."""
        kwargs = self.begin_step(streams, num_tokens, mask_dtype)
        try:
            yield kwargs
        except BaseException:
            self.cancel_step()
            raise
        self.end_step()

    def rollback(self, stream: int, n: int) -> None:
        """Remove the last ``n`` suffix tokens of ``stream``: an O(1) length decrement, storage untouched.

        Raises ValueError if ``n`` exceeds the stream's suffix length or the commit horizon L.
        """
        if self.current_step is not None:
            raise RuntimeError("cannot roll back while a step is open; call end_step() or cancel_step() first.")
        self.bookkeeping.rollback(stream, n)
        device = self.layers[0].device
        kept = self.bookkeeping.lengths[stream : stream + 1].to(device)  # [1], the new length
        self._close_columns(torch.tensor([stream], device=device), kept, n)

    # ------------------------------------------------------------------ transformers Cache API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer, step = self.layers[layer_idx], self.current_step
        index = None
        if step is not None:
            geometry = layer.write_geometry
            index = self._write_indices.get(geometry)
            if index is None:
                index = self._write_indices[geometry] = flat_write_index(step.streams, step.slots, *geometry)
        return layer.update(key_states, value_states, step, write_index=index)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """P + the longest suffix (tokens already cached, excluding an open step's)."""
        return self.prefix_length + int(self.bookkeeping.lengths.max())

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv_length, kv_offset) matching what ``update`` returns during the open step."""
        if self.current_step is not None:
            return self.prefix_length + self.current_step.suffix_width, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.prefix_length + self.suffix_capacity

    def reset(self) -> None:
        """Empty every suffix (the prefix is kept)."""
        self.bookkeeping.lengths.zero_()
        self.current_step = None
        self._step_mask = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("StreamKVCache has one length per stream: use rollback(stream, n).")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("StreamKVCache does not support beam search.")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("StreamKVCache has a fixed number of streams.")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("StreamKVCache selects streams per step: pass them to begin_step.")
