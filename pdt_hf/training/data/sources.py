"""Prompt sources and the train/validation/test split.

Design decisions:
- Any ``datasets``-loadable source works: a local JSONL/JSON/Parquet/CSV file (``prompt_column``), a plain text
  file (one prompt a line), or a Hub dataset name when online. ``None`` is the shipped
  ``pdt_hf/resources/prompts.txt``.
- The split is decided per prompt, before anything else, by a hash of the seed and the normalised prompt text:
  a prompt lands in the same split whatever the order of the source or the other prompts in it, and duplicates
  collapse to one example (no prompt can leak across splits).
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources

from .config import SPLITS, DataBuildConfig

__all__ = ["default_prompts_path", "load_prompts", "prompt_id", "split_prompts"]

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def default_prompts_path() -> str:
    """Path of the shipped prompt list (one multi-part instruction a line)."""
    return str(resources.files("pdt_hf") / "resources" / "prompts.txt")


def _normalise(prompt: str) -> str:
    return " ".join(prompt.split())


def prompt_id(prompt: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the SHA-256 of its normalised text."""
    return hashlib.sha256(_normalise(prompt).encode("utf-8")).hexdigest()[:16]


def load_prompts(config: DataBuildConfig) -> list[str]:
    """Prompts of ``config.source`` (normalised, empty ones dropped, duplicates removed, source order kept)."""
    import datasets

    source = config.source or default_prompts_path()
    ext = os.path.splitext(source)[1].lower()
    if os.path.exists(source):
        if ext not in _LOCAL_FORMATS:
            raise ValueError(
                f"data.build.source {source!r} has extension {ext!r}; use one of {sorted(_LOCAL_FORMATS)}."
            )
        fmt = _LOCAL_FORMATS[ext]
        ds = datasets.load_dataset(fmt, data_files={"train": source}, split="train")
        column = "text" if fmt == "text" else config.prompt_column
    else:
        if ext in _LOCAL_FORMATS:
            raise FileNotFoundError(f"data.build.source {source!r} does not exist; check the path.")
        try:
            ds = datasets.load_dataset(source, split=config.source_split)
        except Exception as err:  # noqa: BLE001 - any loader failure gets the same advice
            raise ValueError(
                f"could not load data.build.source {source!r} split {config.source_split!r} ({err}); give a local "
                "file or a Hub dataset name reachable from this machine."
            ) from None
        column = config.prompt_column
    if column not in ds.column_names:
        raise ValueError(
            f"the prompt source {source!r} has no column {column!r}; its columns are {ds.column_names}. "
            "Set data.build.prompt_column."
        )
    seen: set[str] = set()
    prompts = []
    for text in ds[column]:
        text = _normalise(str(text or ""))
        if text and text not in seen:
            seen.add(text)
            prompts.append(text)
    if not prompts:
        raise ValueError(f"the prompt source {source!r} holds no non-empty prompts in column {column!r}.")
    return prompts


def _unit_hash(seed: int, prompt: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{_normalise(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_prompts(prompts: list[str], config: DataBuildConfig) -> dict[str, list[str]]:
    """``{split: prompts}`` by hash; each split ordered by its hash, then capped by ``max_prompts``."""
    bounds = []
    acc = 0.0
    for split in SPLITS:
        acc += config.split_fractions[split]
        bounds.append((acc, split))
    out: dict[str, list[tuple[float, str]]] = {s: [] for s in SPLITS}
    for prompt in prompts:
        u = _unit_hash(config.seed, prompt)
        split = next((s for b, s in bounds if u < b), SPLITS[-1])
        out[split].append((_unit_hash(config.seed + 1, prompt), prompt))
    result = {}
    for split, items in out.items():
        ordered = [p for _, p in sorted(items)]
        cap = config.max_prompts[split]
        result[split] = ordered if cap is None else ordered[:cap]
    return result
