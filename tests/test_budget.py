"""The default sidecar stays under 5% of the trunk, on SmolLM2-135M and on a Qwen2.5-7B-sized trunk."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pdt_hf.budget import meta_budget


@pytest.mark.parametrize("name,trunk_params", [("smollm2-135m", 134_515_008), ("qwen2.5-7b", 7_615_616_512)])
def test_default_sidecar_under_five_percent(name: str, trunk_params: int) -> None:
    budget = meta_budget(name)
    assert budget["trunk"] == trunk_params
    assert budget["sidecar"] == budget["adapters"] + budget["snc"] + budget["heads"]
    assert 0 < budget["share"] < 0.05, f"{name}: sidecar is {100 * budget['share']:.2f}% of the trunk"


def test_budget_command_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pdt_hf.cli", "budget", "--trunk-size", "qwen2.5-7b"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "qwen2.5-7b" in out and "%" in out
