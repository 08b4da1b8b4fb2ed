"""The embedded SmolLM2-135M-Instruct (real weights, dequantised from the shipped GGUF)."""

from __future__ import annotations

import pytest
import torch

from pdt_hf import DenseNotes, PDTConfig, PDTForCausalLM
from pdt_hf.generation.prompts import render_ids, stream_message

pytestmark = pytest.mark.integration

PROMPT = "Give a short guide to making coffee at home."
PLAN = ["Beans", "Brewing", "Serving"]


@pytest.fixture(scope="module")
def smollm2() -> PDTForCausalLM:
    model = PDTForCausalLM.from_pretrained(None, config=PDTConfig(num_streams=3))
    return model.eval()


def test_identity_at_init_on_real_weights(smollm2: PDTForCausalLM) -> None:
    model = smollm2
    assert model.trunk.config.model_type == "llama" and model.trunk.num_parameters() == 134_515_008
    ids = model.tokenizer(
        ["The garden needs water and light.", "Coffee beans are roasted."], return_tensors="pt", padding=True
    )
    notes = DenseNotes(notes=torch.randn(2, 4, model.pdt_config.d_note), lag=0)
    with torch.no_grad():
        with model.disable_sidecars():
            bare = model.trunk(**ids).logits
        out = model(**ids, stream_ids=torch.tensor([0, 2]), notes=notes)
    assert torch.equal(out.logits, bare)


def test_k1_detached_and_k3_identity_match_generate(smollm2: PDTForCausalLM) -> None:
    model, tok = smollm2, smollm2.tokenizer
    eos = model.trunk.generation_config.eos_token_id

    def hf(ids: list[int], n: int) -> list[int]:
        x = torch.tensor([ids])
        out = model.trunk.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id or 0,
        )
        return out[0, len(ids) :].tolist()

    with model.disable_sidecars():
        expected = hf(render_ids(tok, stream_message(PROMPT, PLAN[:1], PLAN[0])), 12)
        out = model.generate(prompt=PROMPT, plan=PLAN[:1], num_streams=1, max_new_tokens=12)
    assert out.sequences[0] == expected

    with model.disable_sidecars():
        expected = [hf(render_ids(tok, stream_message(PROMPT, PLAN, item)), 10) for item in PLAN]
    out = model.generate(prompt=PROMPT, plan=PLAN, num_streams=3, max_new_tokens=10, agreement_threshold=0.0)
    assert out.sequences == expected
    assert all(text for text in out.texts)
