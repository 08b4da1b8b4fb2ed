"""Generic trunk discovery, the logit-head table, refusals, and decode equivalence on the types beyond the first five.

The shared checks (identity at init, open gates change logits, gradients, save/load) run for every type of
``TINY_CONFIGS`` in ``test_sidecars.py``; this file checks what discovery itself promises: layers found through
``get_decoder()`` are the trunk's real objects, logit transforms are applied exactly once, K = 1 decoding with
sidecars detached equals HF greedy ``generate`` (prompts longer than the 16-token windows), K = 3 streams equal
``generate`` on each stream's prompt, and each kind of trunk that cannot be served is refused with the reason.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY, TINY_CONFIGS, tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM, UnsupportedTrunkError
from pdt_hf.generation.prompts import render_ids, stream_message
from pdt_hf.trunk.architectures import (
    ARCHITECTURES,
    architecture_for,
    base_model,
    decoder_layers,
    trunk_fingerprint,
    trunk_logits,
)

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]
NEW_TYPES = ["phi3", "gemma2", "gemma3", "olmo2", "granite", "stablelm"]
GENERIC_TYPES = {"llama", "qwen2", "qwen3", "mistral", "gpt_oss", "phi3", "olmo2", "stablelm"}
"""Found by generic discovery alone; gemma2/gemma3 (soft-cap) and granite (logits_scaling) have table entries."""


def _tiny_gemma3_multimodal() -> transformers.PreTrainedModel:
    """Gemma3ForConditionalGeneration (what AutoModelForCausalLM gives for gemma-3-4b and up), text path only."""
    torch.manual_seed(0)
    text = TINY_CONFIGS["gemma3"]()
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=127
    )
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _ready(trunk: transformers.PreTrainedModel, num_streams: int) -> PDTForCausalLM:
    trunk.generation_config.eos_token_id = 2
    trunk.generation_config.pad_token_id = 0
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=num_streams))
    model.tokenizer = tiny_tokenizer()
    return model


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


def _trunk(arch: str) -> transformers.PreTrainedModel:
    return _tiny_gemma3_multimodal() if arch == "gemma3_multimodal" else tiny_trunk(arch)


# ---------------------------------------------------------------------- discovery
@pytest.mark.parametrize("arch", [*TINY_CONFIGS, "gemma3_multimodal"])
def test_layers_found_generically_are_the_real_objects(arch: str) -> None:
    trunk = _trunk(arch)
    stack = trunk.get_decoder()
    assert base_model(trunk) is stack
    assert decoder_layers(trunk) is stack.layers, "hooks must go on the trunk's own ModuleList, not a copy"
    if arch in GENERIC_TYPES:
        assert trunk.config.model_type not in ARCHITECTURES, "llama-like types need no table entry"
    text = trunk.config.get_text_config(decoder=True)
    assert len(decoder_layers(trunk)) == text.num_hidden_layers == 2
    assert trunk_fingerprint(trunk.config)["hidden_size"] == text.hidden_size == 64


def test_multimodal_gemma3_hooks_its_language_model() -> None:
    trunk = _tiny_gemma3_multimodal()
    assert decoder_layers(trunk) is trunk.model.language_model.layers
    assert trunk_fingerprint(trunk.config) == {
        "model_type": "gemma3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": 128,
    }


# ---------------------------------------------------------------------- logit heads
_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
LOGIT_CASES = {
    # name: (trunk config, bare logits from the plain lm_head output)
    "gemma2_softcap": (
        lambda: transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=16, final_logit_softcapping=0.5),
        lambda plain: torch.tanh(plain / 0.5) * 0.5,
    ),
    "gemma3_softcap": (
        lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=16, final_logit_softcapping=0.5),
        lambda plain: torch.tanh(plain / 0.5) * 0.5,
    ),
    "granite_logits_scaling": (lambda: TINY_CONFIGS["granite"](), lambda plain: plain / 8.0),
    "cohere_logit_scale": (lambda: transformers.CohereConfig(**TINY, logit_scale=0.0625), lambda p: p * 0.0625),
    # minicpm3 divides the hidden states by hidden_size / dim_model_base = 4 before lm_head.
    "minicpm3_hidden_scaling": (
        lambda: transformers.MiniCPM3Config(**{**TINY, "num_key_value_heads": 4}, **_MLA, dim_model_base=16),
        lambda plain: plain / 4.0,
    ),
}


@pytest.mark.parametrize("case", LOGIT_CASES)
def test_logit_transform_is_applied_exactly_once(case: str) -> None:
    config, expected_from_plain = LOGIT_CASES[case]
    torch.manual_seed(0)
    trunk = transformers.AutoModelForCausalLM.from_config(config(), attn_implementation="eager").eval()
    ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = trunk(input_ids=ids).logits
        hidden = base_model(trunk)(input_ids=ids).last_hidden_state
        plain = trunk.get_output_embeddings()(hidden)
        assert torch.equal(trunk_logits(trunk, hidden), bare)
        assert (plain - bare).abs().max() > 1e-3, "the transform must matter here, or this test proves nothing"
        torch.testing.assert_close(bare, expected_from_plain(plain), rtol=1e-5, atol=1e-6)
        model = PDTForCausalLM(trunk, PDTConfig(num_streams=2))
        assert torch.equal(model(input_ids=ids).logits, bare)


# ---------------------------------------------------------------------- decoding
@pytest.mark.parametrize("arch", [*NEW_TYPES, "gemma3_multimodal"])
def test_k1_detached_matches_generate(arch: str) -> None:
    # phi3, gemma2 and gemma3 have sliding-window layers (window 16) that the 60-token prompts exceed.
    model = _ready(_trunk(arch), num_streams=3)
    ids = render_ids(model.tokenizer, stream_message(PROMPT, PLAN[:1], PLAN[0]))
    assert len(ids) > 16
    with model.disable_sidecars():
        expected = _hf_greedy(model.trunk, ids, 20, eos=2)
        out = model.generate(prompt=PROMPT, plan=PLAN[:1], num_streams=1, max_new_tokens=20, block_size=4)
    assert out.sequences[0] == expected


@pytest.mark.parametrize("arch", ["gemma2", "granite", "phi3"])
def test_streams_match_generate_on_each_prompt_alone(arch: str) -> None:
    model = _ready(tiny_trunk(arch), num_streams=3)
    prompts = [render_ids(model.tokenizer, stream_message(PROMPT, PLAN, item)) for item in PLAN]
    assert len({len(p) for p in prompts}) == 3, "streams of different lengths exercise per-stream positions"
    expected = [_hf_greedy(model.trunk, p, 16, eos=2) for p in prompts]
    out = model.generate(prompt=PROMPT, plan=PLAN, num_streams=3, max_new_tokens=16, agreement_threshold=0.0)
    assert out.sequences == expected
    assert out.telemetry.rolled_back_tokens == 0


def test_fast_path_refuses_soft_capped_attention() -> None:
    model = _ready(tiny_trunk("gemma2"), num_streams=1)
    with pytest.raises(ValueError, match=r"attn_logit_softcapping=50.0.*fast_attention=False"):
        model.generate(prompt=PROMPT, plan=PLAN[:1], num_streams=1, max_new_tokens=4, fast_attention=True)


# ---------------------------------------------------------------------- refusals
def _refused(trunk: torch.nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedTrunkError, match=match):
        PDTForCausalLM(trunk)
    assert all(p.requires_grad for p in trunk.parameters()), "a refused trunk must be left untouched"


def test_refuses_no_layer_list_naming_the_lists_found() -> None:
    trunk = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4))
    _refused(trunk, r"'gpt2'.*no decoder layer list: GPT2Model.layers does not exist \(its nn.ModuleLists: h\)")


def test_refuses_encoder_decoder() -> None:
    config = transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    _refused(transformers.T5ForConditionalGeneration(config), r"'t5'.*encoder-decoder")


def test_refuses_stack_without_position_ids() -> None:
    config = transformers.BartConfig(
        vocab_size=128, d_model=64, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128
    )
    _refused(transformers.BartForCausalLM(config), r"'bart'.*BartDecoder.forward takes no position_ids")


def test_refuses_projection_after_the_last_layer() -> None:
    config = transformers.OPTConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=32
    )
    _refused(transformers.OPTForCausalLM(config), r"'opt'.*lm_head reads 32-wide final states.*hidden_size=64")


def test_table_refuses_a_type_whose_config_misleads() -> None:
    with pytest.raises(UnsupportedTrunkError, match=r"'moshi'.*sliding_window that its attention never applies"):
        architecture_for(transformers.MoshiConfig())


def test_refuses_layer_types_without_kv_state() -> None:
    config = transformers.Qwen3NextConfig(
        **TINY, head_dim=16, layer_types=["linear_attention", "full_attention"], num_experts=4, num_experts_per_tok=2
    )
    _refused(transformers.AutoModelForCausalLM.from_config(config), r"'qwen3_next'.*\['linear_attention'\]")


def test_refuses_unknown_logit_transform() -> None:
    config = transformers.LlamaConfig(**TINY)
    config.model_type = "llama_with_cap"  # a type without a table entry whose config asks for a soft-cap
    config.final_logit_softcapping = 30.0
    trunk = transformers.LlamaForCausalLM(config)
    _refused(trunk, r"'llama_with_cap'.*sets \['final_logit_softcapping'\].*add a LogitHead entry")


def test_layer_output_that_is_not_a_tensor_is_refused_on_first_forward(llama_trunk) -> None:
    # An earlier hook stands in for a layer type whose forward returns a dict.
    decoder_layers(llama_trunk)[1].register_forward_hook(lambda module, args, out: {"hidden_states": out})
    model = PDTForCausalLM(llama_trunk, PDTConfig(instrumented_layers=[1]))
    with pytest.raises(UnsupportedTrunkError, match=r"decoder layer 1 \(LlamaDecoderLayer\) returned dict"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
