"""Bad input gets a clear error naming the value and the fix, and changes nothing."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import transformers
from conftest import TINY, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM, UnsupportedTrunkError
from pdt_hf.checkpoint import SidecarLoadError


def test_unsupported_model_type_lists_supported() -> None:
    trunk = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4))
    with pytest.raises(UnsupportedTrunkError, match=r"'gpt2'.*gpt_oss, llama, mistral, qwen2, qwen3"):
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
