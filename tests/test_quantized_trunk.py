"""A 4-bit (bitsandbytes NF4) trunk on the CPU: loading, identity at init, sidecar-only training, decoding.

The trunk is conftest's tiny llama (2 layers, hidden 64, vocab 128; SmolLM2-135M: 30 layers, hidden 576,
vocab 49152) saved with the tiny tokenizer and reloaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)`` and ``device_map="cpu"``.

Training is checked against a reference: an fp32 trunk whose linear weights are the dequantised NF4 weights
must give the same logits and the same sidecar gradients, so a 4-bit layer that stops the gradient (as
bitsandbytes' fused CPU inference kernel does, see ``pdt_hf.trunk.quantized``) fails the test.
"""

from __future__ import annotations

import importlib.util
import os
import runpy

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk
from training_helpers import TINY_RECIPE, TRAIN_SCRIPT, save_tiny_trunk, tiny_overrides
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from pdt_hf import DenseNotes, PDTConfig, PDTForCausalLM
from pdt_hf.generation.prompts import render_ids, stream_message
from pdt_hf.training.config import load_recipe
from pdt_hf.training.data.builder import build_dataset
from pdt_hf.training.loading import load_trunk_and_tokenizer
from pdt_hf.training.metrics import read_metrics
from pdt_hf.training.trainer import state_digest
from pdt_hf.trunk.quantized import is_packed_for_cpu, pin_4bit_layout

bnb = pytest.importorskip("bitsandbytes")

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _pdt_config() -> PDTConfig:
    # Sidecars on both layers, so the layer-0 sidecar's gradient has to cross layer 1's 4-bit projections.
    return PDTConfig(num_streams=3, instrumented_layers=[0, 1])


@pytest.fixture(scope="module")
def trunk_dir(tmp_path_factory) -> str:
    """The tiny fp32 llama and the tiny tokenizer, saved as a loadable model directory."""
    directory = str(tmp_path_factory.mktemp("tiny-llama"))
    trunk, tok = tiny_trunk("llama"), tiny_tokenizer()
    trunk.generation_config.eos_token_id = tok.eos_token_id
    trunk.generation_config.pad_token_id = tok.pad_token_id
    trunk.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _load_4bit(directory: str):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu").eval()


def _dequantised_reference(trunk4):
    """An fp32 llama with the 4-bit trunk's weights: each ``Linear4bit`` becomes ``nn.Linear`` of its dequantisation."""
    ref = tiny_trunk("llama")
    state = {}
    for name, module in trunk4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    ref.load_state_dict({**{k: v for k, v in trunk4.state_dict().items() if k in ref.state_dict()}, **state})
    return ref


def _inputs(num_streams: int = 3, d_note: int = 64, seed: int = 1) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    n, t, m = num_streams, 7, 5
    notes = DenseNotes(
        notes=torch.randn(n, m, d_note, generator=g),
        note_round=torch.tensor([[0, 1, 1, 2, 3]] * n),
        note_valid=torch.tensor([[True, True, False, True, True]] * n),
        query_round=torch.tensor([[1, 1, 2, 2, 3, 3, 4]] * n),
        lag=1,
    )
    return {"input_ids": torch.randint(0, 128, (n, t), generator=g), "stream_ids": torch.arange(n), "notes": notes}


def _open_gates(model: PDTForCausalLM) -> None:
    with torch.no_grad():
        for adapter in model.sidecar.adapters.values():
            adapter.up.normal_(std=0.5)
        for snc in model.sidecar.snc.values():
            snc.gate.fill_(0.7)


