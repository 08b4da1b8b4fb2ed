"""The training objective on a tiny trunk: prefix reuse is exact, notes obey the lagged visibility of decoding,
agreement labels come from measured divergence, and only the sidecar receives gradients."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from training_helpers import TINY_RECIPE, save_tiny_trunk, tiny_overrides

from pdt_hf.training.batch import collate
from pdt_hf.training.config import load_recipe
from pdt_hf.training.data.builder import build_dataset
from pdt_hf.training.data.schema import load_manifest, load_projection, load_split
from pdt_hf.training.loading import load_pdt_model, load_trunk_and_tokenizer
from pdt_hf.training.losses import block_means
from pdt_hf.training.objective import PDTObjective, block_states
from pdt_hf.training.rounds import NO_NOTES_ROUND

WEIGHTS = {
    "lm": 1.0,
    "kd": 1.0,
    "notes": 1.0,
    "planner": 1.0,
    "speculation": 1.0,
    "usage": 1.0,
    "coverage": 1.0,
    "agreement": 1.0,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("objective"))
    trunk_dir = save_tiny_trunk(os.path.join(root, "trunk"))
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(root, trunk_dir))
    build_dataset(recipe, progress=False)
    manifest = load_manifest(recipe.data.path)
    examples = [load_split(recipe.data.path, "train", manifest)[i] for i in range(3)]
    return recipe, examples, load_projection(recipe.data.path)


def _objective(recipe, reuse: bool, seed: int = 0):
    torch.manual_seed(seed)
    trunk, tok, name = load_trunk_and_tokenizer(recipe.model)
    model = load_pdt_model(trunk, recipe.pdt, name, None)
    with torch.no_grad():  # open every residual path so notes and adapters change the trunk's states
        for adapter in model.sidecar.adapters.values():
            adapter.up.normal_(std=0.3)
        for snc in model.sidecar.snc.values():
            snc.gate.fill_(1.0)
    model.sidecar.requires_grad_(True)
    return PDTObjective(model, recipe.train, reuse, tok.pad_token_id), tok.pad_token_id


def _batch(tiny, pad_id):
    recipe, examples, projection = tiny
    return collate(examples, projection, recipe.pdt.num_streams, recipe.pdt.block_size, pad_id)


def test_prefix_reuse_gives_the_same_losses_and_gradients_as_full_rows(tiny):
    results = []
    for reuse in (True, False):
        objective, pad_id = _objective(tiny[0], reuse)
        out = objective(_batch(tiny, pad_id), WEIGHTS, notes_visible=True)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in objective.sidecar.named_parameters() if p.grad is not None}
        results.append((out, grads))
        assert all(p.grad is None for p in objective.model.trunk.parameters())  # the trunk never gets a gradient
    (a, ga), (b, gb) = results
    assert set(a) == set(b) and set(WEIGHTS) <= set(a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert set(ga) == set(gb)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-3, atol=1e-5, msg=name)
    assert any(float(g.abs().sum()) > 0 for n, g in ga.items() if n.startswith("snc."))


def test_notes_reach_only_tokens_of_later_rounds(tiny):
    """Changing a sibling's round-r note moves exactly the positions with query round >= r + lag."""
    recipe = tiny[0]
    objective, pad_id = _objective(recipe, reuse=True)
    batch = _batch(tiny, pad_id)
    lag = objective.model.pdt_config.note_lag
    with torch.no_grad():
        prefix = objective.prefix_kv(batch)
        planner, blocks, valid = objective.note_pass(batch, prefix)
        base = objective.run_rows(
            batch, torch.arange(len(batch.stream_ids)), objective.build_notes(batch, planner, blocks, valid), prefix
        )
        changed_blocks = blocks.clone()
        changed_blocks[1, 0] += 5.0  # row 1 = example 0, stream 1: its round-1 note
        moved = objective.run_rows(
            batch,
            torch.arange(len(batch.stream_ids)),
            objective.build_notes(batch, planner, changed_blocks, valid),
            prefix,
        )
    delta = (moved - base).abs().amax(-1)  # [N, S]
    reader = 0  # example 0, stream 0 reads stream 1's notes
    rounds = batch.query_round[reader]
    sees = (rounds != NO_NOTES_ROUND) & (rounds >= 1 + lag)
    assert bool(sees.any())
    assert float(delta[reader][~sees].max()) == 0.0
    assert float(delta[reader][sees].min()) > 0.0
    assert float(delta[1].max()) == 0.0  # a stream never reads its own notes (read_own_notes is false)
    assert float(delta[2:].max()) == 0.0  # other examples are untouched


