"""Outline parsing for the skeleton pass, and the prompt split shared by decoding and training."""

from __future__ import annotations

import pytest

from pdt_hf.generation.plan import PlanError, normalise_plan, parse_plan
from pdt_hf.generation.prompts import common_prefix_length, split_stream_prompts


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1. Soil\n2. Seeds\n3. Water", ["Soil", "Seeds", "Water"]),
        ("Here is the outline:\n1) **Soil**\n2) Seeds.\n3) Water:", ["Soil", "Seeds", "Water"]),
        ("- Soil\n* Seeds\n• Water\n+ Light", ["Soil", "Seeds", "Water"]),
        ("Step 1: Soil\nStep 2: Seeds", ["Soil", "Seeds"]),
        ("1. Soil\n2. soil\n3. SOIL\n4. Seeds", ["Soil", "Seeds"]),
        ("Soil\n\nSeeds\nWater\nLight", ["Soil", "Seeds", "Water"]),
        ("### 1. Soil ###\n(2) Seeds", ["Soil", "Seeds"]),
    ],
)
def test_parse_plan(text: str, expected: list[str]) -> None:
    assert parse_plan(text, max_items=3) == expected


def test_parse_plan_nothing_usable() -> None:
    with pytest.raises(PlanError, match="could not read a plan"):
        parse_plan("\n - \n 1. \n", max_items=3)


def test_normalise_plan() -> None:
    assert normalise_plan("a; b ;c") == ["a", "b", "c"]
    with pytest.raises(PlanError, match="empty item"):
        normalise_plan("a;;b")


def test_prefix_split() -> None:
    streams = [[1, 2, 3, 4, 9], [1, 2, 3, 5], [1, 2, 3, 4, 7, 7]]
    assert common_prefix_length(streams) == 3
    prefix, suffixes = split_stream_prompts(streams)
    assert prefix == [1, 2, 3] and suffixes == [[4, 9], [5], [4, 7, 7]]
    # One stream: the last token stays in the suffix so the stream has a first forward of its own.
    assert split_stream_prompts([[1, 2, 3]]) == ([1, 2], [[3]])
    # Identical prompts still keep one token per suffix.
    assert split_stream_prompts([[1, 2], [1, 2]]) == ([1], [[2], [2]])
