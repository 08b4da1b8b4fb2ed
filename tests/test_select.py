"""Stream selection: the greedy MMR rule, the batched scores, determinism, generate/CLI wiring, SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.cli import main
from pdt_hf.generation import api
from pdt_hf.generation.plan import PlanError
from pdt_hf.generation.select import REDUNDANCY_WEIGHT, greedy_select, score_candidates, scoring_rows, select_plan

PROMPT = "Explain how to brew tea."
POOL = ["Water", "Leaves", "Steeping time", "Serving", "Water temperature", "Cups"]
REASONS = {"kept", "duplicate", "redundant", "less relevant"}


def _model() -> PDTForCausalLM:
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.generation_config.pad_token_id = 0
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3))
    model.tokenizer = tiny_tokenizer()
    return model


def test_greedy_select_trades_relevance_for_redundancy() -> None:
    relevance = [3.0, 2.9, 1.0, 2.0]
    similarity = [[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    # weight 2: after 0, candidate 1 gains 2.9 - 1.8 = 1.1 < 2.0 (3), then 1.1 > 1.0 (2).
    assert greedy_select(relevance, similarity, 3, weight=2.0) == [0, 3, 1]
    assert greedy_select(relevance, similarity, 3, weight=10.0) == [0, 3, 2]
    assert greedy_select(relevance, similarity, 3, weight=0.0) == [0, 1, 3]


def test_greedy_select_ties_and_negative_similarity() -> None:
    same = [[0.0] * 4 for _ in range(4)]
    assert greedy_select([1.0] * 4, same, 4) == [0, 1, 2, 3]
    # A negative similarity is no bonus: max(0, sim) keeps 2 ahead of 1 only by relevance.
    anti = [[0.0, -0.9, 0.0], [-0.9, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert greedy_select([2.0, 1.0, 1.5], anti, 2) == [0, 2]
    with pytest.raises(ValueError, match="cannot keep k=4 of 3"):
        greedy_select([1.0, 2.0, 3.0], same, 4)


@torch.no_grad()
def test_batched_scores_equal_one_plain_forward_per_row() -> None:
    model = _model()
    trunk, tok = model.trunk, model.tokenizer
    scores = score_candidates(trunk, tok, PROMPT, POOL, 3)
    request, null, items = scoring_rows(tok, PROMPT, POOL, 3)
    pooled = []
    for i, item in enumerate(items):
        for context, key in ((request, "log_likelihood"), (null, "null_log_likelihood")):
            ids = torch.tensor([context + item])
            out = trunk(input_ids=ids, output_hidden_states=True)
            logprobs = out.logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            expected = logprobs[len(context) - 1 :].mean()
            torch.testing.assert_close(scores[key][i], expected, atol=1e-5, rtol=1e-5)
            if context is request:
                middle = out.hidden_states[len(out.hidden_states) // 2][0]
                pooled.append(middle[len(context) : len(context) + max(1, len(item) - 1)].mean(0))
    states = torch.stack(pooled)
    states = F.normalize(states - states.mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(scores["similarity"], states @ states.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores["relevance"], scores["log_likelihood"] - scores["null_log_likelihood"])


def test_selection_is_deterministic_keeps_k_and_records_every_candidate() -> None:
    model = _model()
    first = select_plan(model.trunk, model.tokenizer, PROMPT, POOL, 3).to_dict()
    second = select_plan(model.trunk, model.tokenizer, PROMPT, POOL, 3).to_dict()
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    plan, records = first["plan"], first["candidates"]
    assert len(plan) == 3 and len(set(plan)) == 3
    assert plan == [item for item in POOL if item in plan]  # candidate order
    assert [r["item"] for r in records] == POOL and sum(r["kept"] for r in records) == 3
    assert sorted(r["pick"] for r in records if r["kept"]) == [1, 2, 3]
    assert {r["reason"] for r in records} <= REASONS
    first_pick = next(r for r in records if r["pick"] == 1)
    assert first_pick["relevance"] == max(r["relevance"] for r in records)
    for r in records:
        assert r["score"] == pytest.approx(r["relevance"] - REDUNDANCY_WEIGHT * max(0.0, r["redundancy"]))
        assert r["relevance"] == pytest.approx(r["log_likelihood"] - r["null_log_likelihood"])


def test_duplicates_are_dropped_and_too_few_distinct_refused() -> None:
    model = _model()
    pool = ["Water", "Leaves", "water ", "Serving"]
    sel = select_plan(model.trunk, model.tokenizer, PROMPT, pool, 3)
    assert sel.plan == ["Water", "Leaves", "Serving"]
    assert sel.candidates[2]["reason"] == "duplicate" and sel.candidates[2]["similar_to"] == 0
    with pytest.raises(PlanError, match="only 2 distinct candidates"):
        select_plan(model.trunk, model.tokenizer, PROMPT, ["Water", "WATER", "Leaves"], 3)


def test_generate_with_candidates_decodes_the_kept_plan() -> None:
    model = _model()
    out = model.generate(prompt=PROMPT, plan=POOL, plan_candidates=6, num_streams=3, max_new_tokens=10)
    selection = out.telemetry.selection
    assert selection["num_candidates"] == 6 and selection["source"] == "plan"
    assert out.plan == selection["plan"] and len(out.plan) == 3 and len(out.sequences) == 3
    assert out.telemetry.to_dict()["selection"] == selection and "select" in out.telemetry.timings
    reference = model.generate(prompt=PROMPT, plan=out.plan, max_new_tokens=10)
    assert reference.sequences == out.sequences and reference.telemetry.selection is None


def test_outline_is_asked_for_m_items(monkeypatch) -> None:
    model = _model()
    calls = []

    def outline(trunk, tokenizer, prompt, num_items, max_new_tokens):
        calls.append((num_items, max_new_tokens))
        return POOL[:num_items]

    monkeypatch.setattr(api, "skeleton_plan", outline)
    out = model.generate(prompt=PROMPT, plan_candidates=5, num_streams=2, max_new_tokens=6)
    assert calls == [(5, 96)]
    assert out.telemetry.selection["source"] == "outline" and len(out.plan) == 2
    assert [c["item"] for c in out.telemetry.selection["candidates"]] == POOL[:5]


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"plan_candidates": 2, "num_streams": 3}, PlanError, "plan_candidates=2 is below num_streams=3"),
        ({"plan_candidates": 2}, PlanError, "plan_candidates=2 is below num_streams=3"),  # the sidecar's K
        ({"plan_candidates": 4, "plan": POOL}, PlanError, "plan has 6 items but plan_candidates=4"),
        ({"plan_candidates": 0}, ValueError, "plan_candidates must be a positive integer, got 0"),
        ({"plan_candidates": True}, ValueError, "plan_candidates must be a positive integer, got True"),
    ],
)
def test_bad_candidate_arguments_are_refused(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        _model().generate(prompt=PROMPT, max_new_tokens=4, **kwargs)


@pytest.fixture
def model_dir(tmp_path):
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.save_pretrained(tmp_path / "trunk")
    tiny_tokenizer().save_pretrained(tmp_path / "trunk")
    return tmp_path / "trunk"


def test_cli_candidates_end_to_end_and_errors(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out.json"
    argv = ["generate", "Explain tea.", "--model", str(model_dir), "--max-new-tokens", "6", "--json", str(out)]
    assert main([*argv, "--streams", "2", "--candidates", "4", "--plan", "a; b; c; d"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert "selected 2 of 4 candidates" in printed
    assert len(data["plan"]) == 2 and data["telemetry"]["selection"]["plan"] == data["plan"]
    assert main([*argv, "--streams", "3", "--candidates", "2"]) == 2
    assert "--candidates=2 is below --streams=3" in capsys.readouterr().err
    assert main([*argv, "--candidates", "3", "--plan", "a; b"]) == 2
    assert "--plan has 2 items but --candidates=3" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_keeps_the_requested_parts_over_generic_and_paraphrased_titles() -> None:
    from pdt_hf.trunk.loading import load_tokenizer, load_trunk

    trunk, tok = load_trunk(None)[0].eval(), load_tokenizer(None)
    prompt = (
        "Write a short guide to starting a vegetable garden, covering site choice, soil preparation, and planting."
    )
    pool = ["Site choice", "Soil preparation", "Planting", "Preparing the soil", "Overview", "Summary"]
    sel = select_plan(trunk, tok, prompt, pool, 3)
    assert sel.plan == ["Site choice", "Soil preparation", "Planting"]
    paraphrase = sel.candidates[3]
    assert paraphrase["similar_to"] == 1 and paraphrase["redundancy"] > 0.3  # "Soil preparation"
    generic = [c["relevance"] for c in sel.candidates[4:]]
    assert max(generic) < min(c["relevance"] for c in sel.candidates[:3])


def test_pdt_select_eval_method_is_pdt_on_the_kept_plan() -> None:
    from pdt_hf.evaluation.baselines import run_method

    model = _model()
    plan = ["Water", "Leaves", "Serving"]
    run = run_method(model, "pdt-select", PROMPT, plan, 8)
    selection = run.telemetry["selection"]
    assert selection["num_candidates"] == 6 and [c["item"] for c in selection["candidates"]][:3] == plan
    assert run.plan == selection["plan"] and len(run.plan) == 3
    assert run.section_ids == run_method(model, "pdt", PROMPT, run.plan, 8).section_ids


class _WordEncoder:
    """Bag-of-words sentence encoder (enough for the redundancy metric on fixed text)."""

    def encode(self, sentences: list[str]):
        import numpy as np

        vocab: dict[str, int] = {}
        rows = [[vocab.setdefault(w, len(vocab)) for w in s.lower().split()] for s in sentences]
        out = np.zeros((len(sentences), max(1, len(vocab))))
        for i, row in enumerate(rows):
            out[i, row] = 1.0
        return out


def test_pdt_eval_scores_pdt_select_against_the_plan_it_kept(monkeypatch) -> None:
    from pdt_hf.evaluation import evaluate as evaluate_module
    from pdt_hf.evaluation.prompt_sets import EvalItem

    model = _model()
    plan = ["Water", "Leaves", "Serving"]
    seen: dict[str, list[str]] = {}
    real_coverage = evaluate_module.coverage_text

    def coverage(sections, items):
        seen[tuple(sections)] = list(items)
        return real_coverage(sections, items)

    monkeypatch.setattr(evaluate_module, "coverage_text", coverage)
    result = evaluate_module.evaluate(
        model, [EvalItem(PROMPT, plan)], 8, _WordEncoder(), methods=("pdt", "pdt-select"), progress=False
    )
    row = result["prompts"][0]["methods"]["pdt-select"]
    assert row["plan"] == row["selection"]["plan"] and len(row["plan"]) == 3
    assert [c["item"] for c in row["selection"]["candidates"]][:3] == plan
    assert seen[tuple(row["sections"])] == row["plan"]  # coverage is judged against the kept plan
    assert "pdt-select" in result["calibration"] and "coverage_text" in result["paired_vs_pdt"]["pdt-select"]
