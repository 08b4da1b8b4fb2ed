"""PEFT (LoRA) trunks: a ``PeftModel``, an adapter directory, and a merged LoRA as the frozen trunk.

The LoRA is built on a tiny llama with ``init_lora_weights=False`` (B non-zero), so it really changes the logits,
and saved next to its base in ``tmp_path``. Each way in is checked for identity at init with notes present, a
frozen adapter, K-stream decoding equal to the LoRA model's own greedy ``generate`` with sidecars detached, and
a sidecar whose config records the adapter well enough to rebuild the same trunk from the sidecar alone.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import DenseNotes, PDTConfig, PDTForCausalLM, UnsupportedTrunkError
from pdt_hf.generation.prompts import render_ids, stream_message
from pdt_hf.trunk.architectures import decoder_layers

peft = pytest.importorskip("peft")

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture
def saved(tmp_path):
    """``(base_dir, adapter_dir)``: a tiny llama with tokenizer, and a LoRA (non-zero B) trained on nothing."""
    base = tiny_trunk("llama")
    base.generation_config.eos_token_id = 2
    base.generation_config.pad_token_id = 0
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base.save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir).eval()  # so the adapter records base_dir as its base
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(adapter_dir)
    return str(base_dir), str(adapter_dir)


def _lora_model(base_dir: str, adapter_dir: str, merge: bool = False):
    """An independent copy of the LoRA model, the reference every check compares with."""
    base = type(tiny_trunk("llama")).from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    return model.merge_and_unload() if merge else model


def _inputs(model: PDTForCausalLM) -> dict:
    g = torch.Generator().manual_seed(1)
    n, t, m = model.pdt_config.num_streams, 7, 4
    notes = DenseNotes(
        notes=torch.randn(n, m, model.pdt_config.d_note, generator=g),
        note_round=torch.tensor([[0, 1, 2, 3]] * n),
        note_valid=torch.ones(n, m, dtype=torch.bool),
        query_round=torch.full((n, t), 4),
        lag=1,
    )
    return {"input_ids": torch.randint(4, 100, (n, t), generator=g), "stream_ids": torch.arange(n), "notes": notes}


def _open_gates(model: PDTForCausalLM) -> None:
    with torch.no_grad():
        for adapter in model.sidecar.adapters.values():
            adapter.up.normal_(std=0.5)
        for snc in model.sidecar.snc.values():
            snc.gate.fill_(0.7)


def _greedy(trunk, ids: list[int], max_new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    out = trunk.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2
    )
    return out[0, len(ids) :].tolist()


def _lora_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


def test_the_lora_changes_logits(saved) -> None:
    base_dir, adapter_dir = saved
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    lora = _lora_model(base_dir, adapter_dir)
    with torch.no_grad():
        with_lora = lora(input_ids=ids).logits
        merged = _lora_model(base_dir, adapter_dir, merge=True)(input_ids=ids).logits
        with lora.disable_adapter():
            bare = lora(input_ids=ids).logits
    assert (with_lora - bare).abs().max() > 1e-2, "the LoRA must matter, or the tests below prove nothing"
    torch.testing.assert_close(merged, with_lora, rtol=1e-4, atol=1e-5)


def test_peft_model_identity_frozen_adapter_and_record(saved) -> None:
    base_dir, adapter_dir = saved
    lora = _lora_model(base_dir, adapter_dir)
    reference = _lora_model(base_dir, adapter_dir)
    model = PDTForCausalLM.from_pretrained(lora, config=PDTConfig(num_streams=3, instrumented_layers=[0, 1]))
    assert model.trunk is lora.get_base_model()
    assert decoder_layers(model.trunk) is lora.get_base_model().model.layers
    assert all(len(layer._forward_hooks) == 1 for layer in decoder_layers(model.trunk))
    lora_params = _lora_params(model.trunk)
    assert lora_params and not any(p.requires_grad for p in lora_params), "the LoRA is frozen with the trunk"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"sidecar.{n}" for n, _ in model.sidecar.named_parameters()
    }
    record = model.pdt_config.trunk_adapter
    assert record["peft_type"] == "LORA" and record["merged"] is False and record["name_or_path"] is None
    assert model.pdt_config.base_model_name_or_path == base_dir

    inputs = _inputs(model)
    with torch.no_grad():
        expected = reference(input_ids=inputs["input_ids"]).logits
        assert torch.equal(model(**inputs).logits, expected), "closed gates: bit-identical to the LoRA model"
    _open_gates(model)
    model(**inputs).logits.pow(2).mean().backward()
    assert all(p.grad is None for p in lora_params), "no gradient may reach the LoRA weights"
    for name, family in (("adapters", model.sidecar.adapters), ("snc", model.sidecar.snc)):
        for p in family.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"a {name} parameter got no gradient"
    with torch.no_grad():
        assert (model(**inputs).logits - expected).abs().max() > 1e-3
    assert model.unload() is lora


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_adapter_dir_k_stream_decode_matches_lora_generate(saved, merge: bool) -> None:
    base_dir, adapter_dir = saved
    model = PDTForCausalLM.from_pretrained(adapter_dir, config=PDTConfig(num_streams=3), merge_adapter=merge)
    assert model.tokenizer is not None, "the tokenizer comes from the base when the adapter ships none"
    assert bool(_lora_params(model.trunk)) is not merge
    reference = _lora_model(base_dir, adapter_dir, merge=merge)
    prompts = [render_ids(model.tokenizer, stream_message(PROMPT, PLAN, item)) for item in PLAN]
    expected = [_greedy(reference, p, 16) for p in prompts]
    kwargs = dict(prompt=PROMPT, plan=PLAN, num_streams=3, max_new_tokens=16, agreement_threshold=0.0)
    assert model.generate(**kwargs).sequences == expected, "sidecars at init: the LoRA model's own decode"
    _open_gates(model)
    with model.disable_sidecars():
        assert model.generate(**kwargs).sequences == expected, "sidecars detached: the LoRA model's own decode"
    assert model.generate(**kwargs).sequences != expected, "open gates must change the decode"


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_sidecar_records_the_adapter_and_rebuilds_the_trunk(saved, tmp_path, merge: bool) -> None:
    base_dir, adapter_dir = saved
    model = PDTForCausalLM.from_pretrained(adapter_dir, config=PDTConfig(num_streams=2), merge_adapter=merge)
    _open_gates(model)
    model.save_pretrained(tmp_path / "sidecar")
    saved_config = json.loads((tmp_path / "sidecar" / "pdt_config.json").read_text())
    assert saved_config["base_model_name_or_path"] == base_dir
    assert saved_config["trunk_adapter"] == {
        "peft_type": "LORA",
        "name_or_path": adapter_dir,
        "revision": None,
        "adapter_name": "default",
        "merged": merge,
    }
    rebuilt = PDTForCausalLM.from_pretrained(None, sidecar=tmp_path / "sidecar")
    assert bool(_lora_params(rebuilt.trunk)) is not merge
    assert rebuilt.pdt_config == model.pdt_config
    inputs = _inputs(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(**inputs).logits, model(**inputs).logits)


def test_in_memory_peft_model_sidecar_needs_the_model_back(saved, tmp_path) -> None:
    base_dir, adapter_dir = saved
    lora = _lora_model(base_dir, adapter_dir)
    model = PDTForCausalLM.from_pretrained(lora, config=PDTConfig(num_streams=2))
    _open_gates(model)
    model.save_pretrained(tmp_path / "sidecar")
    with pytest.raises(ValueError, match=r"PEFT model built in memory.*peft_model.save_pretrained"):
        PDTForCausalLM.from_pretrained(None, sidecar=tmp_path / "sidecar")
    again = PDTForCausalLM.from_pretrained(_lora_model(base_dir, adapter_dir), sidecar=tmp_path / "sidecar")
    inputs = _inputs(model)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


def test_prompt_learning_adapter_is_refused() -> None:
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    prompt_tuned = peft.get_peft_model(tiny_trunk("llama"), config)
    with pytest.raises(UnsupportedTrunkError, match=r"PROMPT_TUNING \(prompt learning\).*PeftModel.forward"):
        PDTForCausalLM(prompt_tuned)
    assert not any(layer._forward_hooks for layer in decoder_layers(prompt_tuned.get_base_model()))


def test_missing_peft_names_the_extra(saved, monkeypatch) -> None:
    _, adapter_dir = saved
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match=r"PEFT adapter .*adapter'.*pip install 'pdt-hf\[peft\]'"):
        PDTForCausalLM.from_pretrained(adapter_dir)


def test_the_embedded_trunk_id_never_asks_the_hub_for_an_adapter(monkeypatch) -> None:
    """A sidecar's base pointer to the embedded SmolLM2 must not stall offline on an adapter lookup."""
    import transformers.utils

    from pdt_hf.trunk.loading import EMBEDDED_MODEL_ID
    from pdt_hf.trunk.peft import find_adapter

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked for an adapter_config.json")

    monkeypatch.setattr(transformers.utils, "find_adapter_config_file", no_hub)
    assert find_adapter(EMBEDDED_MODEL_ID) is None
    assert find_adapter(f"embedded:{EMBEDDED_MODEL_ID}") is None
    with pytest.raises(AssertionError, match="the Hub was asked"):  # other Hub ids are still looked up
        find_adapter("someone/some-lora")
