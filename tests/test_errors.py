"""Bad input gets a clear error naming the value and the fix, and changes nothing."""

from __future__ import annotations

import json
import os
import pickle
import socket

import pytest
import torch
import transformers
from conftest import TINY, tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM, UnsupportedTrunkError
from pdt_hf.checkpoint import SidecarLoadError
from pdt_hf.generation.api import PromptTooLongError
from pdt_hf.generation.plan import SKELETON_MAX_NEW_TOKENS, skeleton_prompt_ids
from pdt_hf.generation.prompts import render_ids, stream_message
from pdt_hf.trunk.loading import TrunkLoadError, load_tokenizer, load_trunk


def test_unsupported_model_type_says_what_is_missing() -> None:
    trunk = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4))
    with pytest.raises(UnsupportedTrunkError, match=r"'gpt2'.*no decoder layer list.*tested: .*llama, mistral"):
        PDTForCausalLM(trunk)
    assert all(not layer._forward_hooks for layer in trunk.transformer.h), "a failed attach must leave no hooks"


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_num_streams_must_be_positive(value) -> None:
    with pytest.raises(ValueError, match=rf"num_streams must be a positive integer, got {value!r}"):
        PDTConfig(num_streams=value)


def test_block_size_above_commit_horizon() -> None:
    with pytest.raises(ValueError, match=r"block_size \(64\) > commit_horizon \(32\)"):
        PDTConfig(block_size=64)


def test_instrumented_layer_out_of_range(llama_trunk) -> None:
    with pytest.raises(ValueError, match=r"instrumented_layers \[5\] out of range: the trunk has 2 decoder layers"):
        PDTForCausalLM(llama_trunk, PDTConfig(instrumented_layers=[0, 5]))
    assert all(p.requires_grad for p in llama_trunk.parameters()), "a failed attach must not freeze the trunk"


def test_stream_id_out_of_range(llama_trunk) -> None:
    model = PDTForCausalLM(llama_trunk, PDTConfig(num_streams=2))
    with pytest.raises(ValueError, match=r"stream_ids \[0, 2\] out of range: this sidecar has num_streams=2"):
        model(input_ids=torch.zeros(2, 3, dtype=torch.long), stream_ids=torch.tensor([0, 2]))


def _saved(tmp_path) -> str:
    model = PDTForCausalLM(tiny_trunk("llama"), PDTConfig(num_streams=2))
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "field,override",
    [
        ("hidden_size", {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}),
        ("num_hidden_layers", {"num_hidden_layers": 3}),
        ("vocab_size", {"vocab_size": 64}),
    ],
)
def test_sidecar_for_another_trunk_names_the_field(tmp_path, field, override) -> None:
    _saved(tmp_path)
    other = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**TINY, **override}))
    with pytest.raises(ValueError, match=rf"{field}="):
        PDTForCausalLM.from_pretrained(other, sidecar=tmp_path)


def test_sidecar_for_another_model_type(tmp_path) -> None:
    _saved(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='llama'.*model_type='qwen2'"):
        PDTForCausalLM.from_pretrained(tiny_trunk("qwen2"), sidecar=tmp_path)


def test_truncated_and_corrupted_weights(tmp_path) -> None:
    _saved(tmp_path)
    weights = tmp_path / "sidecar.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(SidecarLoadError, match="truncated or corrupted"):
        PDTForCausalLM.from_pretrained(tiny_trunk("llama"), sidecar=tmp_path)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(SidecarLoadError, match="truncated or corrupted"):
        PDTForCausalLM.from_pretrained(tiny_trunk("llama"), sidecar=tmp_path)


def test_pickle_is_never_loaded(tmp_path) -> None:
    _saved(tmp_path)
    with open(tmp_path / "sidecar.safetensors", "wb") as handle:
        pickle.dump({"x": torch.zeros(2)}, handle)
    with pytest.raises(SidecarLoadError, match="truncated or corrupted"):
        PDTForCausalLM.from_pretrained(tiny_trunk("llama"), sidecar=tmp_path)


def test_missing_config(tmp_path) -> None:
    _saved(tmp_path)
    os.remove(tmp_path / "pdt_config.json")
    with pytest.raises(FileNotFoundError, match="no pdt_config.json"):
        PDTForCausalLM.from_pretrained(tiny_trunk("llama"), sidecar=tmp_path)


def test_bad_config_values_in_file(tmp_path) -> None:
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "pdt_config.json").read_text())
    cfg["num_streams"] = 0
    (tmp_path / "pdt_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_streams must be a positive integer, got 0"):
        PDTForCausalLM.from_pretrained(tiny_trunk("llama"), sidecar=tmp_path)


