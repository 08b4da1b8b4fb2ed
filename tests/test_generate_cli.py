"""``pdt generate`` end to end on a tiny trunk saved to disk, including Ctrl-C."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf.cli import main
from pdt_hf.generation import cli as gen_cli


@pytest.fixture
def model_dir(tmp_path):
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.save_pretrained(tmp_path / "trunk")
    tiny_tokenizer().save_pretrained(tmp_path / "trunk")
    return tmp_path / "trunk"


def test_generate_writes_json_and_summary(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out.json"
    code = main(
        [
            "generate",
            "Explain tea.",
            "--model",
            str(model_dir),
            "--streams",
            "3",
            "--plan",
            "a; b; c",
            "--max-new-tokens",
            "12",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "sidecar is untrained" in printed
    assert "tokens/s" in printed and "rollbacks" in printed
    data = json.loads(out.read_text())
    assert data["plan"] == ["a", "b", "c"]
    assert len(data["sequences"]) == 3 and all(len(s) <= 12 for s in data["sequences"])
    assert data["telemetry"]["decoded_tokens"] >= sum(len(s) for s in data["sequences"])


def test_ctrl_c_prints_committed_text_and_exits_cleanly(model_dir, monkeypatch, capsys) -> None:
    calls = {"n": 0}
    original = gen_cli.LivePanels.on_text

    def interrupting(self, stream, text, round):
        original(self, stream, text, round)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(gen_cli.LivePanels, "on_text", interrupting)
    code = main(["generate", "Explain tea.", "--model", str(model_dir), "--plan", "a; b; c", "--max-new-tokens", "40"])
    assert code == 130
    printed = capsys.readouterr().out
    assert "Interrupted: showing what was committed so far." in printed
    assert "tokens in" in printed
