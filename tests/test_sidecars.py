"""Shared checks over a table of architectures x sidecar options.

Each row builds a tiny random trunk and checks: identity at init with notes
present, opening a gate changes logits, detaching restores the bare trunk,
gradients reach every sidecar parameter (and never the trunk) with and
without gradient checkpointing, and a save/load round trip.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import TINY_CONFIGS, tiny_trunk
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from pdt_hf import DenseNotes, PDTConfig, PDTForCausalLM
from pdt_hf.sidecars.adapter.config import AdapterConfig
from pdt_hf.sidecars.snc.config import SNCConfig
from pdt_hf.trunk.architectures import decoder_layers
from pdt_hf.trunk.compat import disable_checkpointing

OPTIONS = {
    "default": lambda: PDTConfig(num_streams=3),
    "all_layers": lambda: PDTConfig(
        num_streams=2,
        instrumented_layers=[0, 1],
        adapter=AdapterConfig(rank=4, activation="silu"),
        snc=SNCConfig(num_heads=2),
        d_note=32,
    ),
}
CASES = [(arch, opt) for arch in TINY_CONFIGS for opt in OPTIONS]


def _inputs(model: PDTForCausalLM, seed: int = 1) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    k = model.pdt_config.num_streams
    n, t, m = k, 7, 5
    d_note = model.pdt_config.d_note
    notes = DenseNotes(
        notes=torch.randn(n, m, d_note, generator=g),
        note_round=torch.tensor([[0, 1, 1, 2, 3]] * n),
        note_valid=torch.tensor([[True, True, False, True, True]] * n),
        query_round=torch.tensor([[1, 1, 2, 2, 3, 3, 4]] * n),
        lag=1,
    )
    return {
        "input_ids": torch.randint(0, 128, (n, t), generator=g),
        "stream_ids": torch.arange(n) % k,
        "notes": notes,
    }


def _open_gates(model: PDTForCausalLM) -> None:
    with torch.no_grad():
        for adapter in model.sidecar.adapters.values():
            adapter.up.normal_(std=0.5)
        for snc in model.sidecar.snc.values():
            snc.gate.fill_(0.7)


def _build(arch: str, opt: str) -> tuple[PDTForCausalLM, torch.nn.Module]:
    trunk = tiny_trunk(arch)
    return PDTForCausalLM(trunk, OPTIONS[opt]()), trunk


def _full_loss(out) -> torch.Tensor:
    return (
        out.logits.float().pow(2).mean()
        + out.note.pow(2).mean()
        + out.speculated_note.pow(2).mean()
        + out.planner_note.pow(2).mean()
        + out.coverage_logits.pow(2).mean()
        + out.agreement_logits.pow(2).mean()
    )


@pytest.mark.parametrize("arch,opt", CASES)
def test_identity_at_init_gate_open_and_detach(arch: str, opt: str) -> None:
    model, trunk = _build(arch, opt)
    inputs = _inputs(model)
    with torch.no_grad():
        bare = trunk(input_ids=inputs["input_ids"]).logits
        out = model(**inputs)
        assert torch.equal(out.logits, bare), "closed gates must leave logits bit-identical"
        _open_gates(model)
        opened = model(**inputs).logits
        assert (opened - bare).abs().max() > 1e-3, "an open gate must change the logits"
        # Only SNC open (adapter up back to zero): notes alone change logits.
        for adapter in model.sidecar.adapters.values():
            adapter.up.zero_()
        snc_only = model(**inputs).logits
        assert (snc_only - bare).abs().max() > 1e-4
        with model.disable_sidecars():
            assert torch.equal(trunk(input_ids=inputs["input_ids"]).logits, bare)
        assert not torch.equal(model(**inputs).logits, bare), "hooks must come back after disable_sidecars"
        unloaded = model.unload()
        assert unloaded is trunk
        assert torch.equal(trunk(input_ids=inputs["input_ids"]).logits, bare)


@pytest.mark.parametrize("arch,opt", CASES)
def test_gradients_reach_every_sidecar_parameter(arch: str, opt: str) -> None:
    model, trunk = _build(arch, opt)
    inputs = _inputs(model)
    d_note = model.pdt_config.d_note
    plan_notes = torch.randn(inputs["input_ids"].shape[0], 3, d_note)

    # Step 0, gates closed: the gradient still reaches the zero-initialised paths.
    model.train()
    model(**inputs, plan_notes=plan_notes).logits.float().pow(2).mean().backward()
    for name, snc in model.sidecar.snc.items():
        assert snc.gate.grad is not None and snc.gate.grad.abs() > 0, f"SNC gate {name} got no step-0 gradient"
    for name, adapter in model.sidecar.adapters.items():
        assert adapter.up.grad is not None and adapter.up.grad.abs().sum() > 0, f"adapter {name}.up got no gradient"
    model.sidecar.zero_grad(set_to_none=True)

    _open_gates(model)
    real_layers = set(decoder_layers(model.trunk))
    grads = {}
    for mode in ("plain", "hf_checkpointing", "wrapper_checkpointing"):
        model.sidecar.zero_grad(set_to_none=True)
        if mode == "hf_checkpointing":
            model.gradient_checkpointing_enable()
        if mode == "wrapper_checkpointing":
            disable_checkpointing(model.trunk)
            # Wraps each real layer so the hooks run inside the recomputed region.
            apply_activation_checkpointing(
                model.trunk,
                checkpoint_wrapper_fn=functools.partial(
                    checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT
                ),
                check_fn=lambda m: m in real_layers,
            )
        out = model(**inputs, plan_notes=plan_notes)
        # The context is still installed during backward, as in a recompute.
        _full_loss(out).backward()
        for name, p in model.sidecar.named_parameters():
            assert p.grad is not None, f"{mode}: no gradient for sidecar parameter {name}"
            if "stream_embedding" not in name:
                assert p.grad.abs().sum() > 0, f"{mode}: zero gradient for sidecar parameter {name}"
        for name, p in model.trunk.named_parameters():
            assert not p.requires_grad and p.grad is None, f"{mode}: trunk parameter {name} got a gradient"
        grads[mode] = {n: p.grad.clone() for n, p in model.sidecar.named_parameters()}
    for mode in ("hf_checkpointing", "wrapper_checkpointing"):
        for name, g in grads["plain"].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=1e-4, atol=1e-6, msg=f"{mode} {name}")


@pytest.mark.parametrize("arch,opt", CASES)
def test_save_load_round_trip(arch: str, opt: str, tmp_path) -> None:
    model, _ = _build(arch, opt)
    _open_gates(model)
    with torch.no_grad():
        for p in model.sidecar.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pdt_config.json", "sidecar.safetensors"]
    loaded = PDTForCausalLM.from_pretrained(tiny_trunk(arch), sidecar=tmp_path)
    assert loaded.pdt_config == model.pdt_config
    inputs = _inputs(model)
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.agreement_logits, b.agreement_logits)


def test_hooks_are_on_the_real_layer_objects(llama_trunk) -> None:
    model = PDTForCausalLM(llama_trunk, PDTConfig(instrumented_layers=[0, 1]))
    for layer in decoder_layers(llama_trunk):
        assert len(layer._forward_hooks) == 1
    model.unload()
    for layer in decoder_layers(llama_trunk):
        assert len(layer._forward_hooks) == 0


def test_trunk_frozen_and_only_sidecar_trainable(llama_trunk) -> None:
    model = PDTForCausalLM(llama_trunk)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("sidecar.") for n in trainable)


def test_default_layers_every_fourth_plus_last() -> None:
    trunk = tiny_trunk("llama", num_hidden_layers=10)
    model = PDTForCausalLM(trunk)
    assert model.pdt_config.instrumented_layers == [3, 7, 9]
    assert model.pdt_config.d_note == 64
