"""The one place that chooses between the Triton kernels and the PyTorch references.

Rule: "auto" (the default) runs Triton when Triton imports and the inputs live on a CUDA device, and the
reference everywhere else. Tests and benchmarks override it with the `PDT_KERNELS` environment variable or,
scoped and thread/task-local, with `use_backend(...)`, which wins over the variable:

    backend      CUDA inputs       CPU inputs
    auto         Triton            reference
    triton       Triton            Triton (needs TRITON_INTERPRET=1 set before the first import of Triton)
    reference    reference         reference

Forcing "triton" where it cannot run is an error, never a silent fallback, so a test that asks for the
kernel really exercises it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from ._triton import HAS_TRITON, INTERPRET
from .note_attention import note_attention_ref, note_attention_triton
from .note_attention_decode import note_attention_decode_ref, note_attention_decode_triton
from .ragged_decode_attention import ragged_decode_attention_ref, ragged_decode_attention_triton

__all__ = ["BACKENDS", "current_backend", "note_attention", "note_attention_decode", "ragged_decode_attention",
           "use_backend"]  # fmt: skip

BACKENDS = ("auto", "triton", "reference")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("pdt_kernels_backend", default=None)


def _validate(backend: str, source: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    return backend


def current_backend() -> str:
    """The requested backend: the innermost `use_backend`, else `$PDT_KERNELS`, else "auto"."""
    override = _override.get()
    if override is not None:
        return override
    return _validate(os.environ.get("PDT_KERNELS", "auto").strip().lower() or "auto", "$PDT_KERNELS")


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """Within the block, run kernels with `backend` ("auto", "triton" or "reference")."""
    token = _override.set(_validate(backend, "use_backend(backend)"))
    try:
        yield
    finally:
        _override.reset(token)


def _use_triton(device: torch.device) -> bool:
    backend = current_backend()
    if backend == "reference":
        return False
    if backend == "auto":
        return HAS_TRITON and device.type == "cuda"
    if not HAS_TRITON:
        raise RuntimeError(
            "The 'triton' kernel backend was requested but Triton is not installed: pip install triton."
        )
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"The 'triton' kernel backend was requested for {device.type} tensors; that needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 before importing pdt_kernels, or use the 'reference' backend."
        )
    return True


def note_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_round: torch.Tensor,
    kv_round: torch.Tensor,
    kv_valid: torch.Tensor,
    lag: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Training/prefill note attention, q [N, H, T, D] over notes k, v [N, H, M, D] -> [N, H, T, D].

    Query t sees note m iff kv_valid[n, m] and kv_round[n, m] <= q_round[n, t] - lag; rows that see nothing are
    exactly 0 with zero gradients. Differentiable w.r.t. q, k and v. See `note_attention_ref` for details.
    """
    fn = note_attention_triton if _use_triton(q.device) else note_attention_ref
    return fn(q, k, v, q_round, kv_round, kv_valid, lag, scale)


def note_attention_decode(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Decode note attention, q [R, H, D] over CSR-selected rows of k_store, v_store [C, H, D] -> [R, H, D].

    Row r reads store rows indices[offsets[r]:offsets[r + 1]]; empty rows are exactly 0. Forward only. See
    `note_attention_decode_ref` for details.
    """
    fn = note_attention_decode_triton if _use_triton(q.device) else note_attention_decode_ref
    return fn(q, k_store, v_store, indices, offsets, scale)


def ragged_decode_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-stream decode attention, q [K, Hq, D] over a shared prefix [Hkv, P, D] and per-stream suffixes
    [K, Hkv, S_max, D] of lengths suffix_lens [K] -> [K, Hq, D]. Forward only. See
    `ragged_decode_attention_ref` for details.
    """
    fn = ragged_decode_attention_triton if _use_triton(q.device) else ragged_decode_attention_ref
    return fn(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens, scale)
