"""Optional Triton import shared by the kernel files.

Importing `pdt_kernels` must work without Triton (CPU-only installs, macOS). Kernel files import `triton` and
`tl` from here: when Triton is present they are the real modules; when it is not they are a stand-in whose
`jit` decorator keeps the function importable and raises a clear error if a kernel is ever launched, and whose
`constexpr` only serves as an annotation. The plain PyTorch references never touch either.

`INTERPRET` records whether `TRITON_INTERPRET` was on when Triton was imported. Triton decides at decoration
time whether `@triton.jit` kernels compile or run in its NumPy interpreter, so setting the variable later has
no effect on kernels that are already defined.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["HAS_TRITON", "INTERPRET", "tl", "triton"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in {"1", "true", "on", "yes"}


class _MissingTriton:
    """Stands in for `triton` and `triton.language` when Triton is not installed."""

    constexpr = Any

    @staticmethod
    def jit(fn=None, **_kwargs):
        def wrap(kernel):
            def missing(*_args, **_kw):
                raise ImportError(
                    f"Triton kernel {kernel.__name__!r} needs Triton; install it with `pip install triton` "
                    "or select the PyTorch reference with `use_backend('reference')`."
                )

            missing.__name__ = kernel.__name__
            return _Launchable(missing)

        return wrap(fn) if fn is not None else wrap

    def __getattr__(self, name: str):
        raise ImportError(f"`triton.{name}` is unavailable: Triton is not installed (`pip install triton`).")


class _Launchable:
    """Mimics `kernel[grid](...)` so a launch without Triton reaches the explanatory ImportError."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__

    def __getitem__(self, _grid):
        return self.fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = _MissingTriton()
    tl = _MissingTriton()
    HAS_TRITON = False
