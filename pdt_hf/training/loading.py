"""Loading the trunk, tokenizer and sidecar for data building and training from a recipe's ``model`` section."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import PDTConfig
from ..modeling import PDTForCausalLM
from ..trunk.loading import load_tokenizer, load_trunk
from .config import ModelConfig

__all__ = ["has_sliding_layers", "load_pdt_model", "load_trunk_and_tokenizer", "reuse_prefix_kv"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_trunk_and_tokenizer(
    config: ModelConfig, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """The frozen trunk (eval mode, on ``device``), its tokenizer, and the name to record in the sidecar."""
    kwargs: dict[str, object] = {"trust_remote_code": config.trust_remote_code}
    if config.dtype != "auto":
        kwargs["dtype"] = _DTYPES[config.dtype]
    if config.load_in_4bit:
        if not torch.cuda.is_available():
            raise ValueError("model.load_in_4bit needs a CUDA device (bitsandbytes); set it false on CPU.")
        from transformers import BitsAndBytesConfig

        compute = _DTYPES.get(config.dtype, torch.bfloat16)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
        index = torch.device(device).index if device is not None else torch.cuda.current_device()
        kwargs["device_map"] = {"": index or 0}
    trunk, name = load_trunk(config.name_or_path, revision=config.revision, **kwargs)
    if device is not None and not config.load_in_4bit:
        trunk = trunk.to(device)
    tokenizer = load_tokenizer(config.name_or_path, trust_remote_code=config.trust_remote_code)
    return trunk.eval(), tokenizer, name


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
