"""Exact-value tests of the training curriculum's pieces: rounds, losses, note visibility, configs, checkpoints."""

from __future__ import annotations

import glob
import os

import pytest
import torch
import yaml
from training_helpers import REPO, TINY_RECIPE

from pdt_hf.generation.prompts import stream_message
from pdt_hf.modeling import shifted_lm_loss
from pdt_hf.sidecars.context import ALWAYS_VISIBLE_ROUND
from pdt_hf.training.checkpointing import optimizer_from_tensors, optimizer_to_tensors
from pdt_hf.training.config import load_recipe
from pdt_hf.training.configuration import ConfigError
from pdt_hf.training.curriculum import StageConfig
from pdt_hf.training.data.config import DataBuildConfig
from pdt_hf.training.data.plan import coverage_labels, fallback_plan, parse_plan, serial_message
from pdt_hf.training.data.sources import split_prompts
from pdt_hf.training.losses import block_means, section_cross_entropy, topk_bucket_kl, usage_hinge
from pdt_hf.training.notes import check_window, row_notes, visible_summary
from pdt_hf.training.rounds import (
    NO_NOTES_ROUND,
    block_bounds,
    predicted_blocks,
    section_query_rounds,
    state_positions,
)
from pdt_hf.training.trainer import example_order

NONE = NO_NOTES_ROUND


# ---------------------------------------------------------------------------------------------- rounds
def test_rounds_match_the_docstring_diagram():
    assert block_bounds(10, 4) == [0, 4, 8, 10]
    assert predicted_blocks(10, 4) == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert section_query_rounds(10, 4) == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert state_positions(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize(
    "length, block, states",
    [
        (0, 4, []),
        (1, 4, [[0]]),
        (2, 4, [[0, 1]]),
        (4, 4, [[0, 1, 2, 3]]),
        (5, 4, [[0, 1, 2, 3], [4]]),
        (3, 1, [[0], [1], [2]]),
    ],
)
def test_state_positions_edges(length, block, states):
    assert state_positions(length, block) == states
    assert len(block_bounds(length, block)) == len(states) + 1


def test_no_notes_round_sees_not_even_planner_notes():
    for lag in (0, 1, 5):
        assert not ALWAYS_VISIBLE_ROUND <= NONE - lag
        assert ALWAYS_VISIBLE_ROUND <= 0 - lag


# ---------------------------------------------------------------------------------------------- losses
def test_bucket_kl_is_exact_kl_with_full_support_and_zero_on_match():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(3, 6, generator=g), -1)
    q = torch.log_softmax(torch.randn(3, 6, generator=g), -1)
    exact = (p.exp() * (p - q)).sum(-1)
    torch.testing.assert_close(topk_bucket_kl(p, q), exact, rtol=1e-5, atol=1e-6)
    top = p.topk(2, -1)
    assert torch.allclose(topk_bucket_kl(top.values, top.values), torch.zeros(3), atol=1e-6)
    partial = topk_bucket_kl(top.values, q.gather(-1, top.indices))
    assert (partial > 0).all() and (partial <= exact + 1e-6).all()  # coarse-graining never raises KL


def test_section_cross_entropy_equals_shifted_lm_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100, -100], [-100, 1, 2, 3, 4, 5, 6]])
    positions = torch.tensor([[1, 2, 3, 0, 0, 0], [0, 1, 2, 3, 4, 5]])  # position predicting each section token
    targets = torch.tensor([[3, 4, 5, -100, -100, -100], [1, 2, 3, 4, 5, 6]])
    gathered = logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, 11))
    per_token = section_cross_entropy(gathered, targets)
    mean = per_token.sum() / (targets != -100).sum()
    torch.testing.assert_close(mean, shifted_lm_loss(logits, labels))


