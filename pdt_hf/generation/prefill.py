"""Prefill of the streams' suffixes (their plan items) with sidecars, after the shared prefix is in the cache.

Two paths with the same result (``tests/test_decode_fast_path.py``: generate, fast against reference):

    grouped (reference)  one forward per distinct suffix length, streams of that length together
    padded (fast)        every suffix in one forward, right-padded to the longest, the padding rolled back

Both return the next-token logits ``[K, V]`` at each stream's last suffix token and the planner notes
``[K, d_note]`` from the suffix states (snapshot 0 of the bus).
"""

from __future__ import annotations

import torch

from ..stream_kv import StreamKVCache
from ..stream_kv.masks import trunk_step_masks
from ..trunk.architectures import trunk_logits

__all__ = ["prefill_suffixes_grouped", "prefill_suffixes_padded"]


@torch.no_grad()
def prefill_suffixes_grouped(model, cache: StreamKVCache, suffixes: list[list[int]], device: torch.device):
    """Reference: one forward per distinct suffix length. Returns next logits [K, V] and planner notes."""
    k = len(suffixes)
    logits: list[torch.Tensor | None] = [None] * k
    notes: list[torch.Tensor | None] = [None] * k
    for length in sorted({len(x) for x in suffixes}):
        group = [i for i, x in enumerate(suffixes) if len(x) == length]
        streams = torch.tensor(group, device=device)
        ids = torch.tensor([suffixes[i] for i in group], device=device)  # [G, length]
        with cache.step(streams, length) as kw:
            kw = trunk_step_masks(model.trunk.config, kw)
            out = model(input_ids=ids, stream_ids=streams, cache=cache, compute_heads=False, **kw)
        planner = model.sidecar.heads.planner(out.hidden_states, None, streams)  # [G, d_note]
        for j, i in enumerate(group):
            logits[i], notes[i] = out.logits[j, -1], planner[j]
    return torch.stack(logits), torch.stack(notes)


@torch.no_grad()
def prefill_suffixes_padded(model, cache: StreamKVCache, suffixes: list[list[int]], device: torch.device):
    """Fast: every suffix in one forward, right-padded to the longest; the padding is then rolled back.

    Padding sits after each stream's real tokens, so causal attention keeps it out of them; a rollback of the
    padded count (O(1), at most L tokens) leaves its K/V stale and masked. Logits are computed only at each
    stream's last real token, not over the whole suffix. Returns next logits [K, V] and planner notes.
    """
    k = len(suffixes)
    width = max(len(x) for x in suffixes)
    lengths = torch.tensor([len(x) for x in suffixes], device=device)  # [K]
    ids = torch.tensor([x + [x[-1]] * (width - len(x)) for x in suffixes], device=device)  # [K, width]
    streams = torch.arange(k, device=device)
    with cache.step(streams, width) as kw:
        kw = trunk_step_masks(model.trunk.config, kw)
        out = model(input_ids=ids, stream_ids=streams, cache=cache, compute_heads=False, logits_to_keep=1, **kw)
    for i, x in enumerate(suffixes):
        cache.rollback(i, width - len(x))
    real = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [K, width]
    notes = model.sidecar.heads.planner(out.hidden_states, real, streams)  # [K, d_note]
    last = out.hidden_states[streams, lengths - 1]  # [K, d], each stream's last real token
    return trunk_logits(model.trunk, last[:, None])[:, 0], notes
