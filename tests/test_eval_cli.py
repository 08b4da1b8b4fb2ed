"""``pdt eval``: the serial split rule, prompt sets, scoring pieces, and a full run on a tiny trunk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf.cli import main
from pdt_hf.evaluation.baselines import EVAL_METHODS, serial_message, split_sections
from pdt_hf.evaluation.evaluate import METRICS, assemble_ids, token_nlls
from pdt_hf.evaluation.metrics import serial_fidelity
from pdt_hf.evaluation.prompt_sets import load_eval_items, pad_plan

PLAN = ["Thesis", "Evidence", "Conclusion"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- split rule
def test_split_by_headings_keeps_preamble_in_first_section_and_ignores_body_mentions() -> None:
    text = (
        "Intro line.\n## Thesis\nA claim.\n- Evidence should be cited properly in every paragraph.\n"
        "**Evidence:**\nData.\n\n3. Conclusion\nWrap up."
    )
    sections, rule = split_sections(text, PLAN)
    assert rule == "headings"
    assert sections == [
        "Intro line.\n\nA claim.\n- Evidence should be cited properly in every paragraph.",
        "Data.",
        "Wrap up.",
    ]


def test_split_missing_heading_leaves_empty_section() -> None:
    sections, rule = split_sections("Opening text.\nConclusion:\nThe end.", PLAN)
    assert rule == "partial-headings"
    assert sections == ["Opening text.", "", "The end."]


def test_split_without_headings_cuts_paragraphs_by_word_midpoints() -> None:
    sections, rule = split_sections("One para here.\n\nTwo para here is longer text.\n\nThree.", PLAN)
    assert rule == "paragraphs"
    assert sections == ["One para here.", "Two para here is longer text.", "Three."]


def test_serial_message_lists_the_plan_as_headings() -> None:
    message = serial_message("Explain essays.", PLAN)
    assert message.endswith("## Thesis\n## Evidence\n## Conclusion")
    assert "3 sections" in message


# ------------------------------------------------------------------------------------------- prompt sets
def test_prompt_sets_from_jsonl_and_txt(tmp_path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "A?", "plan": "x; y"}\n\n{"prompt": "Cook rice: rinsing, water, and resting."}\n')
    items = load_eval_items(str(jsonl), 3)
    assert [i.plan for i in items] == [["x", "y", "Overview"], ["Rinsing", "Water", "Resting"]]
    assert [i.plan_source for i in items] == ["file", "prompt"]
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\n\nSecond prompt\nThird\n")
    assert [i.prompt for i in load_eval_items(str(txt), 2, limit=2)] == ["First prompt", "Second prompt"]


def test_prompt_set_errors_name_the_problem(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:1 has no "prompt" field'):
        load_eval_items(str(bad), 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_items(str(tmp_path / "missing.txt"), 3)
    with pytest.raises(ValueError, match="num_streams=0"):
        load_eval_items(str(bad), 0)


def test_default_prompt_set_is_the_test_split() -> None:
    from pdt_hf.training.data.config import DataBuildConfig
    from pdt_hf.training.data.sources import load_prompts, split_prompts

    splits = split_prompts(load_prompts(DataBuildConfig()), DataBuildConfig())
    items = load_eval_items(None, 3, limit=5)
    assert [i.prompt for i in items] == splits["test"][:5]
    assert not set(i.prompt for i in items) & set(splits["train"])


def test_pad_plan_makes_distinct_items() -> None:
    plan, source = pad_plan("Say hi.", ["Overview"], 4)
    assert source == "file" and len(plan) == 4 and len({p.lower() for p in plan}) == 4


# ------------------------------------------------------------------------------------------- scoring
def test_token_nlls_average_to_serial_fidelity() -> None:
    trunk, tok = tiny_trunk("llama"), tiny_tokenizer()
    context = tok("<s>user\nExplain tea.</s>\n", add_special_tokens=False)["input_ids"]
    answer, spans = assemble_ids(tok, ["Water", "Leaves"], [[40, 41, 42], [43, 44]])
    assert [answer[s:e] for s, e in spans] == [[40, 41, 42], [43, 44]]
    assert tok.decode(answer[: spans[0][0]]) == "## Water\n"
    nlls = token_nlls(trunk, context, answer)
    assert nlls.shape == (len(answer),)
    assert float(nlls.mean()) == pytest.approx(serial_fidelity(trunk, None, context, answer), rel=1e-5)


def test_within_section_repetition_counts_loops_not_cross_section_repeats() -> None:
    from pdt_hf.evaluation.evaluate import within_section_repetition

    # "a b c d a b c d": 5 grams, the 5th (a b c d) repeats the 1st; the other section repeats across only.
    assert within_section_repetition(["a b c d a b c d", "a b c d"]) == pytest.approx(1 / 6)
    assert within_section_repetition(["too short", ""]) == 0.0


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_trunk("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Explain tea.", "plan": ["Water", "Leaves"]}\n{"prompt": "Plan a trip: bus, food, and sleep."}\n'
    )
    return path, prompts


def test_pdt_eval_writes_json_markdown_and_plots(tiny_dir, tmp_path) -> None:
    model_dir, prompts = tiny_dir
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts),
            "--streams",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["methods"] == list(EVAL_METHODS)
    assert result["sidecar"] == "untrained" and result["machine"]["torch"] == torch.__version__
    assert result["command"].startswith("pdt eval --prompts")
    for method in EVAL_METHODS:
        for metric in (
            "fidelity",
            "redundancy_embedding",
            "redundancy_ngram4",
            "repetition_within",
            "coverage_text",
            "tokens",
        ):
            stat = result["summary"][method][metric]
            assert stat["low"] <= stat["mean"] <= stat["high"] and stat["n"] == 2
    assert "coverage_head" in result["summary"]["pdt"] and "coverage_head" not in result["summary"]["sot"]
    assert set(result["paired_vs_pdt"]) == set(EVAL_METHODS) - {"pdt"}
    assert set(result["calibration"]) == {"pdt", "pdt-notes-zero", "pdt-notes-shuffle", "pdt-no-rollback"}

    for prompt in result["prompts"]:
        rows = prompt["methods"]
        assert rows["serial"]["tokens"] <= 2 * 8 and rows["serial"]["split_rule"]
        assert all(rows[m]["tokens"] <= 2 * 8 for m in EVAL_METHODS)
        # The untrained sidecar is the identity and decoding is greedy: every PDT variant writes what SoT writes.
        for method in ("pdt", "pdt-notes-zero", "pdt-notes-shuffle", "pdt-no-rollback"):
            assert rows[method]["sections"] == rows["sot"]["sections"]
        assert rows["pdt-no-rollback"]["rollback_rate"] == 0.0

    blocks = [b for b in result["blocks"] if b["method"] == "pdt-no-rollback"]
    assert blocks and all(b["committed"] and b["label"] in (0, 1) for b in blocks)
    calib = result["calibration"]["pdt"]
    assert calib["n"] + calib["n_unlabelled"] == len([b for b in result["blocks"] if b["method"] == "pdt"])
    assert 0.0 <= calib["ece"] <= 1.0 and calib["ece_ci"][0] <= calib["ece_ci"][1]

    markdown = (out / "eval.md").read_text()
    assert "| metric | serial | sot | pdt |" in markdown and "Paired differences" in markdown
    assert "-core CPU" in markdown and "torch " in markdown
    for name in ("eval_metrics.png", "eval_calibration.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert set(METRICS) <= set(result["metrics"])


def test_pdt_eval_rejects_bad_label_threshold(tiny_dir, tmp_path) -> None:
    model_dir, prompts = tiny_dir
    with pytest.raises(SystemExit, match="--label-nll 'low'"):
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--prompts",
                str(prompts),
                "--label-nll",
                "low",
                "--out",
                str(tmp_path / "x"),
                "--no-progress",
            ]
        )


def test_calibration_labels_follow_the_threshold() -> None:
    from pdt_hf.evaluation.baselines import MethodRun
    from pdt_hf.evaluation.evaluate import _blocks

    run = MethodRun(
        "pdt",
        ["a", "b"],
        tokens=6,
        decoded=8,
        seconds=0.0,
        telemetry={
            "commits": [
                {"stream": 0, "round": 1, "tokens": 2, "score": 0.9, "committed": True, "flagged": False},
                {"stream": 1, "round": 1, "tokens": 2, "score": 0.1, "committed": False, "flagged": False},
                {"stream": 1, "round": 2, "tokens": 2, "score": 0.7, "committed": True, "flagged": False},
                {"stream": 0, "round": 2, "tokens": 2, "score": 0.8, "committed": True, "flagged": True},
            ]
        },
    )
    nlls = np.array([9.0, 1.0, 3.0, 0.0, 0.0, 5.0, 7.0, 9.0])  # section 0 at [1, 5), section 1 at [6, 8)
    blocks = _blocks(run, [(1, 5), (6, 8)], nlls, prompt_index=0)
    assert [b["nll"] for b in blocks] == [2.0, None, 8.0, 0.0]
