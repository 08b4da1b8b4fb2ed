"""PEFT trunks: a LoRA-tuned causal LM (a ``PeftModel``, an adapter directory or Hub id, or a merged LoRA) as trunk.

Design decisions:
- The trunk the sidecars hook is the PEFT model's transformers model (``get_base_model()``): the same decoder
  layers, with the adapter's layers injected into their linear modules. Discovery, hooks, the stream KV cache and
  ``trunk.generate`` therefore all run with the adapter active, and ``PDTForCausalLM`` freezes the LoRA weights
  with the rest of the trunk. A merged LoRA (``merge_and_unload()``) is a plain model and needs nothing here.
- Only adapters that live inside the layers are accepted. Prompt-learning methods (prompt, prefix, p-tuning) act in
  ``PeftModel.forward``, which pdt-hf bypasses (it runs the decoder stack itself), so they are refused.
- The adapter is recorded in ``PDTConfig.trunk_adapter`` (:func:`adapter_record`): PEFT type, adapter path or Hub
  id and revision, adapter name, and whether it was merged. ``base_model_name_or_path`` / ``revision`` keep naming
  the base weights the adapter sits on, so ``from_pretrained(None, sidecar=dir)`` loads the base through the normal
  loader, then the adapter (:func:`load_peft_trunk`), and merges it again if it was merged.
- peft is optional: it is imported only when an adapter has to be loaded, and a missing install names
  ``pip install 'pdt-hf[peft]'``. Recognising a ``PeftModel`` never imports it (a user holding one has it loaded).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from .architectures import UnsupportedTrunkError
from .loading import is_embedded

__all__ = [
    "ADAPTER_CONFIG",
    "PeftTrunk",
    "adapter_record",
    "find_adapter",
    "is_peft_model",
    "load_peft_trunk",
    "reload_peft_trunk",
    "require_peft",
    "unwrap_peft",
]

ADAPTER_CONFIG = "adapter_config.json"


def require_peft(what: str) -> Any:
    """Import and return ``peft``, or raise an ImportError naming ``what`` needed it and the install command."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            f"{what} needs the peft package, which is not installed; run `pip install 'pdt-hf[peft]'`."
        ) from err
    return peft


def is_peft_model(obj: object) -> bool:
    """Whether ``obj`` is a ``peft.PeftModel`` (checked without importing peft)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(obj, peft.PeftModel)


def find_adapter(name_or_path: str | os.PathLike | None, revision: str | None = None) -> str | None:
    """``name_or_path`` if it names a PEFT adapter (a directory, or a cached or reachable Hub repo, holding
    ``adapter_config.json``), else None."""
    if name_or_path is None:
        return None
    name = os.fspath(name_or_path)
    if is_embedded(name):  # the embedded trunk is a GGUF file, never an adapter: no Hub lookup (offline stall)
        return None
    if os.path.isdir(name):
        return name if os.path.isfile(os.path.join(name, ADAPTER_CONFIG)) else None
    if os.path.exists(name) or name.count("/") > 1:
        return None
    from transformers.utils import find_adapter_config_file

    try:
        return name if find_adapter_config_file(name, revision=revision) is not None else None
    except (OSError, ValueError):
        return None


def _merged(model: nn.Module) -> bool:
    return any(getattr(m, "merged", False) is True for m in model.modules() if hasattr(m, "merged_adapters"))


def adapter_record(
    peft_model: nn.Module, name_or_path: str | None, revision: str | None = None, merged: bool | None = None
) -> dict[str, Any]:
    """The ``PDTConfig.trunk_adapter`` entry for ``peft_model``'s active adapter.

    ``name_or_path`` and ``revision`` say where the adapter was loaded from (None for one built in memory); the
    base it sits on is the sidecar config's ``base_model_name_or_path`` / ``revision``.
    """
    adapter_name = peft_model.active_adapter
    config = peft_model.peft_config[adapter_name]
    return {
        "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "name_or_path": name_or_path,
        "revision": revision,
        "adapter_name": adapter_name,
        "merged": _merged(peft_model) if merged is None else merged,
    }


def unwrap_peft(peft_model: nn.Module, name_or_path: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The transformers model under ``peft_model`` (adapter layers inside it) and its :func:`adapter_record`."""
    adapter_name = peft_model.active_adapter
    if not isinstance(adapter_name, str):
        raise UnsupportedTrunkError(
            f"the PEFT trunk has several active adapters {list(adapter_name)}; pdt-hf records one: call "
            "peft_model.set_adapter(name) (or merge them with add_weighted_adapter) before attaching sidecars."
        )
    config = peft_model.peft_config[adapter_name]
    if getattr(config, "is_prompt_learning", False):
        raise UnsupportedTrunkError(
            f"the PEFT adapter {adapter_name!r} is {config.peft_type} (prompt learning), which acts in "
            "PeftModel.forward; pdt-hf runs the decoder stack itself and would skip it. Use an adapter injected "
            "into the layers (LoRA and other tuners), or a merged one (merge_and_unload())."
        )
    return peft_model.get_base_model(), adapter_record(peft_model, name_or_path)


