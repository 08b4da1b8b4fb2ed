"""The shipped prompt list ``pdt_hf/resources/prompts.txt``: size, cleanliness, split and plan fallback.

Design decisions:
- The checks read the file through the project's own loader and split (``training.data.sources``) with the
  default ``DataBuildConfig``, so the counts are the ones ``pdt data build`` and ``pdt eval`` see.
- The first 361 lines are the prompts the shipped sidecar's data set was drawn from. They are pinned by a
  digest and by their split counts: new prompts are appended, never edited in, so no earlier prompt changes
  text or split.
- Near duplicates are measured with ``plan.content_words`` (the same crude stem the coverage labels use); the
  largest overlap between two lines is 0.40, and the floor on the plan-fallback share (92.6% measured: 958
  of 1,035 lines, 673 of the 674 appended) sits a little below the measurement.
"""

from __future__ import annotations

import hashlib
import itertools

import pytest

from pdt_hf.training.data.config import DataBuildConfig
from pdt_hf.training.data.plan import content_words, fallback_plan
from pdt_hf.training.data.sources import default_prompts_path, load_prompts, split_prompts

MIN_PROMPTS = 900
MIN_TRAIN = 600
MAX_WORDS = 40
MAX_CHARS = 240
MIN_PROMPT_PLAN_SHARE = 0.90
MAX_WORD_OVERLAP = 0.5
ORIGINAL_LINES = 361
ORIGINAL_DIGEST = "fd215cbdecb00d2f003f9142c8b11d867bbf17f17b879ec859cb9dffd61803d0"
ORIGINAL_SPLIT = {"train": 275, "validation": 46, "test": 40}


@pytest.fixture(scope="module")
def lines() -> list[str]:
    with open(default_prompts_path(), encoding="utf-8") as handle:
        return handle.read().splitlines()


@pytest.fixture(scope="module")
def splits() -> dict[str, list[str]]:
    config = DataBuildConfig()
    return split_prompts(load_prompts(config), config)


def test_prompts_are_many_unique_short_and_clean(lines: list[str]) -> None:
    assert len(lines) >= MIN_PROMPTS
    assert all(line and line == line.strip() and line.isascii() for line in lines)
    assert len({" ".join(line.lower().split()) for line in lines}) == len(lines)
    too_long = [line for line in lines if len(line.split()) > MAX_WORDS or len(line) > MAX_CHARS]
    assert not too_long


def test_no_two_prompts_are_near_duplicates(lines: list[str]) -> None:
    words = [content_words(line) for line in lines]
    overlaps = [
        (len(a & b) / len(a | b), i, j) for (i, a), (j, b) in itertools.combinations(enumerate(words), 2) if a | b
    ]
    worst, i, j = max(overlaps)
    assert worst < MAX_WORD_OVERLAP, (lines[i], lines[j])


def test_split_gives_enough_train_prompts_and_partitions_the_file(
    lines: list[str], splits: dict[str, list[str]]
) -> None:
    assert len(splits["train"]) >= MIN_TRAIN
    assert len(splits["validation"]) > 0 and len(splits["test"]) > 0
    assigned = [p for split in splits.values() for p in split]
    assert len(assigned) == len(set(assigned)) == len(lines)


def test_original_prompts_are_unchanged_and_keep_their_split(lines: list[str], splits: dict[str, list[str]]) -> None:
    original = lines[:ORIGINAL_LINES]
    assert hashlib.sha256("\n".join(original).encode("utf-8")).hexdigest() == ORIGINAL_DIGEST, (
        "the first 361 prompts of prompts.txt changed; append new prompts at the end instead"
    )
    alone = split_prompts(original, DataBuildConfig())
    assert {name: len(split) for name, split in alone.items()} == ORIGINAL_SPLIT
    for name, split in alone.items():
        kept = set(split)
        assert [p for p in splits[name] if p in kept] == split


def test_plan_fallback_finds_three_distinct_parts_for_most_prompts(lines: list[str]) -> None:
    plans = [fallback_plan(line, 3) for line in lines]
    from_prompt = [plan for plan, source in plans if source == "prompt"]
    assert len(from_prompt) >= MIN_PROMPT_PLAN_SHARE * len(lines)
    assert all(len({item.lower() for item in plan}) == 3 for plan in from_prompt)
    appended = [source for _, source in plans[ORIGINAL_LINES:]]
    assert appended.count("prompt") >= 0.98 * len(appended)
