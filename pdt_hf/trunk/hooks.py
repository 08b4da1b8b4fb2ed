"""Forward hooks that add the sidecar's deltas to the trunk's real decoder layers.

Hooks are registered on the objects inside the trunk's own ``nn.ModuleList``
(never on a copied list), and one :class:`SidecarHooks` object owns their
handles: ``detach()`` removes every one, and using it as a context manager
removes them in ``finally``. Decoder layers in transformers 5.x return a
tensor; a tuple output (older layers, MoE router logits) keeps its tail; any
other output is refused with :class:`UnsupportedTrunkError` on the first forward.

The delta function is ``sidecar.layer_delta`` unless ``using(fn)`` swaps in
another one for a block (the decode loop's one-token fast path); the hooks
stay registered, so nothing is re-registered per step, and the swap is undone
in ``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .architectures import UnsupportedTrunkError, decoder_layers


class SidecarHooks:
    """Owns the forward hooks that apply ``sidecar.layer_delta`` to instrumented layers."""

    def __init__(self, trunk: nn.Module, sidecar: nn.Module, layer_indices: list[int]) -> None:
        self.trunk = trunk
        self.sidecar = sidecar
        self.layer_indices = list(layer_indices)
        self._handles: list[RemovableHandle] = []
        self._delta = None  # None: sidecar.layer_delta

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> SidecarHooks:
        if self.attached:
            return self
        layers = decoder_layers(self.trunk)
        for idx in self.layer_indices:
            self._handles.append(layers[idx].register_forward_hook(self._make_hook(idx)))
        return self

    def detach(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _make_hook(self, layer_idx: int):
        sidecar = self.sidecar

        def hook(module: nn.Module, args: tuple, output: object) -> object:
            delta = self._delta or sidecar.layer_delta
            if isinstance(output, torch.Tensor):
                return delta(layer_idx, output)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (delta(layer_idx, output[0]), *output[1:])
            raise UnsupportedTrunkError(
                f"decoder layer {layer_idx} ({type(module).__name__}) returned {type(output).__name__}, not a "
                "hidden-state tensor or a tuple starting with one, so pdt-hf cannot add sidecar deltas to it; this "
                "trunk type needs an entry in pdt_hf.trunk.architectures.ARCHITECTURES."
            )

        return hook

    @contextmanager
    def using(self, layer_delta: Callable[[int, torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Inside the block the hooks call ``layer_delta(layer_idx, hidden)`` instead of the sidecar's own."""
        previous, self._delta = self._delta, layer_delta
        try:
            yield
        finally:
            self._delta = previous

    @contextmanager
    def detached(self) -> Iterator[None]:
        """Run the bare trunk inside the block; hooks come back afterwards even on error."""
        was_attached = self.attached
        self.detach()
        try:
            yield
        finally:
            if was_attached:
                self.attach()

    def __enter__(self) -> SidecarHooks:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()
