"""The synthesis (combiner) pass: after the K streams finish, one more stream writes the conclusion from notes.

Context layout of the synthesis stream (``prompts.synthesis_message``)::

    [ shared prefix p_0 .. p_{n-1} | synthesis suffix ............................ | c_0 c_1 ... ]
      prompt tokens, bare trunk      'Conclusion": a short synthesis ...', header     conclusion tokens
      (KV of the streams' prefill)   sidecar slot K, SNC reads every note             slot K, every note

    notes read (every token, one read): snapshot and block notes of all K streams, every round
    section text in its KV: none (its cache holds only the n prefix tokens, its suffix and its own tokens)

Design decisions:
- It runs once every stream has committed its last block, so every note it could read is committed: the read
  has no lag and no window (``NoteBus.read_synthesis``, ``bus.visibility.synthesis_mask``), and it publishes
  nothing (no stream ever reads it), so it has no blocks, no agreement score and no rollback.
- Its prompt shares the streams' prompt prefix up to where the plan item starts (n tokens, n <= P); those n
  positions of the streams' prefix K/V (already prefilled once by the bare trunk) seed its own one-stream
  ``StreamKVCache``, so the prompt is not prefilled again and no sibling suffix or section token enters its KV.
- Adapter slot ``PDTConfig.num_streams`` (``PDTConfig.synthesis``); its notes reach SNC through the bus's
  per-layer K/V storage as for the streams (``PackedNotes``), on the reference sidecar delta (one row).
- Tokens are chosen by the generation's ``TokenChooser`` (greedy is deterministic; sampling continues the same
  seeded generator after the streams); it stops at EOS, a stop string or ``synthesis_max_new_tokens``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..bus import NoteBus
from ..sidecars.context import PackedNotes
from ..stream_kv import StreamKVCache
from .prompts import common_prefix_length

__all__ = ["DEFAULT_SYNTHESIS_TOKENS", "SynthesisResult", "shared_prefix_length", "write_synthesis"]

DEFAULT_SYNTHESIS_TOKENS = 64
"""Default ``synthesis_max_new_tokens``."""


@dataclass
class SynthesisResult:
    """What the synthesis stream wrote: ``ids`` (a trailing EOS kept), ``text``, why it stopped, notes read."""

    ids: list[int]
    text: str
    finish_reason: str
    notes_read: int
    note_streams: list[int]
    prefix_tokens: int
    seconds: float


def shared_prefix_length(prefix: list[int], synthesis_ids: list[int]) -> int:
    """n: tokens of ``prefix`` the synthesis prompt starts with (at most ``len(prefix)``, one token kept after)."""
    n = common_prefix_length([prefix + [-1], synthesis_ids])
    return min(n, len(prefix))


def _prefix_cache(cache: StreamKVCache, n: int) -> DynamicCache:
    """A batch-1 ``DynamicCache`` holding the first n prefix positions of every layer of ``cache`` (views)."""
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.prefix_keys[:, :, :n], layer.prefix_values[:, :, :n], i)  # [1, Hkv, n, D]
    return out


@torch.no_grad()
def write_synthesis(
    decoder,
    cache: StreamKVCache,
    prefix: list[int],
    synthesis_ids: list[int],
    max_new_tokens: int,
) -> SynthesisResult:
    """Run the synthesis stream of ``decoder`` (a finished ``MultiStreamDecoder``) reading its bus.

    Args:
        decoder: the decoder whose streams have finished (its ``bus`` holds every committed note).
        cache: the streams' ``StreamKVCache`` (only its prefix K/V is read).
        prefix: the streams' shared prefix ids (P tokens).
        synthesis_ids: the synthesis stream's full prompt ids (``render_ids(tok, synthesis_message(...))``).
        max_new_tokens: most conclusion tokens.
    """
    from ..stream_kv.masks import trunk_step_masks

    model, device, bus = decoder.model, decoder.device, decoder.bus
    start = time.perf_counter()
    n = shared_prefix_length(prefix, synthesis_ids)
    suffix = synthesis_ids[n:]
    if n < 1:
        raise ValueError("the synthesis prompt shares no token with the stream prompts; use a chat template or BOS.")
    syn_cache = StreamKVCache.from_prefix(_prefix_cache(cache, n), 1, len(suffix) + max_new_tokens + 1)
    slot = torch.tensor([model.pdt_config.synthesis_stream], device=device)  # the sidecar's synthesis slot
    row = torch.zeros(1, dtype=torch.long, device=device)  # the only stream of syn_cache
    read = bus.read_synthesis() if decoder.settings.use_notes else None
    note_streams = bus.streams[read.indices].tolist() if read is not None else []

    def forward(ids: list[int]) -> torch.Tensor:
        notes = None
        if read is not None:
            rows = NoteBus.expand(read, len(ids))  # every token reads the same notes
            notes = PackedNotes(bus, rows.indices, rows.offsets)
        with syn_cache.step(row, len(ids)) as kw:
            kw = trunk_step_masks(model.trunk.config, kw)
            out = model(
                input_ids=torch.tensor([ids], device=device),
                stream_ids=slot,
                notes=notes,
                cache=syn_cache,
                compute_heads=False,
                logits_to_keep=1,
                **kw,
            )
        return out.logits[0, -1]  # [V]

    chooser, tokenizer, settings = decoder.chooser, decoder.tokenizer, decoder.settings
    logits, written, reason = forward(suffix), [], "length"
    try:
        while len(written) < max_new_tokens:
            history = torch.tensor([synthesis_ids + written], device=device)
            token, scores = chooser.choose(history, logits)
            written.append(token)
            if token in decoder.eos:
                reason = "eos"
                break
            if settings.stop_strings and tokenizer is not None:
                tail = tokenizer.decode(written[-64:])
                if any(stop in tail for stop in settings.stop_strings):
                    reason = "stop_string"
                    break
            if chooser.settings.stopping_criteria and chooser.should_stop(
                torch.tensor([synthesis_ids + written], device=device), scores
            ):
                reason = "stopping_criteria"
                break
            if len(written) < max_new_tokens:
                logits = forward([token])
    finally:
        model.sidecar.context = None
    text = tokenizer.decode(written, skip_special_tokens=True).strip() if tokenizer is not None else ""
    return SynthesisResult(
        ids=written,
        text=text,
        finish_reason=reason,
        notes_read=len(note_streams),
        note_streams=note_streams,
        prefix_tokens=n,
        seconds=time.perf_counter() - start,
    )
