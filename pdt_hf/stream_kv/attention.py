"""Fast path for multi-stream decode: cascade attention that reads the shared prompt prefix once per step.

Design decisions:
- The path is an attention implementation registered with transformers' ``AttentionInterface`` (and a matching
  entry in ``AttentionMaskInterface``) under ``STREAM_ATTENTION``; the trunk switches to it through
  ``model.set_attn_implementation``, so no modeling file is forked and no module is replaced.
- ``stream_attention(model, cache)`` is the only way in: it switches the trunk, marks the cache for ragged
  decode and always restores the previous implementation (``finally``), even when the forward raises.
- Only single-token steps of a ``StreamKVCache`` take the kernel: there ``StreamKVCache.update`` returns just
  the stepped streams' suffix rows and this function calls ``pdt_kernels.ragged_decode_attention`` with the
  layer's prefix [Hkv, P, D] and the suffix lengths (log-sum-exp merge of prefix and suffix parts). Every other
  call (prompt prefill, T > 1 steps) goes to the implementation the trunk had before (``sdpa`` or ``eager``).
- The cache reaches the attention function through a context variable set by ``stream_attention`` (attention
  functions only see the attention module and tensors).
- ``pdt_kernels`` is imported when the context is entered, not when this module is: it dispatches to Triton on
  CUDA and to its PyTorch reference elsewhere, so on CPU the fast path is the exact reference computation.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..trunk.architectures import text_config
from .cache import StreamKVCache

__all__ = ["STREAM_ATTENTION", "stream_attention", "stream_attention_forward"]

STREAM_ATTENTION = "pdt_stream_kv"
"""Name of the attention implementation registered by this module."""

_DELEGATES = ("sdpa", "eager")


@dataclass(frozen=True)
class _Active:
    cache: StreamKVCache
    delegate: str
    kernel: Callable[..., torch.Tensor]


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("pdt_stream_kv_attention", default=None)


def _generic_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention ([B, Hq, T, D] queries, [B, Hkv, S, D] keys, additive mask) for trunks without their own."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
    value = value.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, Hq, T, S]
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights  # [B, T, Hq, D]


def _delegate_fn(name: str, module: torch.nn.Module) -> Callable:
    if name == "eager":
        # The trunk's own eager function (the one its modeling file would call), else a generic one.
        return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", _generic_eager)
    return ALL_ATTENTION_FUNCTIONS[name]


def stream_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention for ``STREAM_ATTENTION``: query [A, Hq, T, D] -> ([A, T, Hq, D], weights or None).

    On a ragged single-token step of the active ``StreamKVCache``, ``key``/``value`` are the stepped streams' suffix
    rows [A, Hkv, S_step, D] and the prefix comes from the cache; otherwise everything is passed to the delegate.
    """
    active = _ACTIVE.get()
    if active is None:
        raise RuntimeError(
            f"attn_implementation={STREAM_ATTENTION!r} is only valid inside pdt_hf.stream_kv.stream_attention(model, "
            "cache); outside it, set the trunk back to 'sdpa' or 'eager'."
        )
    step = active.cache.current_step
    if step is not None and step.ragged and query.shape[2] == 1:
        layer = active.cache.layers[module.layer_idx]
        out = active.kernel(
            query[:, :, 0],  # [A, Hq, D]
            layer.prefix_keys[0],  # [Hkv, P, D]
            layer.prefix_values[0],
            key,  # [A, Hkv, S_step, D]
            value,
            step.lengths + 1,  # [A], committed suffix plus the token just written
            scaling,
        )
        return out[:, None], None  # [A, 1, Hq, D]
    fn = _delegate_fn(active.delegate, module)
    return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _stream_mask(*args, **kwargs):
    """Mask factory for ``STREAM_ATTENTION``: the delegate's (``sdpa_mask`` or ``eager_mask``)."""
    active = _ACTIVE.get()
    return ALL_MASK_ATTENTION_FUNCTIONS[active.delegate if active is not None else "sdpa"](*args, **kwargs)


def _register() -> None:
    if STREAM_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(STREAM_ATTENTION, stream_attention_forward)
        AttentionMaskInterface.register(STREAM_ATTENTION, _stream_mask)


@contextmanager
def stream_attention(model: torch.nn.Module, cache: StreamKVCache) -> Iterator[StreamKVCache]:
    """Within the block, single-token steps of ``cache`` use the cascade kernel; other forwards are unchanged.

    Args:
        model: the trunk (a transformers ``PreTrainedModel`` using ``sdpa`` or ``eager`` attention).
        cache: the ``StreamKVCache`` the steps run on.

    Example::

        with stream_attention(trunk, cache):
            with cache.step(streams, 1) as kw:
                logits = trunk(input_ids, cache=cache, **kw).logits
    """
    if not isinstance(cache, StreamKVCache):
        raise TypeError(f"cache must be a StreamKVCache, got {type(cache).__name__}.")
    softcap = getattr(text_config(model.config), "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(
            f"the cascade decode kernel has no attention soft-capping, but this trunk soft-caps its attention "
            f"logits (attn_logit_softcapping={softcap}); decode on the simple path (fast_attention=False)."
        )
    previous = model.config._attn_implementation
    if previous not in _DELEGATES:
        raise ValueError(
            f"stream_attention needs a trunk with attn_implementation 'sdpa' or 'eager', got {previous!r}; "
            "call model.set_attn_implementation('sdpa') first."
        )
    try:
        from pdt_kernels import ragged_decode_attention
    except ImportError as err:
        raise ImportError(
            f"the fast stream KV path needs the pdt_kernels package ({err}); install pdt-hf with its kernels "
            "(pip install -e .) or decode on the simple path without stream_attention."
        ) from err
    _register()
    token = _ACTIVE.set(_Active(cache=cache, delegate=previous, kernel=ragged_decode_attention))
    was_ragged = cache.ragged_decode
    try:
        model.set_attn_implementation(STREAM_ATTENTION)
        cache.ragged_decode = True
        yield cache
    finally:
        cache.ragged_decode = was_ragged
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)
