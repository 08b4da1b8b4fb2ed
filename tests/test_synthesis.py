"""The synthesis (combiner) stream: adapter slot, generation, bus reads, data augmentation, training stage, eval.

Tiny trunks built from configs (2 layers, hidden 64, vocab 128; SmolLM2-135M has 30 layers, hidden 576).
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk
from safetensors.torch import load_file
from training_helpers import TINY_RECIPE, save_tiny_trunk, tiny_overrides

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.bus import NoteBus
from pdt_hf.bus.visibility import synthesis_mask
from pdt_hf.cli import main
from pdt_hf.generation.prompts import render_ids, stream_message, synthesis_message
from pdt_hf.generation.synthesis import shared_prefix_length
from pdt_hf.sidecars.context import DenseNotes, PackedNotes
from pdt_hf.stream_kv import StreamKVCache
from pdt_hf.training.configuration import ConfigError, apply_overrides, load_yaml
from pdt_hf.training.curriculum import StageConfig

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]
SYNTHESIS_STAGE = {
    "name": "synthesis",
    "trainable": ["synthesis"],
    "losses": {"synthesis_kd": 1.0, "synthesis_lm": 1.0},
    "steps": 4,
    "lr": 2.0e-2,
    "notes_visible": True,
}


def _model(synthesis: bool = True, seed: int = 0, **cfg) -> PDTForCausalLM:
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.generation_config.pad_token_id = 0
    torch.manual_seed(seed)
    model = PDTForCausalLM(trunk, PDTConfig(**{"num_streams": 3, "synthesis": synthesis, **cfg}))
    model.tokenizer = tiny_tokenizer()
    return model.eval()


def _open_synthesis_slot(model: PDTForCausalLM, scale: float = 0.5) -> None:
    """Non-zero synthesis up-projections and open SNC gates, so the slot and its notes change the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for adapter in model.sidecar.adapters.values():
            adapter.synthesis_up.copy_(torch.randn(adapter.synthesis_up.shape, generator=gen) * scale)
        for snc in model.sidecar.snc_layers:
            snc.gate.fill_(1.0)


# ------------------------------------------------------------------------------------------- adapter slot
def test_slot_is_identity_at_init_and_gets_gradients() -> None:
    model = _model()
    k = model.pdt_config.num_streams
    ids = torch.randint(4, 100, (4, 9))
    notes = DenseNotes(torch.randn(4, 5, model.pdt_config.d_note))
    with model.disable_sidecars():
        bare = model.trunk(input_ids=ids).logits
    out = model(input_ids=ids, stream_ids=torch.tensor([0, 1, k, k]), notes=notes)
    assert torch.equal(out.logits, bare)  # bit-identical, the synthesis rows included
    assert torch.equal(out.planner_note[2:], torch.zeros_like(out.planner_note[2:]))  # it has no plan item
    out.logits[2:].sum().backward()
    for adapter in model.sidecar.adapters.values():
        assert adapter.synthesis_up.grad is not None and adapter.synthesis_up.grad.abs().sum() > 0
        assert adapter.up.grad.abs().sum() == 0  # rows of the synthesis slot reach only its own weights


def test_open_slot_changes_only_the_synthesis_rows() -> None:
    model = _model()
    k = model.pdt_config.num_streams
    ids = torch.randint(4, 100, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids, stream_ids=torch.tensor([1, k])).logits
        for adapter in model.sidecar.adapters.values():
            adapter.synthesis_up.normal_(std=0.5)
        after = model(input_ids=ids, stream_ids=torch.tensor([1, k])).logits
    assert torch.equal(after[0], before[0])
    assert not torch.allclose(after[1], before[1])


def test_slot_leaves_the_rest_of_the_init_unchanged() -> None:
    plain, with_slot = _model(synthesis=False).sidecar.state_dict(), _model(synthesis=True).sidecar.state_dict()
    extra = sorted(set(with_slot) - set(plain))
    assert extra and all(".synthesis_" in key for key in extra) and not set(plain) - set(with_slot)
    assert all(torch.equal(plain[key], with_slot[key]) for key in plain)
    model = _model()
    assert model.sidecar.family_parameters("synthesis") and not {
        id(p) for p in model.sidecar.family_parameters("synthesis")
    } & {id(p) for p in model.sidecar.family_parameters("adapters")}


