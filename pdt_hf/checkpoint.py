"""Sidecar checkpoints: ``pdt_config.json`` + ``sidecar.safetensors``, written atomically, never pickled.

A file is written to a temporary name in the same directory and moved into
place with ``os.replace``, so a killed save never leaves a half-written
checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME

WEIGHTS_NAME = "sidecar.safetensors"


class SidecarLoadError(ValueError):
    """A sidecar file is missing, truncated, corrupted or does not match the sidecar's shape."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` in one step."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` to ``path`` as indented, key-sorted JSON with a final newline, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")

    atomic_write(path, write)


def save_sidecar(directory: str | os.PathLike, config_json: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``sidecar.safetensors`` then ``pdt_config.json`` into ``directory``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(config_json)

    atomic_write(os.path.join(directory, CONFIG_NAME), write_json)


def load_sidecar_weights(directory: str | os.PathLike, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read ``sidecar.safetensors`` and check it has exactly the keys and shapes of ``expected``."""
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise SidecarLoadError(f"no {WEIGHTS_NAME} in {os.fspath(directory)!r}; the sidecar directory is incomplete.")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SidecarLoadError(
            f"{path} is truncated or corrupted ({err}); restore it from a backup or re-save the sidecar."
        ) from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise SidecarLoadError(
            f"{path} does not match this sidecar's layout: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "was it saved with a different pdt_config.json?"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise SidecarLoadError(
                f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}."
            )
    return tensors
