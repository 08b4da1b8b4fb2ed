"""``pdt eval``: the serial teacher as the serial reference, prompt sets, scoring pieces, empty sections, and a
full run on a tiny trunk."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.cli import main
from pdt_hf.evaluation.baselines import (
    DEFAULT_EVAL_METHODS,
    EVAL_METHODS,
    PDT_METHODS,
    MethodRun,
    run_method,
    serial_message,
)
from pdt_hf.evaluation.evaluate import METRICS, QUALITY, assemble_ids, evaluate, token_nlls
from pdt_hf.evaluation.metrics import serial_fidelity
from pdt_hf.evaluation.prompt_sets import load_eval_items, pad_plan

PLAN = ["Thesis", "Evidence", "Conclusion"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- serial teacher
def _tiny_model(num_streams: int = 3) -> PDTForCausalLM:
    model = PDTForCausalLM(tiny_trunk("llama"), PDTConfig(num_streams=num_streams))
    model.tokenizer = tiny_tokenizer()
    return model.eval()


def test_serial_writes_k_sections_each_after_the_earlier_ones_under_their_headings() -> None:
    from pdt_hf.generation.prompts import render_ids, stream_message

    model, tok = _tiny_model(), tiny_tokenizer()
    prompt, n = "Explain essays.", 6
    # Make section 0 end at end of turn: a token it writes early becomes an end-of-turn token.
    probe = run_method(model, "serial", prompt, PLAN, n)
    cut = next(i for i, t in enumerate(probe.section_ids[0]) if i and t not in probe.section_ids[0][:i])
    model.trunk.generation_config.eos_token_id = [tok.eos_token_id, probe.section_ids[0][cut]]
    run = run_method(model, "serial", prompt, PLAN, n)
    assert len(run.sections) == len(run.section_ids) == len(run.contexts) == len(run.finish_reasons) == 3
    assert run.section_ids[0] == probe.section_ids[0][: cut + 1] and run.finish_reasons[0] == "eos"
    assert run.sections[0] == tok.decode(probe.section_ids[0][:cut]).strip()
    assert run.tokens == sum(len(s) for s in run.section_ids) - sum(r == "eos" for r in run.finish_reasons)
    eos = set(model.trunk.generation_config.eos_token_id)
    for ids, reason in zip(run.section_ids, run.finish_reasons):
        assert 1 <= len(ids) <= n and (reason == "length") == (len(ids) == n and ids[-1] not in eos)
    # Section 0 is written after exactly the stream prompt SoT gives stream 0.
    assert run.contexts[0] == render_ids(tok, stream_message(prompt, PLAN, PLAN[0]))
    for k, context in enumerate(run.contexts):
        text = tok.decode(context)
        assert text.rstrip().endswith(f'Write only the section "{PLAN[k]}".</s>\n<s>assistant')
        for j in range(k):  # every earlier section, under its heading, before this one is written
            assert f"{PLAN[j]}:\n{run.sections[j]}" in text
        assert all(f"{PLAN[j]}:\n" not in text for j in range(k, 3))


def test_serial_with_one_section_equals_hf_generate_of_the_same_context() -> None:
    from pdt_hf.generation.prompts import render_ids, stream_message

    model, tok = _tiny_model(), tiny_tokenizer()
    context = render_ids(tok, stream_message("Explain tea.", ["Water"], "Water"))
    ids = torch.tensor([context])
    with torch.no_grad():
        out = model.trunk.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0
        )
    expected = out[0, len(context) :].tolist()
    expected = expected[: next((i + 1 for i, t in enumerate(expected) if t == tok.eos_token_id), len(expected))]
    run = run_method(model, "serial", "Explain tea.", ["Water"], 10)
    assert run.contexts == [context] and run.section_ids == [expected]
    assert run.sections == [tok.decode(expected, skip_special_tokens=True).strip()]


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
    assert within_section_repetition(["too short", "x"]) == 0.0
    with pytest.raises(ValueError, match=r"sections \[1\] are empty"):
        within_section_repetition(["a b c d a b c d", " "])


# ------------------------------------------------------------------------------------------- empty sections
class _WordEncoder:
    """Bag-of-words sentence encoder, enough for redundancy on fixed text."""

    def encode(self, sentences: list[str]) -> np.ndarray:
        vocab: dict[str, int] = {}
        rows = [[vocab.setdefault(w, len(vocab)) for w in s.lower().split()] for s in sentences]
        out = np.zeros((len(sentences), max(1, len(vocab))))
        for i, row in enumerate(rows):
            out[i, row] = 1.0
        return out


def test_an_answer_with_an_empty_section_is_flagged_unscored_and_counted(monkeypatch) -> None:
    from pdt_hf.evaluation import evaluate as evaluate_module
    from pdt_hf.evaluation.prompt_sets import EvalItem
    from pdt_hf.evaluation.report import eval_markdown

    model, tok = _tiny_model(2), tiny_tokenizer()
    written = {"serial": ["Hot water.", "Green leaves."], "sot": ["Boil it.", "Steep it."], "pdt": ["Pour.", "Wait."]}
    empty_at = {("sot", 1): ["Boil it.", " \n"], ("pdt", 0): ["", "Wait."]}  # (method, prompt) -> sections

    def fake_run(model, method, prompt, plan, max_new_tokens, seed=0):
        sections = empty_at.get((method, int(prompt[-1])), written[method])
        ids = [tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s in sections]
        telemetry = {"commits": [], "coverage": [], "rolled_back_tokens": 0, "decoded_tokens": 8}
        return MethodRun(
            method,
            [s.strip() for s in sections],
            tokens=sum(len(i) - 1 for i in ids),
            decoded=8,
            seconds=1.0,
            section_ids=ids,
            telemetry=None if method == "serial" else telemetry,
            finish_reasons=["eos", "eos"],
        )

    monkeypatch.setattr(evaluate_module, "run_method", fake_run)
    items = [EvalItem(f"Explain tea {i}", ["Water", "Leaves"]) for i in range(3)]
    result = evaluate(model, items, 4, _WordEncoder(), methods=("serial", "sot", "pdt"), progress=False)
    rows = [p["methods"] for p in result["prompts"]]
    assert rows[1]["sot"]["empty_sections"] == [1] and rows[0]["pdt"]["empty_sections"] == [0]
    assert rows[0]["sot"]["empty_sections"] == [] and rows[2]["pdt"]["empty_sections"] == []
    for row in (rows[1]["sot"], rows[0]["pdt"]):
        assert all(row[m] is None for m in QUALITY) and row["tokens"] is not None
    assert rows[0]["sot"]["fidelity"] is not None and rows[0]["sot"]["coverage_text"] is not None
    assert result["empty_sections"] == {
        "serial": {"excluded": 0, "of": 3, "prompts": []},
        "sot": {"excluded": 1, "of": 3, "prompts": [1]},
        "pdt": {"excluded": 1, "of": 3, "prompts": [0]},
    }
    summary, paired = result["summary"], result["paired_vs_pdt"]
    assert summary["serial"]["fidelity"]["n"] == 3 and summary["sot"]["fidelity"]["n"] == 2
    assert summary["sot"]["tokens"]["n"] == 3  # cost is still reported for every answer
    # Paired differences only where both methods wrote every section: serial-pdt on prompts 1, 2; sot-pdt on 2.
    assert paired["serial"]["fidelity"]["n"] == 2 and paired["serial"]["tokens"]["n"] == 2
    assert paired["sot"]["redundancy_ngram4"]["n"] == 1 and paired["sot"]["tokens"]["n"] == 1
    assert result["finish_reasons"]["serial"] == {"eos": 6}
    markdown = eval_markdown(result)
    assert "serial 0 of 3; sot 1 of 3 (prompts 1); pdt 1 of 3 (prompts 0)" in markdown
    fidelity_row = next(line for line in markdown.splitlines() if line.startswith("| fidelity |"))
    assert [cell.endswith("(n=2)") for cell in fidelity_row.rstrip(" |").split(" | ")[1:]] == [False, True, True]


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
    assert result["methods"] == list(DEFAULT_EVAL_METHODS) == [m for m in EVAL_METHODS if m != "pdt-synthesis"]
    assert "synthesis" not in result  # only pdt-synthesis adds the conclusion comparison
    assert result["sidecar"] == "untrained" and result["machine"]["torch"] == torch.__version__
    assert result["command"].startswith("pdt eval --prompts")
    for method in DEFAULT_EVAL_METHODS:
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
    assert set(result["paired_vs_pdt"]) == set(DEFAULT_EVAL_METHODS) - {"pdt"}
    assert set(result["calibration"]) == set(PDT_METHODS) - {"pdt-synthesis"}

    for prompt in result["prompts"]:
        rows = prompt["methods"]
        assert len(rows["serial"]["sections"]) == 2 and set(rows["serial"]["finish_reasons"]) <= {"eos", "length"}
        assert all(rows[m]["tokens"] <= 2 * 8 for m in DEFAULT_EVAL_METHODS)
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


def test_pdt_eval_agreement_threshold_overrides_the_sidecar_tau(tiny_dir, tmp_path) -> None:
    model_dir, prompts = tiny_dir
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model_dir), "--prompts", str(prompts), "--streams", "2", "--max-new-tokens", "8"]
    argv += ["--methods", "pdt,pdt-no-rollback", "--agreement-threshold", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["tau"] == 1.0 and "--agreement-threshold 1" in result["command"]
    for prompt in result["prompts"]:
        rows = prompt["methods"]
        # No score reaches tau = 1: pdt rolls every block back, pdt-no-rollback still commits every block.
        assert rows["pdt"]["rollback_rate"] > 0.0 and rows["pdt-no-rollback"]["rollback_rate"] == 0.0
    assert "tau = 1.00" in (out / "eval.md").read_text()


@pytest.mark.parametrize("value", ["high", "1.5", "-0.1", "nan"])
def test_pdt_eval_rejects_bad_agreement_threshold(tiny_dir, tmp_path, value) -> None:
    model_dir, prompts = tiny_dir
    argv = ["eval", "--model", str(model_dir), "--prompts", str(prompts), "--agreement-threshold", value]
    with pytest.raises(SystemExit, match=f"--agreement-threshold '{value}' must be a number in"):
        main([*argv, "--out", str(tmp_path / "x"), "--no-progress"])


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
