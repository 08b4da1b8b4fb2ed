"""Attention kernels of pdt-hf: note attention (training and decode) and multi-stream cascade decode.

Each kernel lives in one file with its Triton kernels, launchers and a plain PyTorch `*_ref`. The public
functions below go through `dispatch`, which runs Triton on CUDA and the reference elsewhere; `use_backend`
and the `PDT_KERNELS` environment variable override that. Importing this package needs neither Triton nor CUDA.
"""

from .dispatch import (
    BACKENDS,
    current_backend,
    note_attention,
    note_attention_decode,
    ragged_decode_attention,
    use_backend,
)
from .note_attention import note_attention_ref, note_visibility
from .note_attention_decode import note_attention_decode_ref
from .ragged_decode_attention import ragged_decode_attention_ref, sdpa_with_mask_reference

__all__ = [
    "BACKENDS",
    "current_backend",
    "note_attention",
    "note_attention_decode",
    "note_attention_decode_ref",
    "note_attention_ref",
    "note_visibility",
    "ragged_decode_attention",
    "ragged_decode_attention_ref",
    "sdpa_with_mask_reference",
    "use_backend",
]
