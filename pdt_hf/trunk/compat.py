"""The one place that knows how the supported transformers releases differ.

transformers 5.24 renamed the cache argument of every model forward and the cache field of every ``ModelOutput``
from ``past_key_values`` to ``cache`` (the old keyword still works, with a deprecation warning, until 5.40).
Everything in pdt-hf that hands a cache to a trunk or reads one back goes through this module, so a release that
renames it again changes one line:

- :data:`CACHE_ARG` is the keyword the installed release's forwards take, read off a real forward signature.
- :func:`cache_kwargs` builds ``{CACHE_ARG: cache}`` for a trunk call; :func:`output_cache` reads the cache back
  from whatever output class the trunk returned.
- :func:`pop_cache_arg` lets pdt-hf's own forwards take either spelling, as transformers' own forwards do.
- :func:`enable_checkpointing`: 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
  (the old name warns and goes in 6.0).
"""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaModel

__all__ = [
    "CACHE_ARG",
    "LEGACY_CACHE_ARG",
    "cache_kwargs",
    "disable_checkpointing",
    "enable_checkpointing",
    "output_cache",
    "pop_cache_arg",
]

LEGACY_CACHE_ARG = "past_key_values"
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else LEGACY_CACHE_ARG
"""``"cache"`` on transformers >= 5.24, ``"past_key_values"`` before."""


def cache_kwargs(cache: object) -> dict[str, object]:
    """``{CACHE_ARG: cache}``, to splat into a trunk forward."""
    return {CACHE_ARG: cache}


def output_cache(outputs: object) -> object | None:
    """The cache a trunk forward returned (``outputs.cache``, or ``outputs.past_key_values`` before 5.24)."""
    return getattr(outputs, CACHE_ARG, None)


def pop_cache_arg(cache: object | None, kwargs: dict) -> object | None:
    """Resolve a forward's ``cache`` argument and its legacy ``past_key_values`` spelling (popped from ``kwargs``)."""
    legacy = kwargs.pop(LEGACY_CACHE_ARG, None)
    if legacy is not None and cache is not None:
        raise ValueError("pass the cache once: `cache=` or its older name `past_key_values=`, not both.")
    return cache if cache is not None else legacy


def enable_checkpointing(trunk: object, kwargs: dict | None = None) -> None:
    """Turn on the trunk's activation (gradient) checkpointing with ``kwargs`` for ``torch.utils.checkpoint``."""
    if hasattr(trunk, "activation_checkpointing_enable"):
        trunk.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        trunk.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(trunk: object) -> None:
    """Turn the trunk's activation checkpointing off again."""
    if hasattr(trunk, "activation_checkpointing_disable"):
        trunk.activation_checkpointing_disable()
    else:
        trunk.gradient_checkpointing_disable()
