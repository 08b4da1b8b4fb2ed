"""Prompt sets for ``pdt eval`` and ``pdt bench``: what is asked, and the plan every method follows.

Design decisions:

- Sources, by what ``--prompts`` names:

  ==========================  ============================================================================
  nothing (default)           the test split of the shipped ``pdt_hf/resources/prompts.txt``, decided by
                              the same hash as ``pdt data build`` with its default seed, so no prompt a
                              sidecar was trained on is evaluated (``split`` picks another split)
  a built data-set folder     its ``test/*.parquet`` shards (folder holding ``pdt_dataset.json``): the
                              ``prompt``, ``plan`` and ``plan_source`` columns, i.e. the teacher's plans
                              (``split`` picks another split's shards)
  ``*.txt``                   one prompt a line
  ``*.jsonl``                 one object a line with a ``"prompt"`` field and an optional ``"plan"`` (a
                              list of section titles or an ``"a; b; c"`` string)
  ==========================  ============================================================================

- A prompt without a plan gets the parts the prompt itself enumerates ("..., covering A, B, and C"), else
  generic titles (``training.data.plan.fallback_plan``): deterministic and free, unlike a skeleton pass of
  the trunk (about 20 s a prompt on 2 CPU cores), and the same plan for every method.
- Plans longer than K are cut to their first K items; shorter plans are padded with generic titles, then
  ``Part k``, so every item is distinct.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EvalItem", "load_eval_items", "pad_plan"]

_DATASET_MANIFEST = "pdt_dataset.json"


@dataclass
class EvalItem:
    """One request and the section titles (one per stream) every method is asked to write."""

    prompt: str
    plan: list[str]
    plan_source: str = "file"


def pad_plan(prompt: str, plan: Sequence[str] | None, k: int) -> tuple[list[str], str]:
    """``(plan, source)`` with exactly ``k`` distinct items: the given plan cut or padded, else the prompt's parts."""
    from ..generation.plan import normalise_plan
    from ..training.data.plan import GENERIC_TITLES, fallback_plan

    if plan:
        items, source = normalise_plan(plan), "file"
    else:
        items, source = fallback_plan(prompt, k)
    items = list(items[:k])
    seen = {item.lower() for item in items}
    extra = [title for title in GENERIC_TITLES] + [f"Part {i + 1}" for i in range(k)]
    for title in extra:
        if len(items) == k:
            break
        if title.lower() not in seen:
            items.append(title)
            seen.add(title.lower())
    return items, source


Raw = list[tuple[str, list[str] | None, str]]


def _default_items(split: str) -> Raw:
    from ..training.data.config import SPLITS, DataBuildConfig
    from ..training.data.sources import load_prompts, split_prompts

    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; the shipped prompts are split into {list(SPLITS)}.")
    config = DataBuildConfig()
    return [(prompt, None, "") for prompt in split_prompts(load_prompts(config), config)[split]]


def _dataset_items(directory: str, split: str) -> Raw:
    import datasets

    files = sorted(glob.glob(os.path.join(directory, split, "*.parquet")))
    if not files:
        raise FileNotFoundError(
            f"the data set {directory!r} has no {split}/*.parquet shards; build it with `pdt data build`, or pass "
            "--prompts a .txt/.jsonl file."
        )
    ds = datasets.Dataset.from_parquet(files)
    if "prompt" not in ds.column_names:
        raise ValueError(f"the shards of {directory!r} have no 'prompt' column (columns: {ds.column_names}).")
    plans = ds["plan"] if "plan" in ds.column_names else [None] * len(ds)
    sources = ds["plan_source"] if "plan_source" in ds.column_names else ["file"] * len(ds)
    return [(str(p), list(plan) if plan else None, str(src)) for p, plan, src in zip(ds["prompt"], plans, sources)]


def _jsonl_items(path: str) -> Raw:
    items = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not valid JSON ({err}); write one object per line.") from None
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise ValueError(f'{path}:{number} has no "prompt" field; write {{"prompt": "...", "plan": [...]}}.')
            plan = row.get("plan")
            if isinstance(plan, str):
                plan = [p for p in plan.split(";")]
            items.append((str(row["prompt"]).strip(), plan or None, ""))
    return items


def _txt_items(path: str) -> Raw:
    with open(path, encoding="utf-8") as handle:
        return [(line.strip(), None, "") for line in handle if line.strip()]


def load_eval_items(
    source: str | None, num_streams: int, limit: int | None = None, split: str = "test"
) -> list[EvalItem]:
    """Prompts and K-item plans from ``source`` (see the module docstring), first ``limit`` of them.

    ``split`` (train, validation or test) applies to the shipped prompts and to data-set folders.

    Raises:
        FileNotFoundError / ValueError: naming the path or line that cannot be read and what to pass instead.
    """
    if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
        raise ValueError(f"num_streams={num_streams!r} must be a positive integer, e.g. 3.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None (all prompts).")
    if source is None:
        raw = _default_items(split)
    elif os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, _DATASET_MANIFEST)):
            raise FileNotFoundError(
                f"--prompts {source!r} is a folder without {_DATASET_MANIFEST}; pass a data set built by "
                "`pdt data build`, or a .txt / .jsonl file."
            )
        raw = _dataset_items(source, split)
    elif not os.path.isfile(source):
        raise FileNotFoundError(
            f"--prompts {source!r} does not exist; pass a .txt or .jsonl file or a data-set folder."
        )
    elif source.endswith(".jsonl"):
        raw = _jsonl_items(source)
    elif source.endswith(".txt"):
        raw = _txt_items(source)
    else:
        raise ValueError(f"--prompts {source!r}: unknown format; use .txt (one prompt a line) or .jsonl.")
    if not raw:
        raise ValueError(f"--prompts {source!r} holds no prompts.")
    items = []
    for prompt, plan, recorded in raw[:limit]:
        items_plan, origin = pad_plan(prompt, plan, num_streams)
        items.append(EvalItem(prompt=prompt, plan=items_plan, plan_source=recorded or origin))
    return items