def test_old_sidecar_loads_as_before_and_refuses_synthesis(tmp_path) -> None:
    old = _model(synthesis=False)
    with torch.no_grad():
        for adapter in old.sidecar.adapters.values():
            adapter.up.normal_()
    old.save_pretrained(tmp_path / "old")
    assert "synthesis" not in str(load_file(str(tmp_path / "old" / "sidecar.safetensors")).keys())
    loaded = PDTForCausalLM.from_pretrained(old.trunk, sidecar=tmp_path / "old")
    loaded.tokenizer = tiny_tokenizer()
    assert not loaded.pdt_config.synthesis
    assert loaded.sidecar.state_dict().keys() == old.sidecar.state_dict().keys()
    assert all(torch.equal(v, old.sidecar.state_dict()[k]) for k, v in loaded.sidecar.state_dict().items())
    with pytest.raises(ValueError, match="needs a sidecar with a synthesis slot.*synthesis: false.*synthesis stage"):
        loaded.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=4, synthesis=True)
    with pytest.raises(ValueError, match="only used with synthesis=True"):
        loaded.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=4, synthesis_max_new_tokens=8)
    # Grown by a slot (what train.init_sidecar does): every saved tensor loads, the slot keeps its fresh init.
    grown = _model(synthesis=True, seed=5)
    fresh = {k: v.clone() for k, v in grown.sidecar.state_dict().items() if ".synthesis_" in k}
    with pytest.raises(ValueError, match="missing"):
        grown.load_sidecar(tmp_path / "old")
    grown.load_sidecar(tmp_path / "old", add_synthesis=True)
    for key, value in grown.sidecar.state_dict().items():
        expected = fresh[key] if key in fresh else old.sidecar.state_dict()[key]
        assert torch.equal(value, expected), key
    grown.save_pretrained(tmp_path / "grown")  # and a sidecar with the slot round-trips
    again = PDTForCausalLM.from_pretrained(grown.trunk, sidecar=tmp_path / "grown")
    assert again.pdt_config.synthesis
    assert all(torch.equal(v, grown.sidecar.state_dict()[k]) for k, v in again.sidecar.state_dict().items())


# ------------------------------------------------------------------------------------------- generation
def test_generate_writes_k_sections_then_a_synthesis() -> None:
    model = _model()
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=12, block_size=4, agreement_threshold=0.0)
    plain = model.generate(**kwargs)
    out = model.generate(**kwargs, synthesis=True, synthesis_max_new_tokens=10)
    assert out.sequences == plain.sequences and out.texts == plain.texts  # the sections do not change
    assert len(out.sequences) == 3 and 1 <= len(out.synthesis_ids) <= 10
    assert out.synthesis == model.tokenizer.decode(out.synthesis_ids, skip_special_tokens=True).strip()
    assert out.answer == "\n\n".join(t for t in [*out.texts, out.synthesis] if t) and plain.synthesis is None
    t = out.telemetry
    assert t.synthesis_tokens == len(out.synthesis_ids) and t.to_dict()["synthesis_tokens"] == t.synthesis_tokens
    assert t.synthesis_notes_read == out.bus.count and "synthesis" in t.timings and "synthesis" in t.summary()
    assert t.committed_tokens == sum(len(s) for s in out.sequences)
    # Untrained slot and closed gates: the synthesis stream is the bare trunk on its own prompt.
    ids = torch.tensor([render_ids(model.tokenizer, synthesis_message(PROMPT, PLAN))])
    hf = model.trunk.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert out.synthesis_ids == hf[0, ids.shape[1] :].tolist()


def test_synthesis_streams_once_after_the_sections_and_runs_through_custom_generate() -> None:
    from pdt_hf.generation import MultiStreamIteratorStreamer, custom_generate

    model = _model()
    streamer = MultiStreamIteratorStreamer(timeout=5)
    out = model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=8, synthesis=True, streamer=streamer)
    events = list(streamer)
    assert [e.stream for e in events if e.stream == 3] == [3] and events[-1].stream == 3
    assert events[-1].text == out.synthesis
    ids = torch.tensor([model.tokenizer(PROMPT)["input_ids"]])
    via_hf = model.trunk.generate(
        ids, custom_generate=custom_generate, num_streams=3, plan=PLAN, tokenizer=model.tokenizer,
        max_new_tokens=8, synthesis=True, synthesis_max_new_tokens=6,
    )  # fmt: skip
    assert 1 <= len(via_hf.synthesis_ids) <= 6


