"""The fast decode step against the reference: static stream cache, step mask buffer, sidecar delta, tokens.

Tiny trunks (2 layers, hidden 64; SmolLM2-135M: 30 layers, hidden 576) with open sidecar gates, so adapters and
SNC change the logits and a wrong fast path shows. Exact rearrangements (static cache layout, mask buffer, batched
token choice, one note read per block) are compared bitwise; the fused sidecar delta within fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk
from transformers import DynamicCache, SuppressTokensLogitsProcessor

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.bus import NoteBus
from pdt_hf.generation.step import reference_step
from pdt_hf.sidecars.context import PackedNotes, SidecarContext
from pdt_hf.sidecars.decode_step import SidecarDecodeStep
from pdt_hf.stream_kv import StreamKVCache, flat_write_index, step_visibility, visibility_to_mask
from pdt_hf.trunk.compat import cache_kwargs

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]
ATOL = 1e-5


def _open_gates(model: PDTForCausalLM, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.sidecar.adapters.values():
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=gen) * 0.5)
            adapter.norm_weight.copy_(1 + 0.3 * torch.randn(adapter.norm_weight.shape, generator=gen))
            adapter.gate.copy_(1 + 0.3 * torch.randn(adapter.gate.shape, generator=gen))
        for snc in model.sidecar.snc.values():
            snc.gate.fill_(0.7)


def _model(arch: str = "llama", **cfg) -> PDTForCausalLM:
    trunk = tiny_trunk(arch)
    trunk.generation_config.eos_token_id = 2
    trunk.generation_config.pad_token_id = 0
    model = PDTForCausalLM(trunk, PDTConfig(**{"num_streams": 3, "instrumented_layers": [0, 1], **cfg}))
    model.tokenizer = tiny_tokenizer()
    _open_gates(model)
    return model.eval()


# ---------------------------------------------------------------------- stream cache
def _prefix_cache(trunk, prompt: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        trunk(prompt, **cache_kwargs(cache))
    return cache


def _step(trunk, cache: StreamKVCache, streams: list[int], tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), cache.step(torch.tensor(streams), tokens.shape[1]) as kw:
        return trunk(tokens, **cache_kwargs(cache), **kw).logits


def test_flat_write_index_docstring_example_and_storage_rows() -> None:
    index = flat_write_index(torch.tensor([2, 0]), torch.tensor([[1], [3]]), heads=2, total=5, offset=0)
    assert index.tolist() == [21, 26, 3, 8]
    store = torch.zeros(3, 2, 5 + 4, 1)  # static layout: P = 4 prefix slots first
    new = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[4.0]]]])  # [A=2, Hkv=2, T=1, D=1]
    rows = flat_write_index(torch.tensor([2, 0]), torch.tensor([[1], [3]]), heads=2, total=9, offset=4)
    store.view(-1, 1).index_copy_(0, rows, new.reshape(-1, 1))
    assert store[2, :, 4 + 1, 0].tolist() == [1.0, 2.0] and store[0, :, 4 + 3, 0].tolist() == [3.0, 4.0]
    assert store.sum() == 10.0, "nothing else is written"


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_static_cache_is_bitwise_the_shared_layout_and_rollback_is_a_fresh_forward(impl: str) -> None:
    trunk = tiny_trunk("llama", _attn_implementation=impl)
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(1))
    caches = [StreamKVCache.from_prefix(_prefix_cache(trunk, prompt), 3, 20, 8, static=s) for s in (False, True)]
    assert caches[1].layers[0].suffix_keys.data_ptr() != caches[0].layers[0].suffix_keys.data_ptr()
    gen = torch.Generator().manual_seed(2)
    tokens: list[list[int]] = [[], [], []]
    schedule = [([0, 1, 2], 3), ([0, 1, 2], 1), ([2, 0], 1), ([1], 1), ([0, 1, 2], 1), ([0, 2], 1)]
    for i, (streams, t) in enumerate(schedule):
        new = torch.randint(0, 128, (len(streams), t), generator=gen)
        shared, static = (_step(trunk, c, streams, new) for c in caches)
        assert torch.equal(shared, static), f"step {i}: the static layout must change no value"
        for row, k in enumerate(streams):
            tokens[k] += new[row].tolist()
        if i == 3:
            for c in caches:
                c.rollback(0, 2)
            del tokens[0][-2:]
    new = torch.tensor([[5], [9], [11]])
    logits = _step(trunk, caches[1], [0, 1, 2], new)
    for k in range(3):
        with torch.no_grad():
            fresh = trunk(torch.cat([prompt, torch.tensor([tokens[k] + [new[k, 0].item()]])], dim=1)).logits[0, -1]
        torch.testing.assert_close(logits[k, -1], fresh, atol=ATOL, rtol=0)


def test_step_mask_buffer_equals_a_mask_built_from_the_lengths() -> None:
    trunk = tiny_trunk("llama")
    cache = StreamKVCache.from_prefix(_prefix_cache(trunk, torch.tensor([[1, 2, 3, 4]])), 3, 10, 6, static=True)

    def check(streams: list[int]) -> None:
        kw = cache.begin_step(torch.tensor(streams), 1)
        step = cache.current_step
        built = visibility_to_mask(step_visibility(4, step.lengths, 1, step.suffix_width), torch.float32)
        assert torch.equal(kw["attention_mask"], built)

    _step(trunk, cache, [0, 1, 2], torch.tensor([[5, 6], [7, 8], [9, 10]]))  # T > 1: the buffer is rebuilt after
    for streams in ([0, 1, 2], [1, 2], [0]):
        check(streams)
        cache.end_step()
    check([2, 0])
    cache.cancel_step()  # a cancelled step's column closes again
    cache.rollback(1, 3)
    check([0, 1, 2])
    cache.end_step()
    assert cache.lengths.tolist() == [5, 2, 5]


# ---------------------------------------------------------------------- sidecar delta
def _bus(model: PDTForCausalLM, publish: dict[int, list[int]], dtype: torch.dtype = torch.float32) -> NoteBus:
    cfg, snc = model.pdt_config, model.sidecar.snc_layers
    bus = NoteBus(
        num_streams=3,
        d_note=cfg.d_note,
        capacity=16,
        note_lag=1,
        note_window=16,
        projectors=[layer.project_notes for layer in snc],
        kv_shape=(snc[0].num_heads, snc[0].head_dim),
        dtype=dtype,
    )
    gen = torch.Generator().manual_seed(3)
    for round, streams in sorted(publish.items()):
        notes = torch.randn(len(streams), cfg.d_note, generator=gen)
        if round == 0:
            bus.publish_snapshot(notes, torch.tensor(streams))
        else:
            bus.publish(torch.tensor(streams), round, notes)
    return bus


@pytest.mark.parametrize(
    "rows, publish",
    [([0, 1, 2], {0: [0, 1, 2], 1: [0, 2]}), ([2, 0], {0: [0, 1, 2], 1: [1]}), ([0, 1, 2], {0: [0]})],
    ids=["all-streams", "subset", "rows-without-notes"],
)
@pytest.mark.parametrize("fold", [False, True], ids=["projected", "folded"])
def test_sidecar_decode_step_matches_layer_delta(rows: list[int], publish: dict, fold: bool, monkeypatch) -> None:
    monkeypatch.setattr(SidecarDecodeStep, "fold_notes", fold)
    model = _model()
    bus = _bus(model, publish)
    read = bus.read(torch.tensor(rows), 3)
    streams = torch.tensor(rows)
    fast = SidecarDecodeStep(model.sidecar)
    fast.bind(rows, bus, read)
    hidden = torch.randn(len(rows), 1, 64, generator=torch.Generator().manual_seed(4))
    model.sidecar.context = SidecarContext(stream_ids=streams, notes=PackedNotes(bus, read.indices, read.offsets))
    for layer in (0, 1):
        expected = model.sidecar.layer_delta(layer, hidden)
        got = fast.layer_delta(layer, hidden)
        assert not torch.equal(expected, hidden), "open gates must change the hidden state"
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if 0 in read.counts.tolist():  # a row that sees no note gets an exact zero SNC delta
        with torch.no_grad():
            for adapter in model.sidecar.adapters.values():
                adapter.up.zero_()
        fast = SidecarDecodeStep(model.sidecar)
        fast.bind(rows, bus, read)
        blind = read.counts.tolist().index(0)
        assert torch.equal(fast.layer_delta(0, hidden)[blind], hidden[blind])


@pytest.mark.parametrize("fold", [False, True], ids=["projected", "folded"])
def test_sidecar_decode_step_in_bf16_is_as_close_to_fp32_as_the_reference(fold: bool, monkeypatch) -> None:
    monkeypatch.setattr(SidecarDecodeStep, "fold_notes", fold)
    # flash-attention's rule: the fast path's error against fp32 is at most 2x the reference's at the same precision.
    publish, rows = {0: [0, 1, 2], 1: [0, 2]}, [0, 1, 2]
    hidden = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(4))
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model().to(dtype)
        bus = _bus(model, publish, dtype)
        read = bus.read(torch.tensor(rows), 3)
        model.sidecar.context = SidecarContext(torch.tensor(rows), PackedNotes(bus, read.indices, read.offsets))
        fast = SidecarDecodeStep(model.sidecar)
        fast.bind(rows, bus, read)
        with torch.no_grad():
            outputs[dtype] = (model.sidecar.layer_delta(1, hidden.to(dtype)), fast.layer_delta(1, hidden.to(dtype)))
    exact = outputs[torch.float32][0]
    reference, got = (x.float() for x in outputs[torch.bfloat16])
    assert outputs[torch.bfloat16][1].dtype == torch.bfloat16
    assert (got - exact).abs().max() <= 2 * (reference - exact).abs().max() + 1e-6


def test_forward_logits_fast_vs_reference() -> None:
    model = _model("qwen2")
    bus = _bus(model, {0: [0, 1, 2], 1: [0, 1, 2]})
    read = bus.read(torch.tensor([0, 1, 2]), 2)
    notes = PackedNotes(bus, read.indices, read.offsets)
    ids = torch.tensor([[5], [17], [33]])
    kwargs = dict(input_ids=ids, stream_ids=torch.arange(3), notes=notes, compute_heads=False)
    with torch.no_grad():
        bare = model.trunk(ids).logits
        reference = model(**kwargs).logits
        fast = SidecarDecodeStep(model.sidecar)
        fast.bind([0, 1, 2], bus, read)
        with model.hooks.using(fast.layer_delta):
            got = model(**kwargs).logits
    assert (reference - bare).abs().max() > 1e-2, "the sidecar must matter for this test to mean anything"
    torch.testing.assert_close(got, reference, atol=ATOL, rtol=0)
    with torch.no_grad():
        assert torch.equal(model(**kwargs).logits, reference), "the hooks' own delta must come back after the block"


# ---------------------------------------------------------------------- whole generations
@pytest.mark.parametrize(
    "arch, fold", [("llama", None), ("llama", True), ("llama", False), ("mistral", None), ("gpt_oss", None)]
)
def test_generate_fast_equals_reference(arch: str, fold: bool | None, monkeypatch) -> None:
    monkeypatch.setattr(SidecarDecodeStep, "fold_notes", fold)
    model = _model(arch)
    suppress = SuppressTokensLogitsProcessor([2, 7], device="cpu")
    kwargs = dict(
        prompt=PROMPT, plan=PLAN, max_new_tokens=20, block_size=4, agreement_threshold=0.0, logits_processor=[suppress]
    )
    fast = model.generate(**kwargs)
    with reference_step():
        reference = model.generate(**kwargs)
    assert fast.telemetry.step_path == "fast" and reference.telemetry.step_path == "reference"
    assert fast.sequences == reference.sequences
    assert not any(t in seq for seq in fast.sequences for t in (2, 7)), "suppressed tokens must never appear"
    with model.disable_sidecars():
        bare = model.generate(**kwargs)
    assert bare.sequences != fast.sequences, "open gates must change what the streams write"


def test_sampled_generation_with_rollbacks_fast_equals_reference() -> None:
    model = _model()
    kwargs = dict(
        prompt=PROMPT,
        plan=PLAN,
        max_new_tokens=12,
        block_size=4,
        agreement_threshold=1.0,
        max_retries=1,
        do_sample=True,
        top_k=20,
        temperature=1.3,
        seed=5,
    )
    fast = model.generate(**kwargs)
    with reference_step():
        reference = model.generate(**kwargs)
    assert fast.sequences == reference.sequences
    t = fast.telemetry
    assert t.rolled_back_tokens > 0 and t.rolled_back_tokens == reference.telemetry.rolled_back_tokens
    assert t.notes_read == reference.telemetry.notes_read


def test_telemetry_rates() -> None:
    model = _model()
    out = model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=8, block_size=4, agreement_threshold=1.0)
    t = out.telemetry
    assert t.committed_tokens == sum(len(s) for s in out.sequences) > 0
    assert t.decoded_tokens == t.committed_tokens + t.rolled_back_tokens and t.rolled_back_tokens > 0
    total = t.timings["total"]
    assert t.timings["decode"] == pytest.approx(total - t.timings["prefill"])
    assert t.committed_tokens_per_s == pytest.approx(t.committed_tokens / total)
    assert t.decoded_tokens_per_s == pytest.approx(t.decoded_tokens / total) and t.decoded_tokens_per_s > 0
    assert t.rollback_rate == t.rolled_back_tokens / t.decoded_tokens
    record = t.to_dict()
    assert record["committed_tokens_per_s"] == t.committed_tokens_per_s and record["step_path"] == "fast"
    line = t.summary()
    assert f"{t.committed_tokens} committed tokens" in line and f"{100 * t.rollback_rate:.0f}%" in line


@pytest.mark.integration
def test_shipped_sidecar_on_smollm2_fast_equals_reference() -> None:
    from pdt_hf.generation.cli import shipped_sidecar

    sidecar = shipped_sidecar()
    if sidecar is None:
        pytest.skip("this install ships no trained sidecar")
    model = PDTForCausalLM.from_pretrained(None, sidecar=sidecar).eval()
    kwargs = dict(prompt="Give a short guide to making coffee at home.", plan=["Beans", "Brewing", "Serving"])
    fast = model.generate(**kwargs, max_new_tokens=24)
    with reference_step():
        reference = model.generate(**kwargs, max_new_tokens=24)
    assert fast.sequences == reference.sequences
    decisions = [(c["stream"], c["round"], c["committed"]) for c in fast.telemetry.commits]
    assert decisions == [(c["stream"], c["round"], c["committed"]) for c in reference.telemetry.commits]
    scores = torch.tensor([c["score"] for c in fast.telemetry.commits])
    torch.testing.assert_close(
        scores, torch.tensor([c["score"] for c in reference.telemetry.commits]), atol=1e-4, rtol=0
    )


def test_step_profile_regions_on_a_tiny_trunk() -> None:
    from pdt_hf.evaluation.bench import Bench, BenchConfig
    from pdt_hf.evaluation.prompt_sets import EvalItem
    from pdt_hf.evaluation.step_profile import markdown, profile_step

    model = _model()
    bench = Bench(model, "untrained", BenchConfig(ks=[3], methods=["hf-batch", "pdt-no-rollback"], max_new_tokens=6))
    item = EvalItem(prompt=PROMPT, plan=PLAN)
    pdt, hf = (profile_step(bench, m, 3, item, 6) for m in ("pdt-no-rollback", "hf-batch"))
    assert pdt["steps"] == 6 and hf["steps"] == 5, "PDT times its 6 one-token forwards; HF all after the prefill"
    regions = pdt["regions"]
    assert regions["sidecar hooks (adapter + SNC)"] > 0 and "sidecar hooks (adapter + SNC)" not in hf["regions"]
    assert 0 < regions["decoder layer (trunk)"] < regions["trunk forward (T=1)"]
    assert regions["PDT token choice + stop checks"] > 0 and regions["KV cache update"] > 0
    table = markdown([hf, pdt])
    assert "| hf-batch K=3 | pdt-no-rollback K=3 |" in table.splitlines()[0]
    from pdt_hf.sidecars.model import PDTSidecar
    from pdt_hf.stream_kv import StreamKVLayer
    from pdt_hf.trunk.architectures import decoder_layers

    # The profile regions are gone afterwards: no instance override, the classes' own methods.
    assert "forward" not in vars(decoder_layers(model.trunk)[0]) and "forward" not in vars(model.trunk.lm_head)
    assert PDTSidecar.layer_delta.__name__ == "layer_delta" and StreamKVLayer.update.__name__ == "update"
