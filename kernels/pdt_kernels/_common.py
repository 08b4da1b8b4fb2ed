"""Input checks and small helpers shared by the kernel entry points.

Every public kernel validates shapes, dtypes and devices before choosing a backend, so the Triton kernels and
the PyTorch references reject the same inputs with the same message. Checks never read tensor values (that
would force a host-device sync on every decode step); value contracts such as monotone CSR offsets are stated
in the docstrings instead.
"""

from __future__ import annotations

import torch

__all__ = [
    "check_float",
    "check_index",
    "check_rank",
    "check_same_device",
    "check_size",
    "resolve_scale",
    "softmax_dtype",
]


def check_rank(name: str, tensor: torch.Tensor, rank: int, layout: str) -> None:
    """Raise ValueError unless `tensor` is a tensor with `rank` dimensions (`layout` names them, e.g. "[N, H, T, D]")."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}.")
    if tensor.dim() != rank:
        raise ValueError(f"{name} must have shape {layout} ({rank} dims), got {tuple(tensor.shape)}; reshape it.")


def check_size(name: str, tensor: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    """Raise ValueError unless `tensor.shape[dim] == expected` (`meaning` says where `expected` comes from)."""
    if tensor.shape[dim] != expected:
        raise ValueError(
            f"{name} has size {tensor.shape[dim]} in dim {dim} (shape {tuple(tensor.shape)}), expected {expected} "
            f"to match {meaning}."
        )


def check_float(reference: str, *named: tuple[str, torch.Tensor]) -> None:
    """Raise ValueError unless every tensor is floating point with the dtype of the first one."""
    dtype = named[0][1].dtype
    if not dtype.is_floating_point:
        raise ValueError(f"{named[0][0]} must be a floating-point tensor, got {dtype}; cast it with .float().")
    for name, tensor in named[1:]:
        if tensor.dtype != dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype} but {reference} is {dtype}; cast it with .to({dtype}).")


def check_index(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise ValueError unless `tensor` has one of the `allowed` integer (or bool) dtypes."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(
            f"{name} must have dtype in ({names}), got {tensor.dtype}; convert it with .to({allowed[0]})."
        )


def check_same_device(*named: tuple[str, torch.Tensor]) -> None:
    """Raise ValueError unless all tensors live on the same device."""
    device = named[0][1].device
    for name, tensor in named[1:]:
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {named[0][0]} is on {device}; move it with .to().")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """Return `scale`, or `head_dim ** -0.5` when it is None; reject non-positive values."""
    if scale is None:
        return head_dim**-0.5 if head_dim > 0 else 1.0
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale}; pass None for head_dim ** -0.5.")
    return scale


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the references run softmax in: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)
