"""4-bit (bitsandbytes NF4) trunks: keep every ``Linear4bit`` on its lossless, differentiable layout.

Design decisions:
- bitsandbytes (0.50 here) has a fused bfloat16 CPU inference kernel for ``Linear4bit`` on CPUs with AVX512-BF16.
  The first forward in eval mode whose input needs no gradient *rewrites the layer in place* for it: the packed
  weights are re-laid out and the per-block scales (``absmax``) are rounded from float32 to bfloat16. Two
  consequences break what pdt-hf promises:

  - the trunk changes: ``state_dict`` converts back, but the scales stay rounded, so the trunk's bytes (and
    its logits) differ from what was loaded;
  - gradients stop: a rewritten layer runs ``bitsandbytes::gemv_4bit``, which has no backward, so a later
    forward with gradients (training the sidecars, with the trunk in eval mode) silently gets no gradient
    through any 4-bit layer.

- :func:`pin_4bit_layout` therefore turns that path off for every ``Linear4bit`` of a trunk (the layers
  then dequantise and matmul in their compute dtype, as on a CPU without AVX512-BF16, with backward), and
  converts back any layer already rewritten (its scales stay rounded: that loss happened before).
  The price is CPU 4-bit inference speed: the fused kernel was 6-20x faster per layer (see docs/training.md).
- bitsandbytes stays optional: a trunk can only hold ``Linear4bit`` layers if bitsandbytes is already
  imported, so nothing here imports it.
"""

from __future__ import annotations

import sys
import warnings

from torch import nn

__all__ = ["is_packed_for_cpu", "pin_4bit_layout"]


def is_packed_for_cpu(module: nn.Module) -> bool:
    """Whether a ``Linear4bit`` has been rewritten for bitsandbytes' fused CPU inference kernel."""
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


def pin_4bit_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` in ``model`` off the in-place CPU rewrite; returns how many there are.

    A layer already rewritten is converted back (warning once, naming how many), so that gradients flow again.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    rewritten = 0
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        if is_packed_for_cpu(layer):
            inverse = bnb.functional._convert_weight_packed_for_cpu_inverse
            layer.weight.data, layer.weight.quant_state = inverse(layer.weight.data, layer.weight.quant_state)
            rewritten += 1
    if rewritten:
        warnings.warn(
            f"{rewritten} of {len(layers)} 4-bit layers had been rewritten by bitsandbytes' CPU inference kernel "
            "(scales rounded to bfloat16) before pdt-hf saw the trunk; they were converted back, the rounding "
            "stays. Attach the sidecar (or call pdt_hf.trunk.quantized.pin_4bit_layout) before the first forward.",
            stacklevel=2,
        )
    return len(layers)