def test_failed_load_changes_nothing(tmp_path) -> None:
    _saved(tmp_path)
    model = PDTForCausalLM(tiny_trunk("llama"), PDTConfig(num_streams=2))
    before = {k: v.clone() for k, v in model.sidecar.state_dict().items()}
    (tmp_path / "sidecar.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SidecarLoadError):
        model.load_sidecar(tmp_path)
    after = model.sidecar.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_config_json_round_trip() -> None:
    cfg = PDTConfig(num_streams=4, note_lag=2)
    assert PDTConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    with pytest.raises(ValueError, match=r"unknown PDTConfig fields \['bogus'\]"):
        PDTConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# ---------------------------------------------------------------- generate: streams, plan, context length

PROMPT = "Explain how to brew tea."


def _gen_model(arch: str = "llama") -> PDTForCausalLM:
    trunk = tiny_trunk(arch)
    trunk.generation_config.eos_token_id = 2
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3))
    model.tokenizer = tiny_tokenizer()
    return model


def _no_outline_pass(model: PDTForCausalLM, monkeypatch) -> None:
    """Make any trunk.generate call (the skeleton pass) fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the skeleton pass ran before the input was validated")

    monkeypatch.setattr(model.trunk, "generate", refuse)


@pytest.mark.parametrize("value", [0, -2])
def test_generate_num_streams_names_the_range(value, monkeypatch) -> None:
    model = _gen_model()
    _no_outline_pass(model, monkeypatch)
    with pytest.raises(
        ValueError, match=rf"num_streams must be a positive integer, got {value}; this sidecar runs 1 to 3"
    ):
        model.generate(prompt=PROMPT, num_streams=value, max_new_tokens=4)


@pytest.mark.parametrize(
    "plan,num_streams,match",
    [
        (
            ["a", "b", "c", "d"],
            2,
            r"num_streams=2 is below the plan length \(4 items: \['a', 'b', 'c', 'd'\].*"
            r"the last 2 items would be dropped",
        ),
        (["a", "b"], 3, r"num_streams=3 is above the plan length \(2 items"),
        (["a", "b", "c", "d"], None, r"a plan of length 4 needs 4 streams but this sidecar has adapters for 3"),
        ("a; b; c; d", 4, r"num_streams=4 needs 4 streams but this sidecar has adapters for 3"),
    ],
)
def test_plan_and_num_streams_must_agree(plan, num_streams, match) -> None:
    with pytest.raises(ValueError, match=match):
        _gen_model().generate(prompt=PROMPT, plan=plan, num_streams=num_streams, max_new_tokens=4)


def test_plan_sets_k_when_num_streams_is_unset() -> None:
    out = _gen_model().generate(prompt=PROMPT, plan="Water; Leaves", max_new_tokens=4, agreement_threshold=0.0)
    assert out.plan == ["Water", "Leaves"] and len(out.sequences) == 2 and len(out.texts) == 2


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_prompt_longer_than_context_is_refused_before_the_outline_pass(arch, monkeypatch) -> None:
    # mistral's sliding window (16) is far below the prompt: only max_position_embeddings (512) bounds it.
    model = _gen_model(arch)
    _no_outline_pass(model, monkeypatch)
    with pytest.raises(
        PromptTooLongError, match=r"every stream needs \d+ prompt tokens \+ 8 new tokens.*context of 512"
    ):
        model.generate(prompt="word " * 200, max_new_tokens=8)


def test_outline_pass_longer_than_context_is_refused(monkeypatch) -> None:
    model = _gen_model()
    _no_outline_pass(model, monkeypatch)
    tok = model.tokenizer
    n = next(
        n
        for n in range(100, 512)
        if len(skeleton_prompt_ids(tok, "x" * n, 3)) + SKELETON_MAX_NEW_TOKENS > 512
        and len(render_ids(tok, stream_message("x" * n, [], ""))) + 4 <= 512
    )
    with pytest.raises(PromptTooLongError, match=r"the outline \(skeleton\) pass needs .* \+ 96 new tokens.*--plan"):
        model.generate(prompt="x" * n, max_new_tokens=4)


def test_stream_prompt_plus_new_tokens_must_fit(monkeypatch) -> None:
    model = _gen_model("mistral")
    plan = ["a", "b" * 150]
    longest = len(render_ids(model.tokenizer, stream_message(PROMPT, plan, plan[1])))
    new = 512 - longest + 1
    with pytest.raises(
        PromptTooLongError,
        match=rf"stream 1 \(shared prefix \d+ \+ suffix \d+ tokens\) needs {longest} prompt tokens \+ {new} new "
        rf"tokens = 513, which exceeds the trunk's context of 512 tokens.*max_new_tokens \(--max-new-tokens\) to "
        rf"{new - 1} or less",
    ):
        model.generate(prompt=PROMPT, plan=plan, max_new_tokens=new)
    # One token fewer fits: the bound is exact, not the sliding window.
    out = model.generate(prompt=PROMPT, plan=plan, max_new_tokens=new - 1, agreement_threshold=0.0)
    assert len(out.sequences) == 2


def test_note_capacity_is_checked_before_the_outline_pass(monkeypatch) -> None:
    model = _gen_model()
    _no_outline_pass(model, monkeypatch)
    model.pdt_config.note_capacity = 64
    with pytest.raises(ValueError, match=r"may publish 228 notes .*note_capacity is 64"):
        model.generate(prompt=PROMPT, max_new_tokens=600)


@pytest.mark.parametrize("name", ["note_lag", "max_retries"])
def test_negative_lag_and_retries(name) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 0, got -1"):
        _gen_model().generate(prompt=PROMPT, plan="a; b", max_new_tokens=4, **{name: -1})


# ---------------------------------------------------------------- trunk names that cannot be loaded


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: loading must decide offline, from the cache and the disk."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"tried the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


@pytest.mark.parametrize("load", [load_trunk, load_tokenizer])
def test_unknown_hub_id_offline(load, no_network) -> None:
    with pytest.raises(
        TrunkLoadError, match=r"'made-up-org/no-such-model-4242' looks like a Hugging Face Hub id"
    ) as info:
        load("made-up-org/no-such-model-4242")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "--model DIR" in message and "omit --model" in message
    assert isinstance(info.value.__cause__, OSError) and not isinstance(info.value.__cause__, TrunkLoadError)


@pytest.mark.parametrize("load", [load_trunk, load_tokenizer])
def test_missing_local_path(load, tmp_path, no_network) -> None:
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(TrunkLoadError, match=rf"looks like a local path, but {missing} does not exist") as info:
        load(str(missing))
    assert info.value.__cause__ is not None


def test_local_directory_without_a_model(tmp_path, no_network) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(TrunkLoadError, match=rf"is a local path, but no trunk could be loaded from {tmp_path}"):
        PDTForCausalLM.from_pretrained(str(tmp_path))


def test_trunks_load_without_hub_kernels_unless_asked(tmp_path, monkeypatch, no_network) -> None:
    """transformers 5.25 turned Hub kernels on by default; a trunk loads without them (no fetch while loading)."""
    from transformers import AutoModelForCausalLM

    tiny_trunk("llama").save_pretrained(tmp_path)
    seen: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(dict(kwargs))
        return real(*args, **kwargs) if not kwargs["use_kernels"] else "kernelized"

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    trunk, _ = load_trunk(str(tmp_path))
    assert seen[-1]["use_kernels"] is False and not getattr(trunk, "use_kernels", False)
    assert load_trunk(str(tmp_path), use_kernels=True)[0] == "kernelized"  # asked for, it reaches transformers
