"""Rollback gain: the fork against a real rollback, the teacher context, tau by net benefit, the command.

Tiny llama trunk (2 layers, hidden 64; SmolLM2-135M: 30 layers, hidden 576) with open sidecar gates and
amplified notes, so what a stream reads from its siblings changes what a regeneration writes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.cli import main
from pdt_hf.evaluation.evaluate import token_nlls
from pdt_hf.generation.decode import MultiStreamDecoder
from pdt_hf.generation.text_bus import lag_context
from pdt_hf.training.calibration import choose_rollback_threshold, net_benefit, rollback_labels
from pdt_hf.training.config import CalibrationConfig
from pdt_hf.training.rollback_gain import (
    HEAD_INPUTS,
    ForkingDecoder,
    RollbackGainRecords,
    build_decoder,
    decision_report,
    measure_rollback_gain,
    stream_inputs,
    teacher_context,
)

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]
B, N = 4, 16  # block size, tokens per stream: 4 rounds


def _model(**cfg) -> PDTForCausalLM:
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.generation_config.pad_token_id = 0
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3, block_size=B, instrumented_layers=[0, 1], **cfg))
    model.tokenizer = tiny_tokenizer()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for adapter in model.sidecar.adapters.values():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=gen) * 0.5)
            adapter.gate.copy_(1 + 0.3 * torch.randn(adapter.gate.shape, generator=gen))
        for snc in model.sidecar.snc.values():
            snc.gate.fill_(0.7)
            snc.o_proj.weight.mul_(10.0)
        model.sidecar.heads.notes.mlp[2].weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def measured():
    model = _model()
    return model, measure_rollback_gain(model, model.tokenizer, [(PROMPT, PLAN)], N)


class RollbackOnce(MultiStreamDecoder):
    """The real decoder, with the block of (stream, round) ``target`` scored 0 (rolled back) and every other 1."""

    target: tuple[int, int] = (-1, -1)

    def _decide(self, state, k, round, cache, next_logits, score, coverage, note):
        forced = 0.0 if (k, round) == self.target else 1.0
        return super()._decide(state, k, round, cache, next_logits, forced, coverage, note)


# ------------------------------------------------------------------------------------------- the fork
def test_regeneration_equals_what_the_decoder_writes_after_a_real_rollback(measured) -> None:
    model, records = measured
    tok = model.tokenizer
    assert len(records.blocks) == 3 * (N // B)  # every block of every stream, forked once
    for block in records.blocks:
        decoder = build_decoder(
            model, tok, PLAN, N, RollbackOnce, rollback=True, agreement_threshold=0.5, max_retries=1
        )
        decoder.target = (block["stream"], block["round"])
        out = decoder.run(PLAN, *stream_inputs(tok, PROMPT, PLAN))
        assert decoder.telemetry.rollbacks == [
            {"stream": block["stream"], "round": block["round"], "tokens": len(block["original"]), "retry": 1}
        ]
        start, regenerated = block["start"], block["regenerated"]
        assert out.sequences[block["stream"]][start : start + len(regenerated)] == regenerated
    # The regeneration reads the notes its siblings committed in the round of the original block.
    later = [b for b in records.blocks if b["round"] >= 1]
    assert all(b["notes_visible_regenerated"] > b["notes_visible"] for b in later)
    assert sum(not b["same"] for b in records.blocks) >= 3, "notes must change some regenerations"


def test_the_kept_blocks_are_decoding_with_rollback_off_and_the_inputs_give_the_score(measured) -> None:
    model, records = measured
    out = model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=N, block_size=B, rollback=False)
    for k, section in enumerate(out.sequences):
        mine = sorted((b for b in records.blocks if b["stream"] == k), key=lambda b: b["round"])
        assert [t for b in mine for t in b["original"]] == section
    scores = {(e["stream"], e["round"]): e["score"] for e in out.telemetry.commits}
    assert [b["score"] for b in records.blocks] == pytest.approx(
        [scores[b["stream"], b["round"]] for b in records.blocks]
    )
    head = model.sidecar.heads.agreement
    with torch.no_grad():
        again = head(*[records.inputs[name] for name in HEAD_INPUTS]).sigmoid()
    torch.testing.assert_close(again, torch.tensor([b["score"] for b in records.blocks]), atol=1e-5, rtol=0)
    assert all(0.0 <= b["max_prob"] <= 1.0 and b["entropy"] >= 0.0 for b in records.blocks)


def test_both_blocks_are_scored_after_the_same_teacher_context_of_the_regeneration_round(measured) -> None:
    model, records = measured
    tok = model.tokenizer
    sections = [[] for _ in PLAN]
    for b in sorted(records.blocks, key=lambda b: b["round"]):
        sections[b["stream"]] += b["original"]
    moved = 0
    for b in records.blocks:
        k, r = b["stream"], b["round"]
        context = lag_context(tok, PROMPT, PLAN, sections, k, r + 1, 1, B) + sections[k][: (r - 1) * B]
        assert context == teacher_context(tok, PROMPT, PLAN, sections, k, r, 1, B)
        assert len(context) == b["teacher_context_tokens"]
        with torch.no_grad():
            original = float(token_nlls(model.trunk, context, b["original"]).mean())
            regenerated = float(token_nlls(model.trunk, context, b["regenerated"]).mean())
            at_round = lag_context(tok, PROMPT, PLAN, sections, k, r, 1, B) + sections[k][: (r - 1) * B]
            moved += abs(float(token_nlls(model.trunk, at_round, b["original"]).mean()) - original) > 1e-4
        assert b["nll_original"] == pytest.approx(original, abs=1e-4)
        assert b["nll_regenerated"] == pytest.approx(regenerated, abs=1e-4)
        assert b["gain"] == pytest.approx(b["nll_original"] - b["nll_regenerated"])
        if b["same"]:
            assert b["gain"] == pytest.approx(0.0, abs=1e-5)
    assert moved >= 3, "the siblings' round-r blocks are in the teacher's context, so scores move"


def test_records_round_trip_through_json_and_safetensors(measured, tmp_path) -> None:
    _, records = measured
    records.save(str(tmp_path / "rec"))
    again = RollbackGainRecords.load(str(tmp_path / "rec"))
    assert again.blocks == json.loads(json.dumps(records.blocks))
    for name in HEAD_INPUTS:
        assert torch.equal(again.inputs[name], records.inputs[name])


def test_the_fork_refuses_a_sidecar_that_reads_its_own_notes() -> None:
    model = _model(read_own_notes=True)
    with pytest.raises(ValueError, match="read_own_notes=True"):
        build_decoder(model, model.tokenizer, PLAN, N)
    with pytest.raises(ValueError, match="rollback off; pass rollback=False"):
        build_decoder(_model(), model.tokenizer, PLAN, N, ForkingDecoder, rollback=True)


# ------------------------------------------------------------------------------------------ labels and tau
SCORES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
GAINS = [0.6, 0.4, 0.2, -0.1, 0.3, -0.4, -0.2, -0.3]
# With cost 0.05 the running sum of (gain - cost) from the lowest score is
#   0.55, 0.90, 1.05, 0.90, 1.15, 0.70, 0.45, 0.10  -> best: roll back the 5 lowest, tau = (0.5 + 0.6) / 2.


def test_tau_is_the_net_benefit_optimum_on_a_hand_made_example() -> None:
    choice = choose_rollback_threshold(SCORES, GAINS, cost=0.05, max_share=1.0, min_precision_gain=0.0)
    assert choice["candidate_tau"] == pytest.approx(0.55)
    assert choice["net_benefit"] == pytest.approx(1.15)
    assert choice["rollback_share"] == pytest.approx(5 / 8)
    assert net_benefit(SCORES, GAINS, choice["candidate_tau"], 0.05) == pytest.approx(1.15)
    assert rollback_labels(GAINS, 0.05).tolist() == [True, True, True, False, True, False, False, False]
    # Ten copies of the same blocks: precision 0.8 on 50 rollbacks beats the base rate 0.5 by a clear margin.
    choice = choose_rollback_threshold(SCORES * 10, GAINS * 10, 0.05, 1.0, CalibrationConfig().min_precision_gain)
    assert choice["tau"] == pytest.approx(0.55) and choice["rollback_decision"]["pays"]
    assert choice["net_benefit"] == pytest.approx(11.5)


def test_tau_is_zero_when_every_gain_is_negative() -> None:
    gains = [-0.3, -0.01, -0.2, -0.5, -0.1, -0.05, -0.4, -0.02]
    choice = choose_rollback_threshold(SCORES, gains, cost=0.0, max_share=1.0, min_precision_gain=0.0)
    assert choice["tau"] == 0.0 and choice["candidate_tau"] == 0.0 and choice["net_benefit"] == 0.0
    assert "no tau" in choice["reason"]
    # Gains above zero but below the cost do not pay either.
    choice = choose_rollback_threshold(SCORES, [0.04] * 8, cost=0.05, max_share=1.0, min_precision_gain=0.0)
    assert choice["tau"] == 0.0


def test_the_budget_caps_the_rollback_share() -> None:
    free = choose_rollback_threshold(SCORES * 10, GAINS * 10, 0.05, 1.0, 0.1)
    capped = choose_rollback_threshold(SCORES * 10, GAINS * 10, 0.05, 0.3, 0.1)
    assert free["rollback_share"] == pytest.approx(0.625)
    assert capped["rollback_share"] == pytest.approx(0.25) and capped["tau"] == pytest.approx(0.25)
    assert capped["net_benefit"] == pytest.approx(9.0)  # the two lowest groups: 10 x (0.55 + 0.35)
    assert capped["rollback_share"] <= 0.3 < free["rollback_share"]


def test_a_positive_benefit_no_better_than_chance_is_turned_off_by_rollback_pays() -> None:
    scores = np.linspace(0.0, 1.0, 60, endpoint=False)
    gains = np.where(np.arange(60) % 2 == 0, 0.1, -0.1)
    gains[0] = 10.0  # one huge gain at the lowest score, the rest unrelated to the score
    choice = choose_rollback_threshold(scores, gains, 0.05, 0.25, 0.1)
    assert choice["candidate_tau"] > 0.0 and choice["net_benefit"] > 0.0
    assert choice["tau"] == 0.0 and not choice["rollback_decision"]["pays"] and "precision" in choice["reason"]


def test_decision_report_on_hand_made_records() -> None:
    blocks = [
        {"prompt_index": i // 4, "score": s, "gain": g, "entropy": 1.0 - s, "max_prob": s, "same": g == 0.0}
        for i, (s, g) in enumerate(zip(SCORES, GAINS))
    ]
    rep = decision_report(RollbackGainRecords(blocks, {}, {}), tau=0.55, cost=0.05)
    assert rep["blocks"] == 8 and rep["prompts"] == 2
    assert rep["precision"] == pytest.approx(4 / 5) and rep["recall"] == pytest.approx(1.0)
    assert rep["pays_share"] == pytest.approx(0.5) and rep["rollback_share"] == pytest.approx(5 / 8)
    assert rep["mean_gain_rolled_back"] == pytest.approx(np.mean(GAINS[:5]))
    assert rep["net_benefit"] == pytest.approx(1.15)
    # 1 - score as P(pays): bins 0.2..0.9 hold one block each; |label - confidence| averaged.
    expected = np.mean(np.abs(np.array([1, 1, 1, 0, 1, 0, 0, 0]) - (1 - np.array(SCORES))))
    assert rep["ece"] == pytest.approx(expected)
    assert rep["auc_pays"]["1 - score"] == pytest.approx(15 / 16)  # one inversion: (0.4, no) above (0.5, pays)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": [0.2, 1.5]}, r"scores span \[0.2, 1.5\]; pass agreement scores in \[0, 1\]"),
        ({"scores": [0.2]}, "got 1 scores and 2 gains; pass one score and one gain per block"),
        ({"gains": [0.1, float("nan")]}, "gains hold NaN or inf"),
        ({"cost": -0.1}, r"rollback_cost=-0.1 must be a finite number >= 0 nats/token, e.g. 0.05"),
        ({"max_share": 0.0}, r"max_rollback_share=0.0 must be in \(0, 1\], e.g. 0.25"),
        ({"min_precision_gain": 2.0}, r"min_precision_gain=2.0 must be in \[0, 1\], e.g. 0.1"),
    ],
)
def test_bad_input_errors_name_the_value_and_the_fix(kwargs, message) -> None:
    args = {"scores": [0.2, 0.4], "gains": [0.1, -0.1], "cost": 0.05, "max_share": 0.25, "min_precision_gain": 0.1}
    with pytest.raises(ValueError, match=message):
        choose_rollback_threshold(**{**args, **kwargs})


def test_config_and_decoder_errors_name_the_value_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"calibration.rollback_cost must be a finite number >= 0.*got -1"):
        CalibrationConfig(rollback_cost=-1)
    with pytest.raises(ValueError, match=r"calibration.max_rollback_share must be in \(0, 1\], got 1.5"):
        CalibrationConfig(max_rollback_share=1.5)
    model = _model()
    with pytest.raises(ValueError, match="a plan of 4 items needs 1 to 3 streams"):
        build_decoder(model, model.tokenizer, PLAN + ["Extra"], N)


# ------------------------------------------------------------------------------------------- the command
def test_pdt_calibrate_rollback_writes_tau_and_the_report(tmp_path, capsys) -> None:
    model_dir, sidecar = tmp_path / "tiny", tmp_path / "sidecar"
    model = _model()
    model.trunk.save_pretrained(model_dir)
    model.tokenizer.save_pretrained(model_dir)
    model.save_pretrained(sidecar)
    (sidecar / "pdt_config.json").chmod(0o644)
    before = json.loads((sidecar / "pdt_config.json").read_text())
    assert before["agreement_threshold"] == 0.5
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Explain tea: water, leaves, and time.\nPlan a trip.\nWrite about soil.\n")
    out = tmp_path / "out"
    argv = ["calibrate-rollback", "--model", str(model_dir), "--sidecar", str(sidecar), "--prompts", str(prompts)]
    argv += ["--limit", "2", "--held-out-limit", "1", "--max-new-tokens", "8", "--out", str(out), "--no-progress"]
    assert main([*argv, "--write", "--threads", "1"]) == 0
    result = json.loads((out / "rollback.json").read_text())
    after = json.loads((sidecar / "pdt_config.json").read_text())
    assert after["agreement_threshold"] == result["choice"]["tau"]
    assert {k: v for k, v in after.items() if k != "agreement_threshold"} == {
        k: v for k, v in before.items() if k != "agreement_threshold"
    }
    assert not [p for p in sidecar.iterdir() if p.name.startswith(".tmp-")]
    assert (sidecar / "pdt_config.json").stat().st_mode & 0o777 == 0o644
    assert result["reports"]["calibration"]["at_tau"]["prompts"] == 2
    assert result["reports"]["held_out"]["at_tau"]["prompts"] == 1
    assert 3 <= result["reports"]["held_out"]["at_tau"]["blocks"] <= 3 * 2  # K streams x 2 blocks, fewer at EOS
    assert (out / "rollback.png").read_bytes()[:4] == b"\x89PNG"
    assert "tau =" in (out / "rollback.md").read_text()
    # A new cost reuses the measured blocks.
    capsys.readouterr()
    assert main([*argv, "--reuse", "--rollback-cost", "0.5"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    again = json.loads((out / "rollback.json").read_text())
    assert again["choice"]["rollback_cost"] == 0.5
    assert (
        again["reports"]["calibration"]["at_tau"]["mean_gain"]
        == result["reports"]["calibration"]["at_tau"]["mean_gain"]
    )


def test_pdt_calibrate_rollback_refuses_the_same_split_twice(capsys) -> None:
    assert main(["calibrate-rollback", "--split", "test", "--held-out-split", "test"]) == 2
    assert "--split and --held-out-split are both 'test'" in capsys.readouterr().err


def test_the_shipped_prompts_give_each_split_for_calibration() -> None:
    from pdt_hf.evaluation.prompt_sets import load_eval_items
    from pdt_hf.training.data.config import DataBuildConfig
    from pdt_hf.training.data.sources import load_prompts, split_prompts

    splits = split_prompts(load_prompts(DataBuildConfig()), DataBuildConfig())
    validation = load_eval_items(None, 3, limit=4, split="validation")
    assert [i.prompt for i in validation] == splits["validation"][:4]
    assert all(len(i.plan) == 3 for i in validation)
    with pytest.raises(ValueError, match="split 'dev' is unknown"):
        load_eval_items(None, 3, split="dev")