@dataclass
class PeftTrunk:
    """What :func:`load_peft_trunk` loaded."""

    trunk: nn.Module
    """A ``PeftModel``, or the plain model a merge gave."""
    base_name: str
    """The base's name as the loader returned it (recorded as ``PDTConfig.base_model_name_or_path``)."""
    base_revision: str | None
    record: dict[str, Any]
    """The ``PDTConfig.trunk_adapter`` entry."""
    tokenizer_source: str
    """The adapter when it ships a tokenizer, else the base."""


def load_peft_trunk(
    adapter: str | os.PathLike,
    *,
    revision: str | None = None,
    base_model_name_or_path: str | None = None,
    base_revision: str | None = None,
    merge: bool = False,
    **trunk_kwargs: object,
) -> PeftTrunk:
    """Load ``adapter``'s base through the normal loader, then the adapter on it (merged when ``merge``).

    Args:
        adapter: directory or Hub id holding ``adapter_config.json``; revision: the adapter's revision.
        base_model_name_or_path, base_revision: the base to load instead of the one ``adapter_config.json``
            names (a sidecar's base pointer).
        trunk_kwargs: passed to the base's ``from_pretrained`` (``dtype``, ...).
    """
    from .loading import load_trunk

    peft = require_peft(f"loading the PEFT adapter {os.fspath(adapter)!r}")
    name = os.fspath(adapter)
    config = peft.PeftConfig.from_pretrained(name, revision=revision)
    base_name = base_model_name_or_path or config.base_model_name_or_path
    if base_name is None:
        raise ValueError(
            f"the PEFT adapter {name!r} does not name its base model (base_model_name_or_path is empty in its "
            f"{ADAPTER_CONFIG}); load the base yourself and pass PeftModel.from_pretrained(base, {name!r})."
        )
    base_revision = base_revision if base_model_name_or_path else getattr(config, "revision", None)
    base, base_name = load_trunk(base_name, revision=base_revision, **trunk_kwargs)
    peft_model = peft.PeftModel.from_pretrained(base, name, revision=revision)
    unwrap_peft(peft_model)  # refuses prompt learning and several active adapters before anything is merged
    record = adapter_record(peft_model, name, revision, merged=merge)
    trunk = peft_model.merge_and_unload() if merge else peft_model
    has_tokenizer = os.path.isfile(os.path.join(name, "tokenizer_config.json"))
    return PeftTrunk(trunk, base_name, base_revision, record, name if has_tokenizer else base_name)


def reload_peft_trunk(
    record: dict[str, Any],
    base_model_name_or_path: str | None,
    base_revision: str | None,
    *,
    merge: bool,
    sidecar: str | os.PathLike | None = None,
    **trunk_kwargs: object,
) -> PeftTrunk:
    """Rebuild the trunk a sidecar config recorded: ``base_model_name_or_path``, then the adapter of ``record``."""
    if record.get("name_or_path") is None:
        where = f"the sidecar in {os.fspath(sidecar)!r}" if sidecar is not None else "this sidecar"
        raise ValueError(
            f"{where} was attached to a PEFT model built in memory, so its adapter has no path to reload; pass "
            "that model (PDTForCausalLM.from_pretrained(peft_model, sidecar=...)), or save its adapter "
            "(peft_model.save_pretrained(dir)) and pass PDTForCausalLM.from_pretrained(dir, sidecar=...)."
        )
    return load_peft_trunk(
        record["name_or_path"],
        revision=record.get("revision"),
        base_model_name_or_path=base_model_name_or_path,
        base_revision=base_revision,
        merge=merge,
        **trunk_kwargs,
    )