def test_block_means_and_usage_hinge_exact():
    values = torch.tensor([[1.0, 3.0, 5.0, 7.0, 100.0]])
    block = torch.tensor([[1, 1, 2, 2, 2]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert block_means(values, block, 3, mask).tolist() == [[2.0, 6.0, 0.0]]
    true, ablated = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.5, 1.0]])
    weight = torch.tensor([[1.0, 3.0]])
    # block 0: relu(0.1 + 1 - 1.5) = 0; block 1: relu(0.1 + 2 - 1) = 1.1 -> (0 * 1 + 1.1 * 3) / 4
    torch.testing.assert_close(usage_hinge(true, ablated, weight, 0.1), torch.tensor(3.3 / 4))
    assert usage_hinge(true, ablated, torch.zeros(1, 2), 0.1).item() == 0.0


# ---------------------------------------------------------------------------------------------- notes
def _visible(notes, row, token):
    q = notes.query_round[row, token]
    return [
        m
        for m in range(notes.notes.shape[1])
        if notes.note_valid[row, m] and notes.note_round[row, m] <= q - notes.lag
    ]


def test_row_notes_visibility_matches_decoding_rule():
    e, k, r, d = 1, 2, 2, 3
    planner = torch.arange(e * k * d, dtype=torch.float).view(e, k, d)
    blocks = 10 + torch.arange(e * k * r * d, dtype=torch.float).view(e, k, r, d)
    valid = torch.ones(e, k, r, dtype=torch.bool)
    query = torch.tensor([[NONE, 1, 2, 3]] * 2)
    notes = row_notes(planner, blocks, valid, torch.tensor([0, 0]), torch.tensor([0, 1]), query, lag=1, read_own=False)
    # slots: stream 0 -> [planner, r1, r2] = 0, 1, 2; stream 1 -> 3, 4, 5
    assert notes.note_round[0].tolist() == [ALWAYS_VISIBLE_ROUND, 1, 2] * 2
    assert [_visible(notes, 0, t) for t in range(4)] == [[], [3], [3, 4], [3, 4, 5]]
    assert [_visible(notes, 1, t) for t in range(4)] == [[], [0], [0, 1], [0, 1, 2]]
    torch.testing.assert_close(notes.notes[0, 4], blocks[0, 1, 0])
    own = row_notes(planner, blocks, valid, torch.tensor([0, 0]), torch.tensor([0, 1]), query, lag=0, read_own=True)
    assert _visible(own, 0, 1) == [0, 1, 3, 4]
    summary = visible_summary(notes, 2)  # row 0, round 1 sees slot 3; round 2 sees slots 3, 4
    torch.testing.assert_close(summary[0, 0], planner[0, 1])
    torch.testing.assert_close(summary[0, 1], (planner[0, 1] + blocks[0, 1, 0]) / 2)


def test_window_check_names_the_fix():
    check_window(3, 4, 16, read_own=False)  # 2 x 5 = 10 <= 16
    with pytest.raises(ValueError, match="note_window"):
        check_window(3, 8, 16, read_own=False)  # 2 x 9 = 18 > 16


# ---------------------------------------------------------------------------------------------- configs
# Training recipes only: probe-*.yaml configure recipes/probe.py (tests/test_probe.py covers them).
TRAINING_RECIPES = sorted(
    p
    for p in glob.glob(os.path.join(REPO, "recipes", "configs", "*.yaml"))
    if not os.path.basename(p).startswith("probe-")
)


@pytest.mark.parametrize("path", TRAINING_RECIPES)
def test_every_shipped_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    names = [s.name for s in recipe.curriculum]
    assert names[:4] == ["heads", "adapters", "snc", "judges"] and names[4:] in ([], ["synthesis"])
    assert recipe.pdt.synthesis == (names[4:] == ["synthesis"])
    assert recipe.curriculum[2].notes_visible and "snc" in recipe.curriculum[2].trainable


