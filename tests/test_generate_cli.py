"""``pdt generate`` end to end on a tiny trunk saved to disk, including Ctrl-C and bad input."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import PDTForCausalLM
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
    assert "rollback on: a block whose agreement score is below tau = 0.500" in printed
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


# ---------------------------------------------------------------- bad input: one clear message, exit 2, no traceback


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--streams", "0"], "argument --streams: must be a positive integer (1 or more), got 0"),
        (["--streams", "-2"], "argument --streams: must be a positive integer (1 or more), got -2"),
        (["--streams", "two"], "argument --streams: must be a positive integer, got 'two'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a positive integer (1 or more), got 0"),
        (["--max-new-tokens", "-5"], "argument --max-new-tokens: must be a positive integer (1 or more), got -5"),
        (["--block-size", "0"], "argument --block-size: must be a positive integer (1 or more), got 0"),
        (["--temperature", "-1"], "argument --temperature: must be a number >= 0 (0 for greedy), got '-1'"),
    ],
)
def test_bad_flag_values_are_usage_errors(flags, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "Explain tea.", *flags])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def no_trunk_load(monkeypatch):
    """Checks that need no trunk must fail before one loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the trunk was loaded before the arguments were checked")

    monkeypatch.setattr(PDTForCausalLM, "from_pretrained", refuse)


def _error(argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.err + captured.out
    assert "pdt generate: error: " in captured.err
    return captured.err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--streams", "2", "--plan", "a; b; c; d"], "--streams=2 is below the plan length (4 items"),
        (["--streams", "3", "--plan", "a; b"], "--streams=3 is above the plan length (2 items"),
        (["--plan", "a; ; c"], "has an empty item"),
        (["--plan", ""], "has an empty item"),
        (["--plan", "a; b;"], "has an empty item"),
    ],
)
def test_plan_errors_before_loading(flags, message, no_trunk_load, capsys) -> None:
    assert message in _error(["generate", "Explain tea.", *flags], capsys)


def test_empty_prompt(no_trunk_load, capsys) -> None:
    assert "the prompt is empty" in _error(["generate", "   ", "--plan", "a; b"], capsys)


def test_sidecar_dir_missing_or_incomplete(tmp_path, no_trunk_load, capsys) -> None:
    missing = tmp_path / "nope"
    err = _error(["generate", "Explain tea.", "--sidecar", str(missing)], capsys)
    assert f"--sidecar '{missing}' does not exist" in err and "omit --sidecar" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "pdt_config.json").write_text("{}")
    err = _error(["generate", "Explain tea.", "--sidecar", str(tmp_path / "half")], capsys)
    assert "lacks sidecar.safetensors" in err and "pdt_config.json" not in err.split("lacks")[1].split("(")[0]


def test_json_path_that_cannot_be_written(tmp_path, no_trunk_load, capsys) -> None:
    err = _error(["generate", "Explain tea.", "--json", str(tmp_path)], capsys)
    assert "is a directory; give a file name" in err
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = _error(["generate", "Explain tea.", "--json", str(blocker / "sub" / "out.json")], capsys)
    assert f"{blocker} is a file, not a folder" in err


def test_unknown_model_offline(monkeypatch, capsys) -> None:
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"tried the network: {a}"))
    err = _error(["generate", "Explain tea.", "--model", "made-up-org/no-such-model-4242", "--plan", "a; b"], capsys)
    assert "'made-up-org/no-such-model-4242' looks like a Hugging Face Hub id" in err
    assert "HF_HUB_OFFLINE" in err and "omit --model" in err
    assert "caused by OSError" in err
    err = _error(["generate", "Explain tea.", "--model", "./no/such/model", "--plan", "a; b"], capsys)
    assert "'./no/such/model' looks like a local path" in err and "does not exist" in err


def test_prompt_longer_than_context(model_dir, monkeypatch, capsys) -> None:
    from pdt_hf.generation import api

    monkeypatch.setattr(api, "skeleton_plan", lambda *a, **k: pytest.fail("the outline pass ran on a too-long prompt"))
    err = _error(["generate", "tea " * 100, "--model", str(model_dir)], capsys)
    assert "exceeds the trunk's context of 512 tokens (max_position_embeddings)" in err
    assert "shorten the prompt" in err and "--max-new-tokens" in err


def test_plan_sets_streams_and_block_size_is_passed(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out.json"
    argv = ["generate", "Explain tea.", "--model", str(model_dir), "--plan", "a; b", "--max-new-tokens", "6"]
    assert main([*argv, "--block-size", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["plan"] == ["a", "b"] and len(data["sequences"]) == 2
    assert "2 streams" in capsys.readouterr().out
    assert {c["tokens"] for c in data["telemetry"]["commits"]} <= {1, 2, 3}
    assert any(c["tokens"] == 3 for c in data["telemetry"]["commits"])


def test_draft_model_is_loaded_from_a_path_and_drafts_for_the_streams(model_dir, tmp_path, capsys) -> None:
    """The trunk as its own draft model (same vocabulary): loaded by path like --model, every draft proposed."""
    out = tmp_path / "out.json"
    argv = ["generate", "Explain tea.", "--model", str(model_dir), "--plan", "a; b", "--max-new-tokens", "6"]
    argv += ["--speculate", "draft", "--draft-model", str(model_dir), "--json", str(out)]
    assert main(argv) == 0
    assert "speculative decoding: draft" in capsys.readouterr().out
    telemetry = json.loads(out.read_text())["telemetry"]
    assert telemetry["draft_tokens"] > 0


def test_rollback_mode_line_names_the_mode() -> None:
    from pdt_hf.generation.cli import rollback_mode

    assert rollback_mode(0.0).startswith("rollback off") and "every block commits" in rollback_mode(0.0)
    assert rollback_mode(0.8831).startswith("rollback on") and "tau = 0.883" in rollback_mode(0.8831)
