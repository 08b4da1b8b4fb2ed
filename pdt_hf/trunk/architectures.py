"""Trunk discovery: where a causal LM keeps its decoder stack, its decoder layers, its width and its logit head.

Design decisions:
- Discovery is generic. Most decoder-only ``*ForCausalLM`` classes in Transformers expose the decoder stack
  through ``get_decoder()`` (``model``, or ``model.language_model`` for vision-language wrappers), keep their
  layers in ``<stack>.layers`` (an ``nn.ModuleList``), and read width and depth from
  ``config.get_text_config(decoder=True)``. Every type found that way is supported; hooks go on those real layer
  objects.
- :data:`ARCHITECTURES` holds only the exceptions, keyed by ``config.model_type`` (no forked modeling files): types
  whose stack or layers live elsewhere, and types whose ``*ForCausalLM`` transforms the logits around ``lm_head``
  (gemma's tanh soft-cap, granite's ``logits_scaling``, cohere's ``logit_scale``). :func:`trunk_logits` is the one
  place hidden states become logits, so logits match the bare trunk's bit for bit.
- A trunk that cannot be served raises :class:`UnsupportedTrunkError` naming what is missing: an encoder-decoder
  config, no decoder layer list, a decoder stack that takes no ``position_ids`` (per-stream positions), layer
  types whose state is not a per-token KV cache (linear attention, mamba), or a logit transform (a config
  attribute such as ``final_logit_softcapping``) with no table entry. A layer that returns neither a tensor nor a
  tuple starting with one is refused by the hooks on its first forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "KV_LAYER_TYPES",
    "LOGIT_ATTRIBUTES",
    "TESTED_TYPES",
    "LogitHead",
    "TrunkArchitecture",
    "UnsupportedTrunkError",
    "architecture_for",
    "base_model",
    "check_trunk",
    "decoder_layers",
    "text_config",
    "trunk_dims",
    "trunk_fingerprint",
    "trunk_logits",
]


@dataclass(frozen=True)
class LogitHead:
    """What a ``*ForCausalLM`` does around its ``lm_head``; each field names a text-config attribute (None: no step).

    Applied in this order, exactly as the modeling files do: ``hidden / hidden_divide``, ``lm_head``,
    ``* multiply``, ``/ divide``, ``tanh(logits / softcap) * softcap``. A step whose attribute is None is skipped.
    """

    hidden_divide: str | None = None
    """hidden states divided before ``lm_head`` (minicpm3's ``logits_scaling``)."""
    multiply: str | None = None
    """logits multiplied (cohere's ``logit_scale``, hyperclovax's ``logits_scaling``)."""
    divide: str | None = None
    """logits divided (granite's ``logits_scaling``)."""
    softcap: str | None = None
    """tanh soft-cap of the logits (gemma2's ``final_logit_softcapping``)."""

    def __call__(self, lm_head: nn.Module, hidden: torch.Tensor, config: object) -> torch.Tensor:
        """``hidden`` ``[N, T, d]`` -> logits ``[N, T, V]``."""
        if self.hidden_divide and getattr(config, self.hidden_divide, None) is not None:
            hidden = hidden / getattr(config, self.hidden_divide)
        logits = lm_head(hidden)
        if self.multiply and getattr(config, self.multiply, None) is not None:
            logits = logits * getattr(config, self.multiply)
        if self.divide and getattr(config, self.divide, None) is not None:
            logits = logits / getattr(config, self.divide)
        cap = getattr(config, self.softcap, None) if self.softcap else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


@dataclass(frozen=True)
class TrunkArchitecture:
    """How to reach the parts of one family of causal LMs; None means "found generically"."""

    base_model: str | None = None
    """Attribute path from the causal LM to the decoder stack (None: ``trunk.get_decoder()``)."""
    decoder_layers: str | None = None
    """Attribute path from the causal LM to the ``nn.ModuleList`` of layers (None: ``<stack>.layers``)."""
    logits: LogitHead = LogitHead()
    """What the causal LM does around ``lm_head``."""
    refused: str | None = None
    """Why a type that generic discovery would accept cannot be served (None: it can)."""


_SOFTCAP = TrunkArchitecture(logits=LogitHead(softcap="final_logit_softcapping"))
_GRANITE = TrunkArchitecture(logits=LogitHead(divide="logits_scaling"))
_COHERE = TrunkArchitecture(logits=LogitHead(multiply="logit_scale"))

ARCHITECTURES: dict[str, TrunkArchitecture] = {
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "gemma2": _SOFTCAP,
    "gemma3": TrunkArchitecture(),  # Gemma3ForConditionalGeneration applies no soft-cap (its text model's does)
    "gemma3_text": _SOFTCAP,
    "granite": _GRANITE,
    "granitemoe": _GRANITE,
    "granitemoeshared": _GRANITE,
    "hyperclovax": TrunkArchitecture(logits=LogitHead(multiply="logits_scaling")),
    "minicpm3": TrunkArchitecture(logits=LogitHead(hidden_divide="logits_scaling")),
    "moshi": TrunkArchitecture(
        refused="its config has a sliding_window that its attention never applies, so per-stream masks "
        "(which honour the config) would not match the trunk"
    ),
    "vaultgemma": _SOFTCAP,
}
"""The exceptions to generic discovery, keyed by ``config.model_type``."""

KV_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
"""``config.layer_types`` entries whose state is a per-token KV cache (what the stream KV cache holds)."""

LOGIT_ATTRIBUTES = (
    "final_logit_softcapping",
    "logits_soft_cap",
    "logits_scaling",
    "logit_scale",
    "lm_head_multiplier",
)
"""Config attributes that signal a logit transform; a type without a table entry that sets one is refused."""

_GENERIC = TrunkArchitecture()


class UnsupportedTrunkError(ValueError):
    """Raised when a trunk's decoder layers, width or logit head cannot be found."""


TESTED_TYPES = (
    "gemma2",
    "gemma3",
    "gemma3_text",
    "gpt_oss",
    "granite",
    "llama",
    "mistral",
    "olmo2",
    "phi3",
    "qwen2",
    "qwen3",
    "stablelm",
)
"""Types whose identity at init and decode equivalence with ``generate`` are tested on tiny configs."""


def _refuse(model_type: str, problem: str) -> UnsupportedTrunkError:
    return UnsupportedTrunkError(
        f"model_type {model_type!r} is not supported by pdt-hf: {problem}. pdt-hf serves decoder-only causal LMs "
        "whose decoder stack (get_decoder()) holds an nn.ModuleList `layers` of layers returning a hidden-state "
        "tensor (tested: " + ", ".join(TESTED_TYPES) + "); add an entry to "
        "pdt_hf.trunk.architectures.ARCHITECTURES if its layers or logit head live elsewhere."
    )


def text_config(config: object) -> object:
    """The decoder's text config (the config itself for text-only models)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def architecture_for(config: object) -> TrunkArchitecture:
    """The table entry for ``config.model_type``, or the generic one after checking the config can be served."""
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHITECTURES:
        if ARCHITECTURES[model_type].refused is not None:
            raise _refuse(model_type, ARCHITECTURES[model_type].refused)
        return ARCHITECTURES[model_type]
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model_type, "it is an encoder-decoder model (no decoder-only stack to hook)")
    text = text_config(config)
    for name in ("hidden_size", "num_hidden_layers"):
        if not isinstance(getattr(text, name, None), int):
            raise _refuse(model_type, f"its text config has no integer `{name}`")
    other = sorted({str(t) for t in getattr(text, "layer_types", None) or ()} - KV_LAYER_TYPES)
    if other:
        raise _refuse(
            model_type,
            f"its layer_types include {other}, whose state is not a per-token KV cache the stream KV cache can hold",
        )
    transforms = [a for a in LOGIT_ATTRIBUTES if getattr(text, a, None) is not None]
    if transforms:
        raise _refuse(
            model_type,
            f"its config sets {transforms}, so its causal LM transforms the logits after lm_head in a way this "
            "table does not describe (add a LogitHead entry)",
        )
    return _GENERIC


def _get_path(obj: object, path: str) -> object:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def base_model(trunk: nn.Module) -> nn.Module:
    """The decoder stack: takes ``input_ids``, returns ``last_hidden_state`` ``[N, T, d]`` (after the final norm)."""
    arch = architecture_for(trunk.config)
    if arch.base_model is not None:
        return _get_path(trunk, arch.base_model)
    get_decoder = getattr(trunk, "get_decoder", None)
    stack = get_decoder() if get_decoder is not None else getattr(trunk, "base_model", trunk)
    if stack is None or stack is trunk:
        raise _refuse(trunk.config.model_type, f"{type(trunk).__name__}.get_decoder() finds no decoder stack")
    return stack


def decoder_layers(trunk: nn.Module) -> nn.ModuleList:
    """The trunk's real ``nn.ModuleList`` of decoder layers (never a copy)."""
    arch = architecture_for(trunk.config)
    if arch.decoder_layers is not None:
        layers, where = _get_path(trunk, arch.decoder_layers), arch.decoder_layers
    else:
        stack = base_model(trunk)
        layers, where = getattr(stack, "layers", None), f"{type(stack).__name__}.layers"
        if layers is None:
            found = [name for name, child in stack.named_children() if isinstance(child, nn.ModuleList)]
            listed = f" (its nn.ModuleLists: {', '.join(found)})" if found else ""
            raise _refuse(trunk.config.model_type, f"no decoder layer list: {where} does not exist{listed}")
    if not isinstance(layers, nn.ModuleList):
        raise _refuse(trunk.config.model_type, f"{where} is {type(layers).__name__}, not an nn.ModuleList")
    return layers


def check_trunk(trunk: nn.Module) -> None:
    """Raise :class:`UnsupportedTrunkError` unless ``trunk``'s stack, layers and logit head can all be found."""
    layers = decoder_layers(trunk)
    stack = base_model(trunk)
    if "position_ids" not in inspect.signature(stack.forward).parameters:
        raise _refuse(
            trunk.config.model_type,
            f"{type(stack).__name__}.forward takes no position_ids, and streams of different lengths each need "
            "their own positions",
        )
    head = trunk.get_output_embeddings()
    if head is None:
        raise _refuse(trunk.config.model_type, f"{type(trunk).__name__} has no output embeddings (lm_head)")
    hidden, num_layers = trunk_dims(trunk.config)
    if getattr(head, "in_features", hidden) != hidden:
        raise _refuse(
            trunk.config.model_type,
            f"its lm_head reads {head.in_features}-wide final states but its layers are hidden_size={hidden} wide "
            "(a projection after the last layer, e.g. OPT's word_embed_proj_dim)",
        )
    if len(layers) < num_layers:
        raise _refuse(
            trunk.config.model_type, f"its layer list holds {len(layers)} layers but the config says {num_layers}"
        )


def trunk_logits(trunk: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The trunk's own logits ``[N, T, V]`` for last hidden states ``[N, T, d]`` (``lm_head`` plus its transforms)."""
    head = architecture_for(trunk.config).logits
    return head(trunk.get_output_embeddings(), hidden, text_config(trunk.config))


def trunk_dims(trunk_config: object) -> tuple[int, int]:
    """``(hidden_size, num_layers)`` of the decoder, read from the text config."""
    architecture_for(trunk_config)
    text = text_config(trunk_config)
    return text.hidden_size, text.num_hidden_layers


def trunk_fingerprint(trunk_config: object) -> dict[str, object]:
    """Fields a sidecar checkpoint must match to load onto a trunk."""
    hidden, layers = trunk_dims(trunk_config)
    return {
        "model_type": trunk_config.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "vocab_size": text_config(trunk_config).vocab_size,
    }