def test_synthesis_is_deterministic_greedy_and_reads_its_notes() -> None:
    model = _model()
    _open_synthesis_slot(model)
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=12, block_size=4, agreement_threshold=0.0, synthesis=True)
    first, second = model.generate(**kwargs), model.generate(**kwargs)
    assert first.synthesis_ids == second.synthesis_ids and first.answer == second.answer
    zero = model.generate(**kwargs, note_ablation="zero")
    assert zero.synthesis_ids != first.synthesis_ids  # what it writes depends on the notes it reads


def test_synthesis_stream_reads_every_note_and_no_section_text(monkeypatch) -> None:
    model = _model()
    _open_synthesis_slot(model)
    k = model.pdt_config.num_streams
    calls, caches = [], []
    original = StreamKVCache.from_prefix.__func__

    def record_cache(cls, prefix_cache, *args, **kwargs):
        cache = original(cls, prefix_cache, *args, **kwargs)
        caches.append(cache)
        return cache

    monkeypatch.setattr(StreamKVCache, "from_prefix", classmethod(record_cache))

    def record(module, args, kwargs):
        streams = kwargs.get("stream_ids")
        if streams is not None and streams.tolist() == [k]:
            calls.append(
                (kwargs["input_ids"][0].tolist(), kwargs["notes"], kwargs["cache"], kwargs["attention_mask"].shape)
            )

    model.register_forward_pre_hook(record, with_kwargs=True)
    out = model.generate(
        prompt=PROMPT, plan=PLAN, max_new_tokens=12, block_size=4, agreement_threshold=0.0, synthesis=True,
        record_reads=True,
    )  # fmt: skip
    bus = out.bus
    # Bus instrumentation: one read by the synthesis reader (stream id K), holding every note of every stream.
    synthesis_reads = [r for r in bus.reads if r.reader_streams.tolist() == [k]]
    assert len(synthesis_reads) == 1 and synthesis_reads[0] is bus.reads[-1]
    seen = synthesis_reads[0].notes_of(0)
    stored = list(zip(bus.streams.tolist(), bus.rounds.tolist()))
    assert sorted(seen) == sorted(stored) and len(seen) == bus.count
    assert {s for s, _ in seen} == set(range(k)) and max(r for _, r in seen) == bus.state().last_round > 1
    assert all(r.reader_streams.max() < k for r in bus.reads[:-1])  # no section stream reads as the synthesis
    # Every token of the synthesis stream reaches SNC with all those rows of the bus storage.
    assert calls and all(isinstance(notes, PackedNotes) and notes.store is bus for _, notes, _, _ in calls)
    for ids, notes, _, _ in calls:
        for t in range(len(ids)):
            rows = notes.indices[notes.offsets[t] : notes.offsets[t + 1]].tolist()
            assert sorted(rows) == list(range(bus.count))
    # No section-text token in its KV: its own cache holds the first n prompt tokens, then only what it was fed.
    synthesis_ids = render_ids(model.tokenizer, synthesis_message(PROMPT, PLAN))
    stream_prompt = render_ids(model.tokenizer, stream_message(PROMPT, PLAN, PLAN[0]))
    cache = calls[0][2]
    assert cache is caches[-1] and cache is not caches[0] and cache.num_streams == 1
    assert all(c is cache for _, _, c, _ in calls)
    n = cache.prefix_length
    assert 0 < n <= caches[0].prefix_length and synthesis_ids[:n] == stream_prompt[:n]
    fed = [t for ids, _, _, _ in calls for t in ids]
    assert fed == synthesis_ids[n:] + out.synthesis_ids[:-1]
    assert n + int(cache.lengths[0]) == len(synthesis_ids) + len(out.synthesis_ids) - 1
    assert calls[-1][3][-1] == n + int(cache.lengths[0])  # attention reads exactly those positions
    for layer, stream_layer in zip(cache.layers, caches[0].layers):
        assert torch.equal(layer.prefix_keys, stream_layer.prefix_keys[:, :, :n])
    assert synthesis_ids[:n] == stream_prompt[:n] and n < len(stream_prompt) - 1  # no plan item, no section


