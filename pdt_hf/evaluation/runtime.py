"""Loading the model under test and describing the machine, shared by ``pdt eval`` and ``pdt bench``.

Design decisions:

- Sidecar choice follows ``pdt generate``: ``--sidecar DIR`` if given; else, with no ``--model``, the sidecar
  shipped for the embedded SmolLM2 when the install has one; else an *untrained* sidecar. The untrained
  sidecar is exactly the identity on the trunk (closed gates), but its heads are random, so the torch seed
  is fixed before it is built: the same command gives the same agreement scores and rollbacks.
- Every result file records which case applied (``sidecar``: a path, or ``"untrained"``), the machine
  (CPU count and model, GPU name), and the torch / transformers versions, because timings mean nothing
  without them.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["load_model", "machine_info"]


def load_model(
    model: str | None,
    sidecar: str | None,
    seed: int = 0,
    dtype: str = "float32",
    num_streams: int = 3,
    synthesis: bool = False,
):
    """``(PDTForCausalLM in eval mode, sidecar label)``: ``"shipped (NAME)"``, the given path, or ``"untrained"``.

    An untrained sidecar gets ``num_streams`` adapters (at least 3, the default), and with ``synthesis`` the
    synthesis slot (its init leaves the other tensors as without it); the model moves to CUDA when one is
    available.
    """
    from ..config import PDTConfig
    from ..generation.cli import shipped_sidecar
    from ..modeling import PDTForCausalLM

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype!r} is not supported; use float32, bfloat16 or float16.")
    if sidecar is not None and not os.path.isdir(sidecar):
        raise FileNotFoundError(f"--sidecar {sidecar!r} is not a folder; pass a folder holding pdt_config.json.")
    shipped = sidecar is None and model is None and shipped_sidecar() is not None
    if shipped:
        sidecar = shipped_sidecar()
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {} if dtype == "float32" else {"dtype": getattr(torch, dtype)}
    loaded = PDTForCausalLM.from_pretrained(
        model,
        sidecar=sidecar,
        config=None if sidecar else PDTConfig(num_streams=max(3, num_streams), synthesis=synthesis),
        **kwargs,
    )
    loaded.eval()
    if torch.cuda.is_available():
        loaded.to("cuda")
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(loaded.trunk.generation_config, name, None) is None and loaded.tokenizer is not None:
            setattr(loaded.trunk.generation_config, name, getattr(loaded.tokenizer, name))
    if shipped:
        return loaded, f"shipped ({os.path.basename(os.fspath(sidecar))})"
    return loaded, (os.fspath(sidecar) if sidecar else "untrained")


def machine_info() -> dict[str, Any]:
    """CPU / GPU and library versions, for the header of every result file."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        info["device"] = "cuda"
    else:
        info["device"] = "cpu"
    return info