def test_shipped_recipe_set_and_accelerate_configs():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "recipes", "configs", "*.yaml"))}
    assert {"smollm2-135m.yaml", "qwen2.5-1.5b.yaml", "qwen2.5-7b.yaml", "gpt-oss-20b.yaml", "tiny.yaml"} <= names
    assert load_recipe(os.path.join(REPO, "recipes", "configs", "qwen2.5-7b.yaml")).model.load_in_4bit
    kinds = {}
    for path in glob.glob(os.path.join(REPO, "recipes", "accelerate", "*.yaml")):
        with open(path) as handle:
            kinds[os.path.basename(path)] = yaml.safe_load(handle)["distributed_type"]
    assert kinds == {"single_gpu.yaml": "NO", "ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "cpu.yaml": "NO"}


def test_overrides_by_stage_name_and_errors():
    recipe = load_recipe(TINY_RECIPE, ["curriculum.adapters.steps=7"])
    assert recipe.curriculum[1].steps == 7
    with pytest.raises(ConfigError, match="unknown stage 'nope'"):
        load_recipe(TINY_RECIPE, ["curriculum.nope.steps=3"])
    with pytest.raises(ConfigError, match="unknown key.*'train'"):
        load_recipe(TINY_RECIPE, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="run_stages names unknown stage"):
        load_recipe(TINY_RECIPE, ["train.run_stages=[heads, warmup]"])


def test_note_grad_lets_the_readers_losses_train_the_notes_head():
    stage = StageConfig("s", ["snc", "heads.notes"], {"kd": 1.0}, 3, notes_visible=True, note_grad=True)
    assert stage.note_grad and stage.gate_lr_scale == 1.0


@pytest.mark.parametrize(
    "stage, message",
    [
        (dict(trainable=["adapter"], losses={"lm": 1.0}, steps=3), "unknown sidecar family 'adapter'"),
        (dict(trainable=["adapters"], losses={"lm": 1.0}, steps=0), "at least 1 step"),
        (dict(trainable=["adapters"], losses={"lmm": 1.0}, steps=3), "unknown loss"),
        (dict(trainable=["heads.coverage"], losses={"lm": 1.0}, steps=3), "trains heads.coverage but none"),
        (dict(trainable=["snc"], losses={"kd": 1.0}, steps=3), "SNC needs notes_visible"),
        (dict(trainable=["adapters"], losses={"lm": 1.0, "agreement": 1.0}, steps=3), "reaches no trainable"),
        (dict(trainable=["snc"], losses={"usage": 1.0}, steps=3), "set notes_visible: true"),
        (dict(trainable=["heads.notes"], losses={"kd": 1.0}, steps=3, note_grad=True), "note_grad trains"),
        (
            dict(trainable=["snc", "heads.notes"], losses={"kd": 1.0}, steps=3, notes_visible=True),
            "trains heads.notes but none",
        ),
        (dict(trainable=["adapters"], losses={"lm": 1.0}, steps=3, gate_lr_scale=0), "gate_lr_scale must be > 0"),
    ],
)
def test_bad_stage_is_rejected_with_the_fix(stage, message):
    with pytest.raises(ValueError, match=message):
        StageConfig(name="s", **stage)
    with pytest.raises(ConfigError, match=message):
        load_recipe(TINY_RECIPE, [f"curriculum.0.{k}={v}" for k, v in stage.items()])


# ---------------------------------------------------------------------------------------------- data text
def test_split_is_by_prompt_disjoint_and_order_independent():
    prompts = [f"Explain topic number {i}: history, uses, and limits." for i in range(200)]
    cfg = DataBuildConfig(max_prompts={"train": None, "validation": None, "test": None})
    a, b = split_prompts(prompts, cfg), split_prompts(prompts[::-1], cfg)
    assert a == b
    sets = [set(a[s]) for s in ("train", "validation", "test")]
    assert sum(map(len, sets)) == 200 and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert 120 < len(a["train"]) < 190
    capped = split_prompts(prompts, DataBuildConfig(max_prompts={"train": 5, "validation": 2, "test": 0}))
    assert capped["train"] == a["train"][:5] and capped["test"] == []


def test_plan_parsing_fallback_and_serial_message():
    text = "1. **Site Choice** - pick a sunny spot\n2. Soil: compost\n\n3. Planting\nmore prose here"
    assert parse_plan(text, 3) == ["Site Choice", "Soil", "Planting"]
    assert parse_plan("One long sentence of prose without any list at all, really.", 3) is None
    prompt = (
        "Write a short guide to starting a vegetable garden, covering site choice, soil preparation, and planting."
    )
    assert fallback_plan(prompt, 3) == (["Site choice", "Soil preparation", "Planting"], "prompt")
    assert fallback_plan("Tell me a joke.", 2)[1] == "generic"
    plan = ["A", "B"]
    assert serial_message(prompt, plan, 0, []) == stream_message(prompt, plan, "A")
    later = serial_message(prompt, plan, 1, ["first text"])
    assert "first text" in later and later.endswith('Write only the section "B".')


def test_coverage_labels_own_item_and_lexical_overlap():
    plan = ["Soil preparation", "Planting seeds"]
    labels = coverage_labels(["dig the soil deeply", "water daily", "planting seeds in rows"], plan, 0, 0.5)
    assert labels == [[1, 0], [1, 0], [1, 1]]


# ---------------------------------------------------------------------------------------------- loop pieces
def test_optimizer_state_round_trip_without_pickle():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    tensors, meta = optimizer_to_tensors(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    yaml.safe_dump(meta)  # plain data only
    fresh = torch.optim.AdamW(params, lr=1e-2)
    fresh.load_state_dict(optimizer_from_tensors(tensors, meta))
    for p in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fresh.state[p][key], opt.state[p][key])


def test_example_order_is_a_pure_function_of_the_cursor():
    whole = example_order(0, 12, 5, seed=3)
    assert example_order(4, 8, 5, seed=3) == whole[4:]
    assert sorted(whole[:5]) == list(range(5)) and sorted(whole[5:10]) == list(range(5))
    assert whole[:5] != whole[5:10] or whole[:5] != example_order(0, 5, 5, seed=4)


def test_shipped_smollm2_sidecar_matches_the_trunk_layout():
    """The committed sidecar loads onto a SmolLM2-135M-shaped trunk (built on the meta device) and carries tau."""
    import transformers

    from pdt_hf import PDTConfig, PDTForCausalLM
    from pdt_hf.budget import SMOLLM2_135M
    from pdt_hf.checkpoint import load_sidecar_weights

    directory = os.path.join(REPO, "pdt_hf", "resources", "sidecar-smollm2-135m")
    config = PDTConfig.from_pretrained(directory)
    with torch.device("meta"):
        trunk = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMOLLM2_135M))
        model = PDTForCausalLM(trunk, config)
    tensors = load_sidecar_weights(directory, model.sidecar.state_dict())
    assert config.trunk_fingerprint == {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "vocab_size": 49152,
    }
    # Its agreement head's rollbacks did not pay on validation (docs/training.md), so calibration's rule ships tau = 0.
    assert config.agreement_threshold == 0.0
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if k.endswith(".up"))
    # It carries a trained synthesis slot (docs/training.md, section 9), so `generate(synthesis=True)` runs on it.
    assert config.synthesis
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if k.endswith(".synthesis_up"))


def test_wilson_interval_exact_values():
    from pdt_hf.training.calibration import wilson_interval

    low, high = wilson_interval(55, 135)
    assert low == pytest.approx(0.32820, abs=1e-4) and high == pytest.approx(0.49174, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize(
    "precision, divergent_rate, pays",
    [
        (0.407, 0.268, False),  # the shipped SmolLM2 head on validation: 55 of 135 rollbacks divergent
        (0.90, 0.268, True),
        (0.30, 0.30, False),  # no better than rolling back at random
    ],
)
def test_rollback_pays_only_with_a_clear_margin_over_the_base_rate(precision, divergent_rate, pays):
    from pdt_hf.training.calibration import rollback_pays

    report = {"precision": precision, "rollback_rate": 135 / 276, "blocks": 276, "divergent_rate": divergent_rate}
    decision = rollback_pays(report, min_precision_gain=0.1)
    assert decision["pays"] is pays
    assert decision["precision_low"] < precision
    assert rollback_pays({**report, "rollback_rate": 0.0}, 0.0)["pays"] is False  # no rollbacks: nothing to gain
