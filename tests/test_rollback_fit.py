"""The agreement head refit on rollback-gain labels (``calibrate-rollback --fit-head``).

Hand-made records (hidden 16, d_note 8, head width 12) where one hidden unit of the head decides whether a
rollback pays, so a refit that reads the labels must find it; the command on the tiny llama trunk.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_rollback_gain import _model

from pdt_hf.cli import main
from pdt_hf.sidecars.heads.config import HeadsConfig
from pdt_hf.sidecars.heads.layer import AgreementHead
from pdt_hf.training.rollback_fit import fit_agreement_head, load_agreement_head, rescore, save_agreement_head
from pdt_hf.training.rollback_gain import HEAD_INPUTS, RollbackGainRecords, _auc

D, D_NOTE, WIDTH, COST = 16, 8, 12, 0.05


def _records(n: int = 200, seed: int = 0) -> tuple[AgreementHead, RollbackGainRecords]:
    """A head and blocks whose gain is large exactly where the head's hidden unit 3 is large."""
    torch.manual_seed(seed)
    head = AgreementHead(D, D_NOTE, HeadsConfig(hidden_size=WIDTH)).eval()
    inputs = {
        "block_state": torch.randn(n, D),
        "notes_summary": torch.randn(n, D_NOTE),
        "coverage": torch.rand(n),
        "provisional_note": torch.randn(n, D_NOTE),
    }
    with torch.no_grad():
        unit = head.hidden(*(inputs[k] for k in HEAD_INPUTS))[:, 3].numpy()
    cut = np.quantile(unit, 0.85)
    gains = np.where(unit > cut, 0.5, -0.2)
    blocks = [{"prompt_index": i // 6, "score": 0.5, "gain": float(g), "same": False} for i, g in enumerate(gains)]
    return head, rescore(head, RollbackGainRecords(blocks, inputs, {}))


def test_the_refit_finds_the_unit_that_predicts_the_gain_and_moves_only_the_output_layer() -> None:
    head, records = _records()
    pays = records.array("gain") > COST
    before = _auc(1.0 - records.array("score"), pays)
    fitted, summary = fit_agreement_head(head, records, COST, l2=0.01)
    after = _auc(1.0 - rescore(fitted, records).array("score"), pays)
    assert after > 0.97 and after > before
    assert summary["loss_after"] < summary["loss_before"]
    assert summary["blocks"] == 200 and summary["paying"] == int(pays.sum())
    torch.testing.assert_close(fitted.mlp[0].weight, head.mlp[0].weight)  # the layers below stay as trained
    assert not torch.equal(fitted.mlp[2].weight, head.mlp[2].weight)


def test_a_strong_pull_keeps_the_trained_head() -> None:
    head, records = _records()
    fitted, _ = fit_agreement_head(head, records, COST, l2=1e9)
    torch.testing.assert_close(fitted.mlp[2].weight, head.mlp[2].weight, atol=1e-6, rtol=0)


def test_rescore_reproduces_the_recorded_score_of_a_real_decode() -> None:
    from test_rollback_gain import PLAN, PROMPT, N

    from pdt_hf.training.rollback_gain import measure_rollback_gain

    model = _model()
    records = measure_rollback_gain(model, model.tokenizer, [(PROMPT, PLAN)], N)
    again = rescore(model.sidecar.heads.agreement.float(), records)
    np.testing.assert_allclose(again.array("score"), records.array("score"), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"l2": -1.0}, "l2=-1.0 must be a finite number >= 0"), ({"cost": 0.5}, "every gain equals the rollback cost")],
)
def test_bad_fit_input_errors_name_the_value_and_the_fix(kwargs, message) -> None:
    head, records = _records(n=12)
    if "cost" in kwargs:
        records = RollbackGainRecords([{**b, "gain": 0.5} for b in records.blocks], records.inputs, {})
    with pytest.raises(ValueError, match=message):
        fit_agreement_head(head, records, kwargs.get("cost", COST), kwargs.get("l2", 1.0))


