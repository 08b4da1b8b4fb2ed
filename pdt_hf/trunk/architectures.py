"""Architecture table: where each supported trunk keeps its decoder layers.

Architecture differences live in this one table keyed by ``config.model_type``
(no forked modeling files). Every entry names the attribute path from the
``*ForCausalLM`` object to its base model and to the ``nn.ModuleList`` of
decoder layers, so hooks are registered on the model's real layer objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TrunkArchitecture:
    """How to reach the parts of one family of causal LMs."""

    base_model: str = "model"
    """Attribute path from the causal LM to the base decoder model."""
    decoder_layers: str = "model.layers"
    """Attribute path from the causal LM to the ``nn.ModuleList`` of decoder layers."""
    hidden_size: str = "hidden_size"
    """Config attribute holding the residual width."""
    num_layers: str = "num_hidden_layers"
    """Config attribute holding the number of decoder layers."""


ARCHITECTURES: dict[str, TrunkArchitecture] = {
    "gpt_oss": TrunkArchitecture(),
    "llama": TrunkArchitecture(),
    "mistral": TrunkArchitecture(),
    "qwen2": TrunkArchitecture(),
    "qwen3": TrunkArchitecture(),
}


class UnsupportedTrunkError(ValueError):
    """Raised when a trunk's ``model_type`` has no entry in :data:`ARCHITECTURES`."""


def architecture_for(model_type: str) -> TrunkArchitecture:
    """Return the table entry for ``model_type`` or raise naming the supported types."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedTrunkError(
            f"model_type {model_type!r} is not supported by pdt-hf; supported types are: {supported}. "
            "Add an entry to pdt_hf.trunk.architectures.ARCHITECTURES if its decoder layers live elsewhere."
        ) from None


def _get_path(obj: object, path: str) -> object:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def decoder_layers(trunk: nn.Module) -> nn.ModuleList:
    """The trunk's real ``nn.ModuleList`` of decoder layers (never a copy)."""
    arch = architecture_for(trunk.config.model_type)
    layers = _get_path(trunk, arch.decoder_layers)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{arch.decoder_layers} of {type(trunk).__name__} is {type(layers).__name__}, not nn.ModuleList"
        )
    return layers


def base_model(trunk: nn.Module) -> nn.Module:
    """The decoder stack that returns ``last_hidden_state`` (after the final norm)."""
    return _get_path(trunk, architecture_for(trunk.config.model_type).base_model)


def trunk_dims(trunk_config: object) -> tuple[int, int]:
    """``(hidden_size, num_layers)`` read through the table."""
    arch = architecture_for(trunk_config.model_type)
    return getattr(trunk_config, arch.hidden_size), getattr(trunk_config, arch.num_layers)


def trunk_fingerprint(trunk_config: object) -> dict[str, object]:
    """Fields a sidecar checkpoint must match to load onto a trunk."""
    hidden, layers = trunk_dims(trunk_config)
    return {
        "model_type": trunk_config.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "vocab_size": trunk_config.vocab_size,
    }
