"""Loading the trunk, tokenizer and sidecar for data building and training from a recipe's ``model`` section.

Design decisions:
- ``model.load_in_4bit`` loads the trunk as bitsandbytes NF4 ``Linear4bit`` layers on CPU or CUDA; the
  device comes from ``device`` (default: the current CUDA device when there is one, else the CPU) through
  ``device_map``, since a quantised model is placed while it loads, not moved afterwards.
- The 4-bit compute dtype is ``model.dtype`` (also the dtype of the layers left unquantised); ``auto``
  means bfloat16 on CUDA and float32 on CPU, where bfloat16 matmuls are slow and save no memory that matters.
- bitsandbytes stays optional (the ``bnb`` extra); without it ``load_in_4bit`` names the install command.
- The 4-bit layers are pinned to their lossless, differentiable layout (:mod:`pdt_hf.trunk.quantized`).
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import PDTConfig
from ..modeling import PDTForCausalLM
from ..trunk.architectures import text_config
from ..trunk.loading import load_tokenizer, load_trunk
from ..trunk.quantized import pin_4bit_layout
from .config import ModelConfig

__all__ = ["has_sliding_layers", "load_pdt_model", "load_trunk_and_tokenizer", "reuse_prefix_kv"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_trunk_and_tokenizer(
    config: ModelConfig, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The frozen trunk (eval mode, on ``device``), its tokenizer, and the name to record in the sidecar.

    With ``config.load_in_4bit`` the trunk's linear layers are NF4 ``bitsandbytes.nn.Linear4bit`` on CPU or
    CUDA; ``device=None`` then means the current CUDA device if there is one, else the CPU.
    """
    kwargs: dict[str, object] = {"trust_remote_code": config.trust_remote_code}
    if config.dtype != "auto":
        kwargs["dtype"] = _DTYPES[config.dtype]
    if config.load_in_4bit:
        kwargs.update(_four_bit_kwargs(config.dtype, device))
    trunk, name = load_trunk(config.name_or_path, revision=config.revision, **kwargs)
    if config.load_in_4bit:
        pin_4bit_layout(trunk)  # before any forward: bitsandbytes' CPU inference path rewrites layers in place
    elif device is not None:
        trunk = trunk.to(device)
    tokenizer = load_tokenizer(config.name_or_path, trust_remote_code=config.trust_remote_code)
    return trunk.eval(), tokenizer, name


def _four_bit_kwargs(dtype: str, device: torch.device | str | None) -> dict[str, object]:
    """``from_pretrained`` kwargs for an NF4 trunk placed on ``device`` (CPU or CUDA) while it loads."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "model.load_in_4bit needs bitsandbytes, which is not installed; run `pip install pdt-hf[bnb]` "
            "or set model.load_in_4bit=false."
        )
    from transformers import BitsAndBytesConfig

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"model.load_in_4bit runs on cpu or cuda devices, got {device}; pass one of those.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype == "auto":
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        compute = _DTYPES[dtype]
    return {
        "dtype": compute,
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        ),
        "device_map": {"": device.index if device.type == "cuda" else "cpu"},
    }


def load_pdt_model(
    trunk: PreTrainedModel, pdt: PDTConfig, name: str | None, revision: str | None, sidecar_dtype: str = "float32"
) -> PDTForCausalLM:
    """Attach a fresh sidecar (weights in ``sidecar_dtype``) to ``trunk``; the trunk stays frozen."""
    pdt = PDTConfig.from_dict(pdt.to_dict())
    if pdt.base_model_name_or_path is None:
        pdt.base_model_name_or_path = name
        pdt.revision = revision
    model = PDTForCausalLM(trunk, pdt)
    model.sidecar.to(_DTYPES[sidecar_dtype])
    return model


def has_sliding_layers(trunk_config: object) -> bool:
    """Whether any decoder layer uses sliding-window attention (then a left-padded prefix cache is inexact)."""
    trunk_config = text_config(trunk_config)
    layer_types = getattr(trunk_config, "layer_types", None)
    if layer_types:
        return any("sliding" in str(t) for t in layer_types)
    return bool(getattr(trunk_config, "sliding_window", None)) and bool(
        getattr(trunk_config, "use_sliding_window", True)
    )


def reuse_prefix_kv(config: ModelConfig, trunk_config: object) -> bool:
    """Resolve ``model.reuse_prefix_kv`` (auto -> on unless checkpointing or sliding-window layers)."""
    if config.reuse_prefix_kv == "auto":
        return not config.gradient_checkpointing and not has_sliding_layers(trunk_config)
    if config.reuse_prefix_kv and has_sliding_layers(trunk_config):
        raise ValueError(
            "model.reuse_prefix_kv=true is inexact on a trunk with sliding-window layers; set it to auto or false."
        )
    return bool(config.reuse_prefix_kv)
