"""Step masks for trunks with sliding-window layers: ``StreamKVCache.begin_step`` kwargs adapted to the trunk."""

from __future__ import annotations

import torch

from ..trunk.architectures import text_config


def sliding_window_of(config) -> int | None:
    """The trunk's attention window if any of its layers is sliding, else None (read from the text config)."""
    config = text_config(config)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def trunk_step_masks(config, step_kwargs: dict) -> dict:
    """Adapt ``StreamKVCache.begin_step`` kwargs to trunks with sliding-window layers.

    Key index j of the step's mask ``[A, 1, T, P + S]`` holds position j (prefix slot j, or suffix slot j - P at
    position P + j - P), so the window test is ``j > q_pos - window`` as in transformers. Trunks with
    ``layer_types`` take a dict of masks keyed by layer type; others (Mistral) take the windowed mask itself.
    """
    window = sliding_window_of(config)
    if window is None:
        return step_kwargs
    mask, positions = step_kwargs["attention_mask"], step_kwargs["position_ids"]  # [A,1,T,KV], [A,T]
    key_pos = torch.arange(mask.shape[-1], device=mask.device)  # [KV]
    too_far = key_pos[None, None, :] <= positions[:, :, None] - window  # [A, T, KV]
    fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    sliding = mask.masked_fill(too_far[:, None], fill)
    if getattr(text_config(config), "layer_types", None) is not None:
        return {**step_kwargs, "attention_mask": {"full_attention": mask, "sliding_attention": sliding}}
    return {**step_kwargs, "attention_mask": sliding}