def test_synthesis_mask_and_read_are_exact() -> None:
    streams = torch.tensor([0, 1, 2, 0, 2, 1])
    assert synthesis_mask(streams, 3).tolist() == [[True] * 6]
    assert synthesis_mask(torch.tensor([0, 3]), 3).tolist() == [[True, False]]
    bus = NoteBus(num_streams=2, d_note=4, capacity=8, note_lag=3, note_window=1, record=True)
    bus.publish_snapshot(torch.randn(2, 4))
    bus.publish(torch.tensor([0, 1]), 1, torch.randn(2, 4))
    bus.publish(torch.tensor([1]), 2, torch.randn(1, 4))
    read = bus.read_synthesis()  # no lag and no window, whatever the bus's
    assert read.indices.tolist() == [0, 1, 2, 3, 4] and read.round == 3 and read.reader_streams.tolist() == [2]
    assert bus.reads[-1].notes_of(0) == [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2)]


# ------------------------------------------------------------------------------------------- generate CLI
def test_generate_cli_synthesis_flag(tmp_path, capsys, monkeypatch) -> None:
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.save_pretrained(tmp_path / "trunk")
    tiny_tokenizer().save_pretrained(tmp_path / "trunk")
    out = tmp_path / "out.json"
    argv = ["generate", "Explain tea.", "--model", str(tmp_path / "trunk"), "--plan", "a; b", "--max-new-tokens", "6"]
    assert main([*argv, "--synthesis", "--synthesis-max-new-tokens", "5", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["sequences"]) == 2 and 1 <= len(data["synthesis_ids"]) <= 5
    assert data["telemetry"]["synthesis_tokens"] == len(data["synthesis_ids"])
    assert "Conclusion (synthesis stream" in capsys.readouterr().out
    # Bad combinations fail before the trunk loads, naming the fix.
    model = _model(synthesis=False)
    model.save_pretrained(tmp_path / "old")

    def refuse(*args, **kwargs):
        raise AssertionError("the trunk was loaded before the arguments were checked")

    monkeypatch.setattr(PDTForCausalLM, "from_pretrained", refuse)
    assert main([*argv, "--synthesis", "--sidecar", str(tmp_path / "old")]) == 2
    err = capsys.readouterr().err
    assert "--synthesis needs a sidecar with a synthesis slot" in err and "Train the synthesis stage" in err
    assert main([*argv, "--synthesis-max-new-tokens", "5"]) == 2
    assert "add --synthesis or drop it" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- stage config
def test_stage_validation() -> None:
    StageConfig(**SYNTHESIS_STAGE)
    with pytest.raises(ValueError, match="set notes_visible: true"):
        StageConfig(**{**SYNTHESIS_STAGE, "notes_visible": False})
    with pytest.raises(ValueError, match="stage of their own"):
        StageConfig(
            **{**SYNTHESIS_STAGE, "trainable": ["synthesis", "adapters"], "losses": {"synthesis_kd": 1, "lm": 1}}
        )
    with pytest.raises(ValueError, match="none of its weighted losses"):
        StageConfig(**{**SYNTHESIS_STAGE, "losses": {"lm": 1.0}, "notes_visible": False})
    from pdt_hf.training.config import recipe_from_dict

    data = load_yaml(TINY_RECIPE)
    data["curriculum"].append(dict(SYNTHESIS_STAGE))
    with pytest.raises(ConfigError, match="set pdt.synthesis: true"):
        recipe_from_dict(data)
    data["pdt"]["synthesis"] = True
    assert recipe_from_dict(data).stages[-1].trainable == ["synthesis"]


# ------------------------------------------------------------------------------------------- data and training
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from pdt_hf.training.config import load_recipe
    from pdt_hf.training.data.builder import build_dataset

    root = str(tmp_path_factory.mktemp("synthesis"))
    trunk_dir = save_tiny_trunk(os.path.join(root, "trunk"))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_dataset(load_recipe(TINY_RECIPE, tiny_overrides(root, trunk_dir)), progress=False)
    finally:
        torch.set_num_threads(previous)
    return root, trunk_dir


def _recipe(root: str, trunk_dir: str, *extra: str, stage: bool = True, run: str = "run"):
    from pdt_hf.training.config import recipe_from_dict

    output = run if os.path.isabs(run) else os.path.join(root, run)
    overrides = [*tiny_overrides(root, trunk_dir), "data.synthesis.max_new_tokens=8", f"train.output_dir={output}"]
    data = apply_overrides(load_yaml(TINY_RECIPE), [*overrides, *extra])
    if stage:
        data["pdt"]["synthesis"] = True
        data["curriculum"].append(dict(SYNTHESIS_STAGE))
    return recipe_from_dict(data)


def test_augmentation_writes_conclusions_and_resumes(workspace) -> None:
    import datasets

    from pdt_hf.training.data.builder import load_teacher
    from pdt_hf.training.data.plan import conclusion_message
    from pdt_hf.training.data.schema import DatasetMismatchError, load_manifest, load_split, shard_path
    from pdt_hf.training.data.synthesis import build_synthesis, load_synthesis, synthesis_shard

    root, trunk_dir = workspace
    recipe = _recipe(root, trunk_dir)
    manifest = load_manifest(recipe.data.path)
    base = load_split(recipe.data.path, "train", manifest)
    with pytest.raises(DatasetMismatchError, match="has no conclusions.*pdt data synthesis"):
        load_synthesis(recipe.data.path, "train", manifest, base)
    base_bytes = open(shard_path(recipe.data.path, "train", 0), "rb").read()
    bundle = load_teacher(recipe)
    build_synthesis(recipe, progress=False, teacher_bundle=bundle)
    assert open(shard_path(recipe.data.path, "train", 0), "rb").read() == base_bytes  # base shards untouched
    joined = load_synthesis(recipe.data.path, "train", manifest, base)
    teacher, tok = bundle[0], bundle[1]
    eos = set(teacher.eos_ids)
    for row in joined:
        conclusion = row["conclusion_ids"]
        assert 1 <= len(conclusion) <= 8 and len(row["conclusion_kd_ids"]) == len(conclusion)
        assert all(len(top) == recipe.data.build.top_k for top in row["conclusion_kd_logprobs"])
        assert all(top[0] == max(top) for top in row["conclusion_kd_logprobs"])
        student = render_ids(tok, synthesis_message(row["prompt"], row["plan"]))
        n = row["synthesis_prefix_len"]
        assert n == shared_prefix_length(row["prefix_ids"], student) and row["synthesis_suffix_ids"] == student[n:]
    row = joined[0]  # the serial teacher's greedy conclusion after the prompt, the plan and all sections' text
    texts = [tok.decode([t for t in s if t not in eos], skip_special_tokens=True) for s in row["section_ids"]]
    context = render_ids(tok, conclusion_message(row["prompt"], row["plan"], texts))
    assert all(text.strip() in tok.decode(context) for text in texts)
    penalty = recipe.data.build.repetition_penalty
    rewritten = teacher.generate(
        [context], 8, do_sample=False, temperature=1.0, top_p=1.0, repetition_penalty=penalty, seed=0
    )
    assert row["conclusion_ids"] == rewritten[0]
    # Resume: a missing shard is rebuilt identically, finished ones are skipped.
    victim, keep = synthesis_shard(recipe.data.path, "train", 1), synthesis_shard(recipe.data.path, "train", 0)
    before, kept_mtime = open(victim, "rb").read(), os.path.getmtime(keep)
    os.remove(victim)
    time.sleep(0.01)
    build_synthesis(recipe, progress=False, teacher_bundle=bundle)
    assert open(victim, "rb").read() == before and os.path.getmtime(keep) == kept_mtime
    assert datasets.Dataset.from_parquet(victim)["prompt_id"] == base["prompt_id"][3:6]
    with pytest.raises(ValueError, match="max_new_tokens=8.*max_new_tokens=9"):
        build_synthesis(
            _recipe(root, trunk_dir, "data.synthesis.max_new_tokens=9"), progress=False, teacher_bundle=bundle
        )


def test_synthesis_stage_trains_only_the_slot(workspace) -> None:
    from pdt_hf.training.metrics import read_metrics
    from pdt_hf.training.trainer import train

    root, trunk_dir = workspace
    recipe = _recipe(root, trunk_dir, stage=False, run="base")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(recipe)  # the four stages of the tiny recipe, a sidecar without the slot
        base = os.path.join(root, "base", "sidecar")
        if not os.path.exists(os.path.join(root, "data", "synthesis", "pdt_synthesis.json")):
            from pdt_hf.training.data.synthesis import build_synthesis

            build_synthesis(_recipe(root, trunk_dir), progress=False)
        recipe = _recipe(root, trunk_dir, f"train.init_sidecar={base}", "train.run_stages=[synthesis]")
        summary = train(recipe)
    finally:
        torch.set_num_threads(previous)
    before = load_file(os.path.join(base, "sidecar.safetensors"))
    after = load_file(os.path.join(root, "run", "sidecar", "sidecar.safetensors"))
    slot = [key for key in after if ".synthesis_" in key]
    assert slot and sorted(set(after) - set(before)) == sorted(slot)
    for key, value in before.items():  # every other sidecar tensor is byte-identical
        assert value.dtype == after[key].dtype and value.numpy().tobytes() == after[key].numpy().tobytes(), key
    assert any(after[key].abs().sum() > 0 for key in slot if key.endswith("synthesis_up"))
    assert json.load(open(os.path.join(root, "run", "sidecar", "pdt_config.json")))["synthesis"] is True
    losses = [r["value"] for r in read_metrics(os.path.join(root, "run", "metrics.csv")) if r["name"] == "loss"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    report = summary["synthesis"]["validation"]
    assert report["tokens"] > 0 and {"kd_notes", "kd_no_notes", "kd_bare_trunk"} <= set(report)
    # The trained slot decodes.
    model = PDTForCausalLM.from_pretrained(trunk_dir, sidecar=os.path.join(root, "run", "sidecar"))
    out = model.generate(prompt=PROMPT, plan=PLAN[:2], max_new_tokens=6, synthesis=True, synthesis_max_new_tokens=4)
    assert 1 <= len(out.synthesis_ids) <= 4


def test_synthesis_stage_without_conclusions_is_refused(workspace, tmp_path) -> None:
    import shutil

    from pdt_hf.training.data.schema import DatasetMismatchError
    from pdt_hf.training.trainer import train

    root, trunk_dir = workspace
    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(root, "data"), data, ignore=shutil.ignore_patterns("synthesis"))
    with pytest.raises(DatasetMismatchError, match="has no conclusions.*pdt data synthesis --config"):
        train(_recipe(root, trunk_dir, f"data.path={data}", "train.run_stages=[synthesis]", run=str(tmp_path)))


# ------------------------------------------------------------------------------------------- eval
def test_pdt_eval_synthesis_emits_paired_cis(tmp_path) -> None:
    path = tmp_path / "tiny"
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "Explain tea.", "plan": ["Water", "Leaves"]}\n{"prompt": "Plan a trip: bus, food, and sleep."}\n'
    )
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(path), "--prompts", str(prompts), "--streams", "2", "--max-new-tokens", "6"]
    assert main([*argv, "--methods", "pdt,pdt-synthesis", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "eval.json").read_text())
    synthesis = result["synthesis"]
    assert synthesis["sources"] == ["pdt-synthesis", "trunk-from-sections", "trunk-from-nothing"]
    for source in synthesis["sources"]:
        stat = synthesis["summary"][source]
        assert stat["low"] <= stat["mean"] <= stat["high"] and stat["n"] == 2
    for reference in ("trunk-from-sections", "trunk-from-nothing"):
        stat = synthesis["paired_vs_pdt_synthesis"][reference]
        assert stat["low"] <= stat["diff"] <= stat["high"] and stat["n"] == 2
    for row in synthesis["prompts"]:
        # The untrained slot is the identity: the synthesis stream writes what the trunk writes from nothing.
        assert row["pdt-synthesis"]["text"] == row["trunk-from-nothing"]["text"]
        assert row["pdt-synthesis"]["nll"] == row["trunk-from-nothing"]["nll"]
    assert synthesis["paired_vs_pdt_synthesis"]["trunk-from-nothing"]["diff"] == 0.0
    rows = [p["methods"] for p in result["prompts"]]
    assert all(r["pdt-synthesis"]["sections"] == r["pdt"]["sections"] for r in rows)
    markdown = (out / "eval.md").read_text()
    assert "| source | conclusion fidelity | tokens | paired pdt-synthesis − source |" in markdown
    assert "| trunk-from-sections |" in markdown
    # A sidecar without the slot is refused before anything runs.
    no_slot = _model(synthesis=False)
    no_slot.save_pretrained(tmp_path / "old")
    code = main([*argv, "--methods", "pdt-synthesis", "--sidecar", str(tmp_path / "old"), "--out", str(out)])
    assert code == 2
