"""Multi-stream generate on tiny trunks: equivalence with ``generate``, rollback, notes visibility, seeds, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.generation import MultiStreamIteratorStreamer, MultiStreamStreamer, custom_generate
from pdt_hf.generation.prompts import render_ids, stream_message

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]


def _model(arch: str = "llama", **cfg) -> PDTForCausalLM:
    trunk = tiny_trunk(arch)
    trunk.generation_config.eos_token_id = 2
    trunk.generation_config.pad_token_id = 0
    model = PDTForCausalLM(trunk, PDTConfig(**{"num_streams": 3, **cfg}))
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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gpt_oss"])
def test_k1_detached_matches_generate(arch: str) -> None:
    # mistral and gpt_oss have sliding-window layers (window 16) that the 60-token prompts exceed.
    model = _model(arch)
    tok = model.tokenizer
    ids = render_ids(tok, stream_message(PROMPT, PLAN[:1], PLAN[0]))
    with model.disable_sidecars():
        expected = _hf_greedy(model.trunk, ids, 20, eos=2)
        out = model.generate(prompt=PROMPT, plan=PLAN[:1], num_streams=1, max_new_tokens=20, block_size=4)
    assert out.sequences[0] == expected


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_oss"])
def test_streams_match_generate_on_each_prompt_alone(arch: str) -> None:
    model = _model(arch)
    tok = model.tokenizer
    prompts = [render_ids(tok, stream_message(PROMPT, PLAN, item)) for item in PLAN]
    free = [_hf_greedy(model.trunk, p, 24, eos=None) for p in prompts]
    # Make one stream stop early: its 6th token becomes EOS for this test.
    eos = free[1][5]
    model.trunk.generation_config.eos_token_id = eos
    expected = [_hf_greedy(model.trunk, p, 24, eos=eos) for p in prompts]
    assert min(len(e) for e in expected) < 24, "the test needs a stream that stops early"
    out = model.generate(prompt=PROMPT, plan=PLAN, num_streams=3, max_new_tokens=24, agreement_threshold=0.0)
    assert out.sequences == expected
    assert out.telemetry.rolled_back_tokens == 0
    assert "eos" in out.finish_reasons


def test_forced_rollbacks_are_removed_regenerated_never_streamed() -> None:
    model = _model()
    events = []

    class Recorder(MultiStreamStreamer):
        def on_text(self, stream, text, round):
            events.append(("text", stream, text))

        def on_rollback(self, stream, tokens, round):
            events.append(("rollback", stream, tokens))

    out = model.generate(
        prompt=PROMPT,
        plan=PLAN,
        max_new_tokens=12,
        block_size=4,
        agreement_threshold=1.0,
        max_retries=2,
        do_sample=True,
        seed=3,
        streamer=Recorder(),
    )
    t = out.telemetry
    committed_blocks = [c for c in t.commits if c["committed"]]
    assert all(c["flagged"] for c in committed_blocks), "tau=1 can never pass: every commit is a flagged accept"
    assert len(t.rollbacks) == 2 * len(committed_blocks), "each block is retried exactly R=2 times"
    assert t.rolled_back_tokens == sum(r["tokens"] for r in t.rollbacks) > 0
    assert t.decoded_tokens == t.rolled_back_tokens + sum(len(s) for s in out.sequences)
    assert sum(1 for e in events if e[0] == "rollback") == len(t.rollbacks)
    for k in range(3):
        streamed = "".join(e[2] for e in events if e[0] == "text" and e[1] == k)
        assert streamed == model.tokenizer.decode(out.sequences[k], skip_special_tokens=True)


def test_no_stream_reads_own_or_young_notes() -> None:
    lag = 2
    model = _model(note_lag=lag)
    out = model.generate(
        prompt=PROMPT,
        plan=PLAN,
        max_new_tokens=24,
        block_size=4,
        agreement_threshold=0.0,
        note_lag=lag,
        record_reads=True,
    )
    reads = out.bus.reads
    assert reads, "the decoder must read the bus"
    seen_nonsnapshot = False
    for record in reads:
        for a, reader in enumerate(record.reader_streams.tolist()):
            for stream, rnd in record.notes_of(a):
                assert stream != reader, f"stream {reader} read its own note"
                assert rnd == 0 or rnd <= record.round - lag, f"round {record.round} read a note of round {rnd}"
                seen_nonsnapshot |= rnd > 0
    assert seen_nonsnapshot, "later rounds must see committed sibling notes"


def test_note_kv_is_projected_once_per_publish_not_per_step() -> None:
    model = _model(instrumented_layers=[0, 1])
    calls = []
    for layer in model.sidecar.snc.values():
        layer.k_proj.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    out = model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=24, block_size=4, agreement_threshold=0.0)
    committed_blocks = sum(1 for c in out.telemetry.commits if c["committed"])
    steps = len(out.telemetry.timings["steps"])
    assert steps > committed_blocks, "more decode steps than publishes, or the test proves nothing"
    # Two SNC layers; snapshot 0 (3 notes) plus one publish per round, each projected once per layer.
    assert sum(calls) == 2 * (3 + committed_blocks)
    assert len(calls) == 2 * (1 + out.bus.state().last_round)


def test_same_seed_same_output() -> None:
    model = _model()
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=16, do_sample=True, temperature=1.3, top_k=20)
    a = model.generate(**kwargs, seed=7)
    b = model.generate(**kwargs, seed=7)
    c = model.generate(**kwargs, seed=8)
    assert a.sequences == b.sequences
    assert a.sequences != c.sequences


def test_fast_attention_path_matches_simple_path() -> None:
    model = _model()
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=16, block_size=4, agreement_threshold=0.0)
    simple = model.generate(**kwargs, fast_attention=False)
    fast = model.generate(**kwargs, fast_attention=True)
    assert fast.sequences == simple.sequences
    assert model.trunk.config._attn_implementation == "sdpa", "the trunk's attention must be restored"


def test_iterator_streamer_and_custom_generate() -> None:
    model = _model()
    streamer = MultiStreamIteratorStreamer(timeout=5)
    out = model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=8, streamer=streamer, agreement_threshold=0.0)
    texts = {}
    for event in streamer:
        texts[event.stream] = texts.get(event.stream, "") + event.text
    assert [texts.get(k, "") for k in range(3)] == [
        model.tokenizer.decode(s, skip_special_tokens=True) for s in out.sequences
    ]
    ids = model.tokenizer(PROMPT, return_tensors="pt")
    via_hf = model.trunk.generate(
        **ids,
        custom_generate=custom_generate,
        num_streams=3,
        plan=PLAN,
        tokenizer=model.tokenizer,
        max_new_tokens=8,
        do_sample=False,
    )
    direct = model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=8)
    assert via_hf.sequences == direct.sequences


def test_interrupt_keeps_committed_text() -> None:
    model = _model()

    class Interrupt(MultiStreamStreamer):
        def __init__(self):
            self.calls = 0

        def on_text(self, stream, text, round):
            self.calls += 1
            if self.calls == 4:
                raise KeyboardInterrupt

    out = model.generate(
        prompt=PROMPT, plan=PLAN, max_new_tokens=40, block_size=4, agreement_threshold=0.0, streamer=Interrupt()
    )
    assert out.telemetry.interrupted
    assert 0 < sum(len(s) for s in out.sequences) < 3 * 40


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompt="   "), "the prompt is empty"),
        (dict(num_streams=0), "num_streams must be a positive integer, got 0"),
        (dict(num_streams=4), r"num_streams=4 is above the plan length \(3 items"),
        (dict(block_size=16, commit_horizon=8), r"block_size \(16\) > commit_horizon \(8\)"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (dict(max_new_tokens=600), "exceeds the trunk's context of 512 tokens"),
        (dict(plan=["a", " "]), "has an empty item"),
    ],
)
def test_bad_input(kwargs, match) -> None:
    model = _model()
    args = {"prompt": PROMPT, "plan": PLAN, "max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate(**args)
    assert model.sidecar.context is None or model.sidecar.context.notes is None