def test_agreement_labels_are_measured_divergence(tiny):
    recipe = tiny[0]
    objective, pad_id = _objective(recipe, reuse=True)
    batch = _batch(tiny, pad_id)
    n, r = len(batch.stream_ids), batch.num_blocks
    with torch.no_grad():
        hidden = objective.run_rows(batch, torch.arange(n), None, objective.prefix_kv(batch))
        kd_tok, _ = objective.token_losses(batch, hidden, torch.arange(n))
        states = block_states(hidden, batch.query_round, r)
        notes = objective.sidecar.heads.notes(states.flatten(0, 1).unsqueeze(1)).view(n, r, -1)
        cov = torch.zeros(n, r, batch.num_streams)
        expected = block_means(kd_tok, batch.pred_block, r, batch.section_mask)
        threshold = float(expected[batch.block_has_state].median())
        objective.loop = dataclasses.replace(objective.loop, agreement_divergence=threshold)
        _, labels, divergence = objective.agreement_logits(batch, kd_tok, states, notes, cov, None)
    torch.testing.assert_close(divergence, expected)
    assert torch.equal(labels, (expected <= threshold).float())
    assert 0 < float(labels[batch.block_has_state].mean()) < 1  # both classes, decided by the measurement


def test_collate_rounds_follow_the_section_layout(tiny):
    recipe, examples, projection = tiny
    batch = _batch(tiny, 0)
    b = recipe.pdt.block_size
    for row in range(len(batch.stream_ids)):
        m = int(batch.suffix_len[row])
        length = int(batch.section_mask[row].sum())
        q = batch.query_round[row].tolist()
        assert q[:m] == [NO_NOTES_ROUND] * m
        assert q[m : m + length] == [j // b + 1 for j in range(length)]  # x_j is fed in its own block's round
        assert batch.pred_pos[row, 0] == m - 1
        section = batch.stream_input[row, m : m + length]
        assert torch.equal(section, batch.labels[row, :length])
    assert batch.note_targets.shape[-1] == projection.d_note == recipe.pdt.d_note


def test_full_rows_apply_no_sidecar_to_the_prefix(tiny):
    """With full rows the prompt prefix is read by the bare trunk, as in decoding."""
    recipe = tiny[0]
    objective, pad_id = _objective(recipe, reuse=False)
    batch = _batch(tiny, pad_id)
    with torch.no_grad():
        objective.run_rows(batch, torch.arange(len(batch.stream_ids)), None, None)
        mask = objective.sidecar.context.token_mask
    for row in range(len(batch.stream_ids)):
        p = len(batch.prefix_ids[int(batch.example_index[row])])
        assert not mask[row, :p].any() and mask[row, p : p + batch.stream_input.shape[1]].all()
    assert dataclasses.is_dataclass(batch)


@pytest.mark.parametrize("note_grad", [False, True])
def test_note_grad_trains_the_notes_head_through_the_rows_that_read_its_notes(tiny, note_grad):
    """With ``note_grad`` the KD of the reading rows reaches the notes head; without it, no gradient does."""
    objective, pad_id = _objective(tiny[0], reuse=True)
    sidecar = objective.sidecar
    sidecar.requires_grad_(False)
    sidecar.heads.notes.requires_grad_(True)
    out = objective(_batch(tiny, pad_id), {"kd": 1.0}, notes_visible=True, note_grad=note_grad)
    if not note_grad:
        assert not out["loss"].requires_grad
        return
    out["loss"].backward()
    grads = [p.grad for p in sidecar.heads.notes.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in objective.model.trunk.parameters())


def test_gate_learning_rate_scales_only_the_snc_gates(tiny):
    from pdt_hf.training.curriculum import param_groups, set_trainable

    objective, _ = _objective(tiny[0], reuse=True)
    sidecar = objective.sidecar
    params = set_trainable(sidecar, ["snc", "heads.notes"])
    groups = param_groups(sidecar, params, 1e-3, 10.0)
    gates = {id(layer.gate) for layer in sidecar.snc_layers}
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == gates
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert len(param_groups(sidecar, set_trainable(sidecar, ["adapters"]), 1e-3, 10.0)) == 1


def test_several_notes_per_block_each_reach_later_rounds_and_train_the_notes_head(tiny):
    """With M = 2 every chunk note of a sibling's block is read from the next round on and gets a gradient."""
    recipe = dataclasses.replace(tiny[0], pdt=dataclasses.replace(tiny[0].pdt, notes_per_block=2, note_window=64))
    objective, pad_id = _objective(recipe, reuse=True)
    batch = _batch(tiny, pad_id)
    rows = torch.arange(len(batch.stream_ids))
    with torch.no_grad():
        prefix = objective.prefix_kv(batch)
        planner, blocks, valid = objective.note_pass(batch, prefix)
        assert blocks.shape[:3] == (len(rows), batch.num_blocks, 2)
        base = objective.run_rows(batch, rows, objective.build_notes(batch, planner, blocks, valid), prefix)
        for chunk in range(2):
            changed = blocks.clone()
            changed[1, 0, chunk] += 5.0  # example 0, stream 1, round 1: one of its two notes
            moved = objective.run_rows(batch, rows, objective.build_notes(batch, planner, changed, valid), prefix)
            rounds = batch.query_round[0]
            sees = (rounds != NO_NOTES_ROUND) & (rounds >= 1 + recipe.pdt.note_lag)
            delta = (moved - base).abs().amax(-1)[0]
            assert float(delta[~sees].max()) == 0.0 and float(delta[sees].min()) > 0.0
    out = objective(batch, WEIGHTS, notes_visible=True, note_grad=True)
    out["loss"].backward()
    grads = [p.grad for p in objective.sidecar.heads.notes.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