def test_pdt_calibrate_rollback_fit_head_reports_both_heads_and_writes_the_refitted_one(tmp_path) -> None:
    model_dir, sidecar = tmp_path / "tiny", tmp_path / "sidecar"
    model = _model()
    model.trunk.save_pretrained(model_dir)
    model.tokenizer.save_pretrained(model_dir)
    model.save_pretrained(sidecar)
    weights = sidecar / "sidecar.safetensors"
    weights.chmod(0o644)
    before = load_file(weights)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "Explain tea: water, leaves, and time.\nPlan a trip.\nWrite about soil.\nDescribe a river.\nCompare two maps.\n"
    )
    out = tmp_path / "out"
    argv = ["calibrate-rollback", "--model", str(model_dir), "--sidecar", str(sidecar), "--prompts", str(prompts)]
    argv += ["--fit-head", "--fit-limit", "2", "--limit", "2", "--held-out-limit", "1", "--max-new-tokens", "8"]
    argv += ["--rollback-cost", "0", "--max-rollback-share", "1.0", "--min-precision-gain", "0"]
    assert main([*argv, "--out", str(out), "--no-progress", "--threads", "1", "--write"]) == 0
    result = json.loads((out / "rollback.json").read_text())
    fit = json.loads((out / "records-fit.json").read_text())["settings"]
    assert [p for p, _ in fit["prompts"]] == ["Explain tea: water, leaves, and time.", "Plan a trip."]
    assert result["head"] == "refitted on gain labels" and result["head_fit"]["blocks"] == len(
        json.loads((out / "records-fit.json").read_text())["blocks"]
    )
    assert {"at_tau", "as_trained_at_tau"} <= set(result["reports"]["held_out"])
    text = (out / "rollback.md").read_text()
    assert "| held_out | as trained |" in text and "| fit | refitted |" in text
    after = load_file(weights)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert result["choice"]["tau"] > 0  # cost 0, no precision margin: the refitted head rolls back paying blocks
    assert result["written_head"] == str(weights)
    assert changed and all(k.startswith("heads.agreement.mlp.2.") for k in changed)
    assert weights.stat().st_mode & 0o777 == 0o644
    assert not [p for p in os.listdir(sidecar) if p.startswith(".tmp-")]
    assert json.loads((sidecar / "pdt_config.json").read_text())["agreement_threshold"] == result["choice"]["tau"]
    # When no tau pays, tau = 0 is written and the head the sidecar was trained with stays.
    argv[argv.index("--rollback-cost") + 1] = "10"
    assert main([*argv, "--out", str(out), "--no-progress", "--threads", "1", "--write", "--reuse"]) == 0
    result = json.loads((out / "rollback.json").read_text())
    assert result["choice"]["tau"] == 0.0 and "written_head" not in result
    assert all(torch.equal(after[k], v) for k, v in load_file(weights).items())


def test_fit_head_errors_name_the_value_and_the_fix(tmp_path, capsys) -> None:
    assert main(["calibrate-rollback", "--fit-head", "--fit-split", "validation"]) == 2
    assert "--fit-split 'validation' is also --split or --held-out-split" in capsys.readouterr().err
    assert main(["calibrate-rollback", "--fit-head", "--model", "x"]) == 2
    assert "--fit-head refits a trained agreement head; pass --sidecar DIR" in capsys.readouterr().err


def test_save_agreement_head_writes_its_own_head_back_and_refuses_another_shape(tmp_path) -> None:
    sidecar = tmp_path / "sidecar"
    model = _model()
    model.save_pretrained(sidecar)
    d_note = model.sidecar.heads.notes.mlp[2].weight.shape[0]
    loaded = load_agreement_head(str(sidecar), RollbackGainRecords([], {"notes_summary": torch.zeros(1, d_note)}, {}))
    torch.testing.assert_close(loaded.mlp[0].weight, model.sidecar.heads.agreement.mlp[0].weight.float())
    before = load_file(sidecar / "sidecar.safetensors")
    save_agreement_head(str(sidecar), loaded)
    after = load_file(sidecar / "sidecar.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="has no tensor heads.agreement.mlp.0.weight of shape"):
        save_agreement_head(str(sidecar), _records(n=12)[0])
