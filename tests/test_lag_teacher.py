"""The lag-consistent layout, the lag teacher of ``pdt data build``, its manifest pin, and text-bus decoding.

Tiny trunk (2 layers, hidden 64, vocab 128; SmolLM2-135M: 30 layers, hidden 576, vocab 49152) with the
character-level tokenizer of ``training_helpers``, so decoded text and token ids map one to one.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_trunk
from training_helpers import TINY_RECIPE, char_tokenizer, save_tiny_trunk, tiny_overrides

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.evaluation.baselines import EVAL_METHODS, run_method
from pdt_hf.evaluation.bench import BENCH_METHODS, Bench, BenchConfig
from pdt_hf.evaluation.prompt_sets import EvalItem
from pdt_hf.generation.prompts import render_ids, stream_message
from pdt_hf.generation.text_bus import (
    SIBLINGS_HEADER,
    decode_text_bus,
    hf_generate,
    lag_context,
    lag_message,
    round_contexts,
    stop_and_pad_ids,
    visible_sibling_blocks,
)
from pdt_hf.training.config import load_recipe
from pdt_hf.training.data.builder import build_dataset
from pdt_hf.training.data.ceiling import copy_flags, donor_contexts, measure_ceiling, sibling_similarity
from pdt_hf.training.data.schema import DatasetMismatchError, check_compatible, load_manifest, load_split
from pdt_hf.training.data.teacher import round_segments
from pdt_hf.training.loading import load_trunk_and_tokenizer

PROMPT = "Explain essays."
PLAN = ["Thesis", "Evidence", "Conclusion"]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------- visibility
ROUNDS = [[1, 2, 3], [1, 2], [1, 2, 3]]  # stream 1 stopped after its second block


@pytest.mark.parametrize(
    ("lag", "expected"),
    [
        (1, {1: {}, 2: {1: [1], 2: [1]}, 3: {1: [1, 2], 2: [1, 2]}, 4: {1: [1, 2], 2: [1, 2, 3]}}),
        (2, {1: {}, 2: {}, 3: {1: [1], 2: [1]}, 4: {1: [1, 2], 2: [1, 2]}}),
    ],
)
def test_visible_sibling_blocks_exact(lag, expected) -> None:
    for round_, want in expected.items():
        assert visible_sibling_blocks(ROUNDS, 0, round_, lag) == want, (lag, round_)
    assert visible_sibling_blocks(ROUNDS, 2, 4, lag) == (
        {0: [1, 2, 3], 1: [1, 2]} if lag == 1 else {0: [1, 2], 1: [1, 2]}
    )


def test_lag_zero_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"note_lag=0.*set pdt.note_lag=1"):
        visible_sibling_blocks(ROUNDS, 0, 2, 0)


def test_lag_message_layout() -> None:
    assert lag_message(PROMPT, PLAN, 1, []) == stream_message(PROMPT, PLAN, "Evidence")
    assert lag_message(PROMPT, PLAN, 1, [(0, "  "), (2, "")]) == stream_message(PROMPT, PLAN, "Evidence")
    assert lag_message(PROMPT, PLAN, 1, [(0, " A claim. "), (2, "So.")]) == (
        "Explain essays.\n\nThe answer has these sections: Thesis; Evidence; Conclusion.\n"
        f"{SIBLINGS_HEADER}\n\nThesis:\nA claim.\n\nConclusion:\nSo.\n\n"
        'Write only the section "Evidence".'
    )


@pytest.mark.parametrize(("lag", "texts"), [(1, ("abcdefgh", "01234567")), (2, ("abcd", "0123"))])
def test_lag_context_shows_exactly_the_lagged_sibling_blocks(lag, texts) -> None:
    tok = char_tokenizer()
    sections = [ids(tok, "abcdefghij"), ids(tok, "ABCDEF"), ids(tok, "0123456789")]  # B = 4: 3, 2, 3 blocks
    context = lag_context(tok, PROMPT, PLAN, sections, 1, 3, lag, 4)
    assert context == render_ids(tok, lag_message(PROMPT, PLAN, 1, [(0, texts[0]), (2, texts[1])]))
    text = tok.decode(context)
    assert f"Thesis:\n{texts[0]}\n" in text and f"Conclusion:\n{texts[1]}\n" in text
    assert "ABC" not in text and "89" not in text and "ij" not in text  # own text and unseen blocks stay out
    assert lag_context(tok, PROMPT, PLAN, sections, 1, lag, lag, 4) == render_ids(
        tok, stream_message(PROMPT, PLAN, "Evidence")
    )


def test_round_segments_merge_equal_contexts() -> None:
    assert round_segments([[1], [1], [2]], 10, 4) == [(0, 0, 8), (2, 8, 10)]
    assert round_segments([[1], [2], [1]], 9, 4) == [(0, 0, 4), (1, 4, 8), (2, 8, 9)]
    with pytest.raises(ValueError, match="3 blocks of 4, got 2 contexts"):
        round_segments([[1], [1]], 10, 4)


# ------------------------------------------------------------------------------------------- decoding loop
def test_decode_text_bus_rounds_contexts_and_stops_with_a_mock_generate() -> None:
    tok = char_tokenizer()
    eos = tok.eos_token_id
    script = {0: ["abcd", "ef"], 1: ["ABCD", "EFGH", "IJ"], 2: ["0123", "4567", "89"]}  # stream 0 ends at EOS
    seen = []

    def generate(rows, max_new, round_):
        seen.append((round_, max_new, [len(r) for r in rows]))
        active = [k for k in range(3) if len(script[k]) >= round_]
        out = [ids(tok, script[k][round_ - 1]) for k in active]
        if round_ == 2:
            out[0] = out[0] + [eos]  # stream 0 writes "ef" then EOS
        return out

    result = decode_text_bus(generate, tok, [(PROMPT, PLAN)], 4, 1, 10, [eos])
    sections = result.sections[0]
    assert [tok.decode(s, skip_special_tokens=True) for s in sections] == ["abcdef", "ABCDEFGHIJ", "0123456789"]
    assert sections[0][-1] == eos and result.finish_reasons == [["eos", "length", "length"]]
    assert [(r, n) for r, n, _ in seen] == [(1, 4), (2, 4), (3, 2)]  # the last round asks for what is left
    assert [r["active"] for r in result.rounds] == [3, 3, 2]
    assert [r["prefill_tokens"] for r in result.rounds] == [sum(lens) for _, _, lens in seen]
    ctx = result.contexts[0]
    iso = [render_ids(tok, stream_message(PROMPT, PLAN, item)) for item in PLAN]
    assert [c[0] for c in ctx] == iso  # round 1: nothing visible at lag 1
    assert ctx[1][1] == render_ids(tok, lag_message(PROMPT, PLAN, 1, [(0, "abcd"), (2, "0123")]))
    assert ctx[2][2] == render_ids(tok, lag_message(PROMPT, PLAN, 2, [(0, "abcdef"), (1, "ABCDEFGH")]))
    assert round_contexts(tok, PROMPT, PLAN, sections, 1, 4) == ctx  # recomputable from the finished sections


# ------------------------------------------------------------------------------------------- lag teacher
@pytest.fixture(scope="module")
def lag_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lag"))
    trunk_dir = save_tiny_trunk(os.path.join(root, "trunk"))
    overrides = [*tiny_overrides(root, trunk_dir), "data.build.teacher_mode=lag", "data.build.repetition_penalty=1.0"]
    recipe = load_recipe(TINY_RECIPE, overrides)
    build_dataset(recipe, progress=False)
    return root, trunk_dir, overrides, recipe


def test_lag_teacher_targets_come_from_the_per_round_contexts(lag_data) -> None:
    root, trunk_dir, _, recipe = lag_data
    manifest = load_manifest(recipe.data.path)
    assert manifest["teacher_mode"] == "lag" and manifest["build_key"]["teacher_mode"] == "lag"
    assert manifest["build_key"]["note_lag"] == 1
    trunk, tok, _ = load_trunk_and_tokenizer(recipe.model)
    block = 4
    rows = list(load_split(recipe.data.path, "validation", manifest))
    checked_later_round = 0
    for row in rows:
        sections, plan = row["section_ids"], row["plan"]
        contexts = round_contexts(tok, row["prompt"], plan, sections, 1, block)
        for k, sec in enumerate(sections):
            kd = torch.tensor(row["kd_logprobs"][k])  # [S, top_k]
            dep = torch.tensor(row["sibling_dependence"][k])  # [S]
            # Greedy and no repetition penalty: every written token is the teacher's top-1 in its own context.
            assert [t[0] for t in row["kd_ids"][k]] == sec
            assert float(dep[:block].abs().max()) < 1e-5  # round 1 reads no sibling text at lag 1
            for r, ctx in enumerate(contexts[k], start=1):
                a, b = (r - 1) * block, min(r * block, len(sec))
                with torch.no_grad():
                    full = torch.tensor([ctx + sec[:b]])
                    logp = torch.log_softmax(trunk(full).logits[0].float(), -1)  # [T, V]
                    hidden = trunk.model(full).last_hidden_state[0]  # [T, d]
                pred = logp[len(ctx) - 1 + a : len(ctx) - 1 + b]  # positions predicting tokens a..b-1
                ids_ = torch.tensor(row["kd_ids"][k][a:b])
                torch.testing.assert_close(pred.gather(-1, ids_), kd[a:b], atol=1e-4, rtol=0)
                state = hidden[len(ctx) + a : len(ctx) + b].mean(0)
                torch.testing.assert_close(state, torch.tensor(row["note_targets"][k][r - 1]), atol=1e-4, rtol=0)
                if r >= 2 and ctx != contexts[k][0]:
                    checked_later_round += 1
                    assert float(dep[a:b].max()) > 0  # siblings' text changed the teacher there
    assert checked_later_round > 0


def test_lag_data_pins_the_mode_and_the_lag(lag_data) -> None:
    root, trunk_dir, overrides, recipe = lag_data
    with pytest.raises(ValueError, match=r"teacher_mode='lag', but this config has teacher_mode='serial'"):
        build_dataset(load_recipe(TINY_RECIPE, [*overrides, "data.build.teacher_mode=serial"]), progress=False)
    with pytest.raises(ValueError, match=r"note_lag=1, but this config has note_lag=2"):
        build_dataset(load_recipe(TINY_RECIPE, [*overrides, "pdt.note_lag=2"]), progress=False)
    manifest = load_manifest(recipe.data.path)
    trunk, _, _ = load_trunk_and_tokenizer(recipe.model)
    check_compatible(manifest, recipe.pdt.resolve(trunk.config), recipe.data.path)
    other = load_recipe(TINY_RECIPE, [*overrides, "pdt.note_lag=2"]).pdt.resolve(trunk.config)
    with pytest.raises(DatasetMismatchError, match=r"note_lag=1, but the sidecar config has note_lag=2"):
        check_compatible(manifest, other, recipe.data.path)
    with pytest.raises(ValueError, match="note_lag=0"):
        build_dataset(
            load_recipe(TINY_RECIPE, [*overrides, f"data.path={root}/lag0", "pdt.note_lag=0"]), progress=False
        )


def test_serial_mode_keeps_zero_dependence_for_the_first_section(lag_data, tmp_path) -> None:
    _, _, overrides, _ = lag_data
    recipe = load_recipe(TINY_RECIPE, [*overrides, "data.build.teacher_mode=serial", f"data.path={tmp_path}/serial"])
    build_dataset(recipe, progress=False)
    manifest = load_manifest(recipe.data.path)
    assert manifest["teacher_mode"] == "serial" and "note_lag" not in manifest["build_key"]
    for row in load_split(recipe.data.path, "validation", manifest):
        assert set(row["sibling_dependence"][0]) == {0.0}
        assert [t[0] for t in row["kd_ids"][0]] == row["section_ids"][0]


def test_copy_flags_exact() -> None:
    # B = 2, Δ = 1: the reader's round-2 tokens (positions 2-3) read the siblings' block 1, round 3 their blocks 1-2
    sections = [[5, 6, 7, 8, 9], [1, 5, 6, 9, 7, 8], [7, 8]]
    visible, copied = copy_flags(sections, 1, block_size=2, lag=1)
    assert visible.tolist() == [False, False, True, True, True, True]
    # pos 2: bigram (5, 6) is in stream 0's block 1; pos 3: (6, 9) is nowhere; pos 5: (7, 8) is in 0's blocks 1-2 and in 2
    assert copied.tolist() == [False, False, True, False, False, True]
    visible, copied = copy_flags([[5, 6], [], [5, 6, 7]], 2, block_size=2, lag=1)
    assert visible.tolist() == [False, False, True] and copied.tolist() == [False, False, False]  # (6, 7) unseen
    assert not copy_flags([[5, 6], [5, 6]], 1, block_size=2, lag=2)[0].any()  # Δ = 2: nothing visible yet


def test_donor_contexts_change_only_the_sibling_text() -> None:
    tok = char_tokenizer()
    sections = [ids(tok, "a claim here"), ids(tok, "some proof"), ids(tok, "so it is")]
    donor = [ids(tok, "ZZZZ"), ids(tok, "YYYYYYYY"), ids(tok, "XXXXXX")]
    assert donor_contexts(tok, PROMPT, PLAN, sections, sections, 1, 4) == round_contexts(
        tok, PROMPT, PLAN, sections, 1, 4
    )
    contexts = donor_contexts(tok, PROMPT, PLAN, sections, donor, 1, 4)
    assert [len(c) for c in contexts] == [3, 3, 2]
    reader = render_ids(tok, stream_message(PROMPT, PLAN, "Evidence"))
    assert contexts[1][0] == reader  # round 1: nothing visible, the isolated message
    expected = lag_message(PROMPT, PLAN, 1, [(0, "ZZZZ"), (2, "XXXX")])  # round 2: the donor's block 1
    assert contexts[1][1] == render_ids(tok, expected)
    assert contexts[1][2] == render_ids(tok, lag_message(PROMPT, PLAN, 1, [(0, "ZZZZ"), (2, "XXXXXX")]))


def test_sibling_similarity_compares_each_section_with_its_stand_ins() -> None:
    texts = [["The cat sat on the mat.", "Dogs bark loudly at night."], ["Stock markets fell today.", ""]]
    resampled = [["The cat sat on the mat.", "Dogs bark loudly at night."], ["Shares dropped sharply.", "Rates."]]
    sim = sibling_similarity(texts, resampled)
    assert sim["identical"] == 2 and sim["sections"] == 4
    assert sim["resampled"]["prompts"] == 2 and sim["donor"]["prompts"] == 2  # the empty section is skipped
    assert 0.5 < sim["resampled"]["mean"] < 1.0  # prompt 0: 1.0; prompt 1: a paraphrase
    assert sim["donor"]["mean"] < sim["resampled"]["mean"]  # another prompt's sections mean something else
    assert sim["donor"]["low"] <= sim["donor"]["mean"] <= sim["donor"]["high"]


def test_ceiling_measures_five_teachers_on_the_same_tokens(lag_data, tmp_path) -> None:
    _, _, overrides, recipe = lag_data
    result = measure_ceiling(recipe, "validation", "serial", limit=3, progress=False)
    tokens = result["tokens"]
    assert result["num_prompts"] == 3 and {t["prompt"] for t in tokens} == {0, 1, 2}
    for rec in tokens:
        rounds = rec["round"]
        assert rounds == [i // 4 + 1 for i in range(len(rounds))]
        assert all(r > 1 for r, seen in zip(rounds, rec["visible"]) if seen)  # lag 1: from round 2 on
        for i, r in enumerate(rounds):
            if r == 1:  # lag 1: round 1 is isolated, so (b) = (c) = (d) and KL(a||b) = KL(a||c)
                assert rec["kl_lag_iso"][i] < 1e-5 and rec["kl_lag_donor"][i] < 1e-5
                assert rec["kl_lag_resampled"][i] < 1e-5
                assert rec["kl_serial_lag"][i] == pytest.approx(rec["kl_serial_iso"][i], abs=1e-5)
                assert not rec["visible"][i] and not rec["copied"][i]
            if rec["section"] == 0:  # the serial context of section 1 is its stream message
                assert rec["kl_serial_iso"][i] < 1e-5
    # Another prompt's text moves the teacher (the random tiny trunk barely reads context: KL(lag||iso) ~ 1e-5).
    assert any(v > 1e-7 for rec in tokens for v in rec["kl_lag_donor"])
    summary = result["summary"]
    assert set(summary["by_section"]) == {"0", "1"} and "1" in summary["by_round"]
    cell = summary["all"]["kl_serial_lag"]
    assert cell["low"] <= cell["mean"] <= cell["high"] and cell["tokens"] == sum(len(t["round"]) for t in tokens)
    visible = summary["by_copy"]["visible"]["kl_lag_iso"]["tokens"]
    copied = summary["by_copy"]["copied"]
    not_copied = summary["by_copy"]["not copied"]["kl_lag_iso"]["tokens"]
    assert visible == (copied["kl_lag_iso"]["tokens"] if copied["kl_lag_iso"] else 0) + not_copied
    lag_mass = sum(sum(t["kl_lag_iso"]) for t in tokens)
    content = summary["shares"]["content"]
    assert content["mean"] == pytest.approx(sum(sum(t["kl_lag_donor"]) for t in tokens) / lag_mass)
    assert content["low"] <= content["mean"] <= content["high"]
    resampled = sum(sum(t["kl_lag_resampled"]) for t in tokens)
    assert resampled > 0 and summary["shares"]["realisation"]["mean"] == pytest.approx(resampled / lag_mass)
    copied_mass = sum(v for t in tokens for v, c in zip(t["kl_lag_iso"], t["copied"]) if c)
    assert summary["shares"]["copied"]["mean"] == pytest.approx(copied_mass / lag_mass)


def test_ceiling_needs_a_donor_prompt(lag_data) -> None:
    _, _, _, recipe = lag_data
    with pytest.raises(ValueError, match=r"1 prompt\(s\).*--limit >= 2"):
        measure_ceiling(recipe, "validation", "lag", limit=1, progress=False)


def test_pdt_data_ceiling_cli_writes_json_markdown_and_png(lag_data, tmp_path) -> None:
    from pdt_hf.cli import main

    _, _, overrides, _ = lag_data
    out = tmp_path / "ceiling"
    args = ["data", "ceiling", "--config", TINY_RECIPE, *overrides, "--writer", "lag", "--limit", "2"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "ceiling-validation-lag.json").read_text())
    assert result["writer"] == "lag" and result["command"].startswith("pdt data ceiling --config")
    markdown = (out / "ceiling-validation-lag.md").read_text()
    assert "| section 1 |" in markdown and "| round 1 |" in markdown and "| **all** |" in markdown
    assert "KL(lag ‖ donor)" in markdown and "| of them, continuing a sibling bigram |" in markdown
    assert "- content-specific gain (sum of KL(lag ‖ donor)):" in markdown
    assert "- realisation-specific gain (sum of KL(lag ‖ resampled)):" in markdown
    assert result["resampling"] == {"temperature": 0.7, "top_p": 0.9, "seed_offset": 7919}
    assert len(result["texts"]) == 2 and set(result["texts"][0]) == {"sections", "resampled"}
    assert "- the resampled section (teacher (e)):" in markdown and result["similarity"]["sections"] == 4
    assert (out / "ceiling-validation-lag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- text-bus method
@pytest.fixture
def tiny_model():
    trunk = tiny_trunk("llama")
    tok = char_tokenizer(trunk.config.vocab_size)
    trunk.generation_config.eos_token_id = tok.eos_token_id
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3, block_size=4))
    model.tokenizer = tok
    return model.eval()


def test_text_bus_round_one_is_isolated_decoding_and_round_two_reads_round_one(tiny_model) -> None:
    model, tok = tiny_model, tiny_model.tokenizer
    assert "pdt-text-bus" in EVAL_METHODS and "pdt-text-bus" in BENCH_METHODS
    run = run_method(model, "pdt-text-bus", PROMPT, PLAN, 12)
    sot = run_method(model, "sot", PROMPT, PLAN, 12)
    assert all(len(s) > 4 for s in run.section_ids), "the tiny trunk should write past round 1"
    for k, item in enumerate(PLAN):
        assert run.section_ids[k][:4] == sot.section_ids[k][:4]  # round 1 = isolated decoding
        alone = torch.tensor([render_ids(tok, stream_message(PROMPT, PLAN, item))])
        with torch.no_grad():
            out = model.trunk.generate(alone, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert run.section_ids[k][:4] == out[0, alone.shape[1] :].tolist()
    telemetry = run.telemetry
    assert telemetry["rolled_back_tokens"] == 0 and telemetry["prefill_tokens"] > 0
    assert len(telemetry["rounds"]) == 3 and run.tokens <= 3 * 12

    eos, pad = stop_and_pad_ids(model.trunk, tok)
    with model.disable_sidecars():
        direct = decode_text_bus(hf_generate(model.trunk, pad, eos), tok, [(PROMPT, PLAN)], 4, 1, 12, eos)
    sections = direct.sections[0]
    assert sections == run.section_ids
    for k in range(3):
        round2 = tok.decode(direct.contexts[0][k][1])
        for j in range(3):
            first = tok.decode(sections[j][:4], skip_special_tokens=True).strip()
            later = tok.decode(sections[j][4:8], skip_special_tokens=True)
            if j != k:
                assert f"{PLAN[j]}:\n{first}\n" in round2  # exactly the sibling's round-1 text ...
                if later.strip():
                    assert f"{PLAN[j]}:\n{first}{later}" not in round2  # ... and nothing of its round 2
        siblings = [(j, tok.decode(sections[j][:4], skip_special_tokens=True)) for j in range(3) if j != k]
        assert direct.contexts[0][k][1] == render_ids(tok, lag_message(PROMPT, PLAN, k, siblings))
    lengths = [r["prefill_tokens"] / r["active"] for r in direct.rounds]
    assert lengths[1] > lengths[0]  # the re-prefilled context grows with the siblings' text


def test_text_bus_at_lag_two_stays_isolated_for_two_rounds(tiny_model) -> None:
    model, tok = tiny_model, tiny_model.tokenizer
    eos, pad = stop_and_pad_ids(model.trunk, tok)
    result = decode_text_bus(hf_generate(model.trunk, pad, eos), tok, [(PROMPT, PLAN)], 4, 2, 12, eos)
    for k, item in enumerate(PLAN):
        iso = render_ids(tok, stream_message(PROMPT, PLAN, item))
        assert result.contexts[0][k][:2] == [iso, iso]
        if len(result.contexts[0][k]) > 2:
            assert result.contexts[0][k][2] != iso


def test_bench_text_bus_writes_every_token_even_when_eos_comes_first(tiny_model) -> None:
    model, tok = tiny_model, tiny_model.tokenizer
    item = EvalItem(PROMPT, PLAN)
    bench = Bench(model, "untrained", BenchConfig(ks=[1, 3], max_new_tokens=6, repeats=1, methods=["pdt-text-bus"]))
    first = render_ids(tok, stream_message(PROMPT, PLAN, PLAN[0]))
    with torch.no_grad():
        forced = int(model.trunk(torch.tensor([first])).logits[0, -1].argmax())
    model.trunk.generation_config.eos_token_id = forced
    bench.eos = sorted({forced, tok.eos_token_id})
    for k in (1, 3):
        record = bench.run("pdt-text-bus", k, item, 6)
        assert record["committed"] == k * 6 and record["rollbacks"] == 0 and record["sidecar"] is None
        assert [r["active"] for r in record["rounds"]] == [k, k] and record["prefill_tokens"] > 0
        assert len(record["steps"]) == 4 + 2 - 1  # rounds of 4 + 2 tokens, one forward each: all after the first
