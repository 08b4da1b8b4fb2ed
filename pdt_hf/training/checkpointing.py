"""Resumable training checkpoints: sidecar weights, optimizer, scheduler, RNG and data position, never the trunk.

Layout of ``<output_dir>/checkpoints``::

    latest                       name of the newest complete checkpoint (written last, atomically)
    step-000120/
        sidecar.safetensors      sidecar weights only
        optimizer.safetensors    optimizer tensors, keyed state.<param index>.<name>
        rng-rank<r>.safetensors  torch (and CUDA) RNG state of each rank
        state.json               stage, steps, data cursor, optimizer param groups, scheduler, python/numpy RNG,
                                 and the recipe's resume key

Design decisions:
- Nothing is pickled: tensors go to safetensors, everything else to JSON.
- A checkpoint is assembled in a temporary directory and renamed into place, and ``latest`` is replaced only
  after that, so a run killed at any moment leaves the previous checkpoint intact and loadable.
- Resuming compares the recipe's resume key (model, sidecar config, data path, loop and curriculum, not paths
  or logging cadence) and names the first field that differs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write

__all__ = [
    "ResumeMismatchError",
    "TrainerState",
    "latest_checkpoint",
    "load_checkpoint",
    "optimizer_from_tensors",
    "optimizer_to_tensors",
    "save_checkpoint",
]

LATEST = "latest"


class ResumeMismatchError(ValueError):
    """The checkpoint directory belongs to a different recipe."""


@dataclass
class TrainerState:
    """Where a run is: which stage, how far into it, and how many examples it has consumed."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    cursor: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into safetensors-able tensors and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list | None, numpy_state: list | None) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if python_state is not None:
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if numpy_state is not None:
        name, keys, pos, has_gauss, gauss = numpy_state
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(
    root: str,
    state: TrainerState,
    sidecar_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    resume_key: dict,
    rank_rng: list[dict[str, torch.Tensor]],
    keep: int,
) -> str:
    """Write ``root/step-XXXXXX`` atomically, point ``latest`` at it, drop checkpoints beyond ``keep``."""
    os.makedirs(root, exist_ok=True)
    name = f"step-{state.global_step:06d}"
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=root)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in sidecar_state.items()},
            os.path.join(tmp, "sidecar.safetensors"),
        )
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer_state)
        save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
        for rank, tensors in enumerate(rank_rng):
            save_file(tensors, os.path.join(tmp, f"rng-rank{rank}.safetensors"))
        meta = {
            "trainer": asdict(state),
            "optimizer": opt_meta,
            "scheduler": scheduler_state,
            "python_rng": _python_rng(),
            "numpy_rng": _numpy_rng(),
            "resume_key": resume_key,
        }
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1, sort_keys=True)
        final = os.path.join(root, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)

    def write_latest(path: str) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(name + "\n")

    atomic_write(os.path.join(root, LATEST), write_latest)
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isdir(os.path.join(root, d)))
    for old in steps[: max(len(steps) - keep, 0)]:
        if old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest_checkpoint(root: str) -> str | None:
    """Path of the newest complete checkpoint under ``root`` or None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as handle:
        path = os.path.join(root, handle.read().strip())
    return path if os.path.isfile(os.path.join(path, "state.json")) else None


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff = _first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: checkpoint has {a!r}, this config has {b!r}"


def load_checkpoint(path: str, resume_key: dict, rank: int) -> tuple[TrainerState, dict, dict, dict, dict]:
    """``(state, sidecar tensors, optimizer state_dict, scheduler state, meta)``; restores this rank's RNG."""
    with open(os.path.join(path, "state.json"), encoding="utf-8") as handle:
        meta = json.load(handle)
    diff = _first_difference(meta["resume_key"], json.loads(json.dumps(resume_key)))
    if diff:
        raise ResumeMismatchError(
            f"cannot resume from {path}: it was written by a different recipe ({diff}). Resume with the recipe "
            "that wrote it, or use a new train.output_dir."
        )
    sidecar = load_file(os.path.join(path, "sidecar.safetensors"))
    optimizer = optimizer_from_tensors(load_file(os.path.join(path, "optimizer.safetensors")), meta["optimizer"])
    rng_file = os.path.join(path, f"rng-rank{rank}.safetensors")
    if os.path.exists(rng_file):
        restore_rng(load_file(rng_file), meta["python_rng"], meta["numpy_rng"])
    return TrainerState(**meta["trainer"]), sidecar, optimizer, meta["scheduler"], meta