def test_layers_are_nf4_and_close_to_fp32(trunk_dir: str) -> None:
    trunk4 = _load_4bit(trunk_dir)
    layers = [m for m in trunk4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(PROJECTIONS), "every projection of both layers must be 4-bit"
    for layer in trunk4.model.layers:
        for name in PROJECTIONS:
            module = layer.get_submodule(f"self_attn.{name}" if name in PROJECTIONS[:4] else f"mlp.{name}")
            assert isinstance(module, bnb.nn.Linear4bit)
            assert module.weight.dtype == torch.uint8 and module.weight.quant_state.quant_type == "nf4"
    assert any(key.endswith("quant_state.bitsandbytes__nf4") for key in trunk4.state_dict())
    ids = _inputs()["input_ids"]
    with torch.no_grad():
        full = tiny_trunk("llama")(input_ids=ids).logits
        quantised = _load_4bit(trunk_dir)(input_ids=ids).logits
    assert (quantised - full).abs().max() > 1e-3, "4-bit weights must change the logits"
    assert torch.nn.functional.cosine_similarity(quantised.flatten(), full.flatten(), dim=0) > 0.9


def test_identity_at_init_and_open_gate(trunk_dir: str) -> None:
    trunk4 = _load_4bit(trunk_dir)
    bytes_before = state_digest(trunk4)
    model = PDTForCausalLM(trunk4, _pdt_config())
    inputs = _inputs(d_note=model.pdt_config.d_note)
    fresh = _load_4bit(trunk_dir)
    pin_4bit_layout(fresh)
    with torch.no_grad():
        bare = fresh(input_ids=inputs["input_ids"]).logits
        out = model(**inputs)
        assert torch.equal(out.logits, bare), "closed gates on a 4-bit trunk must leave logits bit-identical"
        with model.disable_sidecars():
            assert torch.equal(trunk4(input_ids=inputs["input_ids"]).logits, bare)
        _open_gates(model)
        assert (model(**inputs).logits - bare).abs().max() > 1e-3, "an open gate must change the logits"
    assert not any(is_packed_for_cpu(m) for m in trunk4.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert state_digest(trunk4) == bytes_before, "eval forwards must leave the 4-bit trunk's bytes unchanged"


def test_training_reaches_sidecars_through_4bit_layers_and_leaves_trunk_bytes(trunk_dir: str) -> None:
    trunk4 = _load_4bit(trunk_dir)
    bytes_before = state_digest(trunk4)
    torch.manual_seed(0)
    model = PDTForCausalLM(trunk4, _pdt_config())
    inputs = _inputs(d_note=model.pdt_config.d_note)
    labels = inputs["input_ids"].clone()
    optimizer = torch.optim.AdamW(model.sidecar.parameters(), lr=1e-2)
    trained = ("adapters.", "snc.")  # what the LM loss reaches; the heads read the last hidden state only
    losses = []
    for step in range(4):
        with torch.no_grad():  # the trainer's no-grad passes (prefix, notes) run the eval-mode trunk first
            model(**inputs)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        for name, p in model.sidecar.named_parameters():
            if not name.startswith(trained):
                assert p.grad is None, f"step {step}: {name} is outside the LM loss but got a gradient"
                continue
            assert p.grad is not None, f"step {step}: no gradient for sidecar parameter {name}"
            # At step 0 the residual paths are closed: only adapter up projections and SNC gates see a gradient.
            if step > 0 or name.endswith(".up") or (name.startswith("snc.") and name.endswith(".gate")):
                assert p.grad.abs().sum() > 0, f"step {step}: zero gradient for sidecar parameter {name}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 0.05, f"LM loss must fall on a fixed batch: {losses}"
    for name, p in trunk4.named_parameters():
        assert not p.requires_grad and p.grad is None, f"trunk parameter {name} got a gradient"
    assert state_digest(trunk4) == bytes_before, "training must leave the 4-bit trunk's bytes unchanged"


def _assert_matches_dequantised_reference(model4: PDTForCausalLM) -> None:
    """Logits and every sidecar gradient of ``model4`` equal those of the same sidecar on the fp32 reference."""
    _open_gates(model4)
    ref = PDTForCausalLM(_dequantised_reference(model4.trunk), _pdt_config())
    ref.sidecar.load_state_dict(model4.sidecar.state_dict())
    models = [model4, ref]
    inputs = _inputs(d_note=models[0].pdt_config.d_note)
    plan_notes = torch.randn(3, 3, models[0].pdt_config.d_note, generator=torch.Generator().manual_seed(2))
    grads, logits = [], []
    for model in models:
        with torch.no_grad():
            model(**inputs)  # an eval-mode no-grad forward first, as in the trainer
        out = model(**inputs, plan_notes=plan_notes, labels=inputs["input_ids"])
        (out.loss + out.note.pow(2).mean() + out.agreement_logits.pow(2).mean()).backward()
        logits.append(out.logits.detach())
        grads.append({n: p.grad for n, p in model.sidecar.named_parameters() if p.grad is not None})
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("adapters.") for n in grads[0])
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradients_match_the_dequantised_fp32_trunk(trunk_dir: str) -> None:
    _assert_matches_dequantised_reference(PDTForCausalLM(_load_4bit(trunk_dir), _pdt_config()))


def test_rewritten_layers_are_converted_back(trunk_dir: str) -> None:
    trunk4 = _load_4bit(trunk_dir)
    with torch.no_grad():
        trunk4(input_ids=torch.tensor([[1, 2, 3]]))
    layers = [m for m in trunk4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    if not any(is_packed_for_cpu(m) for m in layers):
        pytest.skip("bitsandbytes' fused CPU kernel is not used on this CPU (needs AVX512-BF16)")
    with pytest.warns(UserWarning, match="rewritten by bitsandbytes"):
        model = PDTForCausalLM(trunk4, _pdt_config())
    assert not any(is_packed_for_cpu(m) for m in layers)
    _assert_matches_dequantised_reference(model)  # the rounded scales stay, but gradients flow again


def _hf_greedy(trunk, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    input_ids = torch.tensor([ids])
    out = trunk.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def test_generate_three_streams_and_k1_matches_hf_generate(trunk_dir: str) -> None:
    model = PDTForCausalLM(_load_4bit(trunk_dir), _pdt_config())
    model.tokenizer = tok = tiny_tokenizer()
    prompts = [render_ids(tok, stream_message(PROMPT, PLAN, item)) for item in PLAN]
    expected = [_hf_greedy(model.trunk, p, 16, eos=None) for p in prompts]
    model.trunk.generation_config.eos_token_id = None
    out = model.generate(prompt=PROMPT, plan=PLAN, num_streams=3, max_new_tokens=16, agreement_threshold=0.0)
    assert out.plan == PLAN and len(out.sequences) == len(out.texts) == 3
    assert out.texts == [tok.decode(s, skip_special_tokens=True) for s in out.sequences]
    assert out.answer == "\n\n".join(t for t in out.texts if t), "sections must be assembled in plan order"
    assert all(len(s) == 16 for s in out.sequences), "no EOS: every stream writes max_new_tokens"
    assert {c["stream"] for c in out.telemetry.commits} == {0, 1, 2}
    assert out.telemetry.rolled_back_tokens == 0
    # Identity at init and exact batching: each stream writes what HF greedy writes on its prompt alone.
    assert out.sequences == expected

    ids = render_ids(tok, stream_message(PROMPT, PLAN[:1], PLAN[0]))
    with model.disable_sidecars():
        single = _hf_greedy(model.trunk, ids, 20, eos=None)
        k1 = model.generate(prompt=PROMPT, plan=PLAN[:1], num_streams=1, max_new_tokens=20, block_size=4)
    assert k1.sequences[0] == single


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_load_trunk_and_tokenizer_in_4bit_on_cpu(trunk_dir: str, dtype: str) -> None:
    recipe = load_recipe(
        TINY_RECIPE, [f"model.name_or_path={trunk_dir}", "model.load_in_4bit=true", f"model.dtype={dtype}"]
    )
    trunk, tok, name = load_trunk_and_tokenizer(recipe.model, "cpu")
    assert name == trunk_dir and not trunk.training
    layers = [m for m in trunk.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(PROJECTIONS)
    assert all(m.compute_dtype == torch.float32 and m.weight.device.type == "cpu" for m in layers)
    assert trunk.get_input_embeddings().weight.dtype == torch.float32
    assert tok.decode(tok("brew tea")["input_ids"]) == "brew tea"
    reference = _load_4bit(trunk_dir)
    pin_4bit_layout(reference)
    ids = torch.tensor([tok("brew tea")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(trunk(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not any(is_packed_for_cpu(m) for m in layers), "the loader must pin the 4-bit layout"


def test_load_in_4bit_errors(trunk_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = load_recipe(TINY_RECIPE, [f"model.name_or_path={trunk_dir}", "model.load_in_4bit=true"])
    with pytest.raises(ValueError, match="cpu or cuda"):
        load_trunk_and_tokenizer(recipe.model, "meta")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install pdt-hf\[bnb\]"):
        load_trunk_and_tokenizer(recipe.model)


def test_tiny_recipe_trains_on_a_4bit_trunk(tmp_path) -> None:
    """recipes/train.py with ``model.load_in_4bit=true`` on CPU: every stage's loss falls, the trunk is unchanged."""
    root = str(tmp_path)
    overrides = [*tiny_overrides(root, save_tiny_trunk(os.path.join(root, "trunk"))), "model.load_in_4bit=true"]
    build_dataset(load_recipe(TINY_RECIPE, overrides), progress=False)
    summary = runpy.run_path(TRAIN_SCRIPT)["main"](["--config", TINY_RECIPE, *overrides])
    assert summary["trunk_unchanged"], "training must leave the 4-bit trunk's bytes unchanged"
    stages: dict[str, list[float]] = {}
    for row in read_metrics(os.path.join(root, "run", "metrics.csv")):
        if row["name"] == "loss":
            stages.setdefault(row["stage"], []).append(row["value"])
    assert list(stages) == ["heads", "adapters", "snc", "judges"]
    for stage, values in stages.items():
        assert values[-1] < values[0], f"stage {stage} loss did not fall on the 4-bit trunk: {values}"
