"""Speculative decoding inside the streams: drafts, batched verification, rollback of rejected drafts, errors.

Tiny trunks (2 layers, hidden 64; SmolLM2-135M: 30 layers, hidden 576) with open sidecar gates, so adapters and
SNC shape the logits and a verify forward that read the wrong notes or positions would change tokens. Greedy
output with drafts must equal the output without them; the sampling rule is checked by exact arithmetic.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk
from test_decode_fast_path import _model
from transformers import DynamicCache, RepetitionPenaltyLogitsProcessor, SuppressTokensLogitsProcessor
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.cli import main
from pdt_hf.generation.prompts import render_ids, stream_message
from pdt_hf.generation.sampling import accept_draft, residual_scores
from pdt_hf.generation.speculate import DraftModel, prompt_lookup
from pdt_hf.generation.step import reference_step
from pdt_hf.stream_kv import StreamKVCache
from pdt_hf.trunk.compat import cache_kwargs

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]


class Oracle:
    """Drafts the given continuation of each stream (then ``junk``): every draft token is right until it ends.

    Records each proposal as ``(stream, tokens written so far, draft)``.
    """

    def __init__(self, prompts: list[list[int]], continuations: list[list[int]], junk: int = 5) -> None:
        self.prompts, self.continuations, self.junk = prompts, continuations, junk
        self.proposals: list[tuple[int, int, list[int]]] = []

    def propose(self, stream: int, history: list[int], max_tokens: int) -> list[int]:
        written = len(history) - len(self.prompts[stream])
        draft = (self.continuations[stream][written:] + [self.junk] * max_tokens)[:max_tokens]
        self.proposals.append((stream, written, draft))
        return draft


def _stream_prompts(tok, plan: list[str], prompt: str = PROMPT) -> list[list[int]]:
    return [render_ids(tok, stream_message(prompt, plan, item)) for item in plan]


def _same_decisions(a, b) -> None:
    assert a.sequences == b.sequences
    assert a.finish_reasons == b.finish_reasons
    ta, tb = a.telemetry, b.telemetry
    assert [(c["stream"], c["round"], c["tokens"], c["committed"]) for c in ta.commits] == [
        (c["stream"], c["round"], c["tokens"], c["committed"]) for c in tb.commits
    ]
    # The heads read the kept tokens' hidden states: same blocks, same scores (a T-token forward's float noise).
    torch.testing.assert_close(
        torch.tensor([c["score"] for c in ta.commits]),
        torch.tensor([c["score"] for c in tb.commits]),
        atol=1e-4,
        rtol=0,
    )
    assert ta.notes_read == tb.notes_read and ta.decoded_tokens == tb.decoded_tokens
    assert ta.rolled_back_tokens == tb.rolled_back_tokens


# ---------------------------------------------------------------------- proposers
def test_prompt_lookup_equals_transformers_candidate_generator() -> None:
    hf = PromptLookupCandidateGenerator(num_output_tokens=4, max_matching_ngram_size=2, max_length=10_000)
    gen = torch.Generator().manual_seed(0)
    found = 0
    for _ in range(200):
        history = torch.randint(0, 6, (int(torch.randint(2, 30, (1,), generator=gen)),), generator=gen).tolist()
        candidates, _ = hf.get_candidates(torch.tensor([history]))
        expected = candidates[0, len(history) :].tolist()
        assert prompt_lookup(history, 4) == expected, history
        found += bool(expected)
    assert found > 50, "the random histories must exercise matches"
    assert prompt_lookup([5, 6, 7, 5, 6], 2) == [7, 5] and prompt_lookup([1, 2, 3], 3) == []


# ---------------------------------------------------------------------- greedy equality, tiny trunks
@pytest.mark.parametrize(
    "arch, options",
    [
        ("llama", {}),
        ("llama", {"use_notes": False}),
        ("llama", {"agreement_threshold": 1.0, "max_retries": 1}),  # every block rolled back once
        ("mistral", {"note_lag": 0, "block_size": 5}),  # sliding window 16 < the prompts
        ("qwen2", {"fast_attention": True}),  # cascade attention (its PyTorch reference on CPU) for 1-token steps
    ],
    ids=["notes", "no-notes", "rollbacks", "sliding-window", "cascade"],
)
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_drafts_equals_greedy_without(arch: str, options: dict, k: int) -> None:
    model = _model(arch)
    kwargs = dict(prompt=PROMPT, plan=PLAN[:k], num_streams=k, max_new_tokens=26, **options)
    kwargs.setdefault("block_size", 8)
    kwargs.setdefault("agreement_threshold", 0.0)
    plain = model.generate(**kwargs)
    forwards = plain.telemetry.forwards
    assert plain.telemetry.tokens_per_forward == 1.0 and plain.telemetry.draft_tokens == 0
    for n in (1, 3, 7, 12):  # 12 > B: drafts stop at the block boundary
        out = model.generate(**kwargs, speculate="prompt-lookup", num_speculative_tokens=n)
        _same_decisions(plain, out)
        t = out.telemetry
        assert t.speculate == "prompt-lookup" and t.num_speculative_tokens == n
        assert 0 < t.accepted_draft_tokens <= t.draft_tokens, "the test must exercise accepted and proposed drafts"
        if k == 1:  # one forward per kept token, minus one per accepted draft
            assert t.forwards == forwards - t.accepted_draft_tokens
        assert t.forwards < forwards
        assert t.tokens_per_forward == t.decoded_tokens / t.stream_forwards > 1.0
    with model.disable_sidecars():
        assert model.generate(**kwargs).sequences != plain.sequences, "open gates must change what streams write"


def test_reference_step_and_history_processors_keep_greedy_equality() -> None:
    model = _model("qwen2")
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=20, block_size=6, agreement_threshold=0.0)
    plain = model.generate(**kwargs)
    with reference_step():
        out = model.generate(**kwargs, speculate="prompt-lookup", num_speculative_tokens=4)
    assert out.telemetry.step_path == "reference" and out.telemetry.accepted_draft_tokens > 0
    _same_decisions(plain, out)
    # A processor that reads the history (not row-wise): verification must apply it with each position's history.
    # It stops the repeats prompt lookup feeds on, so the drafts are the answer with every 5th token wrong.
    penalty = dict(logits_processor=[RepetitionPenaltyLogitsProcessor(1.5)])
    plain = model.generate(**kwargs, **penalty)
    wrong = [[t if i % 5 else (t + 1) % 128 for i, t in enumerate(s)] for s in plain.sequences]
    out = model.generate(**kwargs, **penalty, speculate=Oracle(_stream_prompts(model.tokenizer, PLAN), wrong))
    assert 0 < out.telemetry.accepted_draft_tokens < out.telemetry.draft_tokens
    _same_decisions(plain, out)


def test_eos_inside_an_accepted_draft_while_other_streams_continue() -> None:
    model = _model("llama")
    tok = model.tokenizer
    suppress = [SuppressTokensLogitsProcessor([2])]  # the tokenizer's EOS: streams end only at the EOS chosen here
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=24, block_size=8, agreement_threshold=0.0)
    kwargs["logits_processor"] = suppress
    free = model.generate(**kwargs).sequences
    # EOS becomes a token stream 1 first writes after position 2, inside a draft's span (not at a block's first
    # or last position), and streams 0 and 2 never write.
    eos = next(t for t in free[1][3:] if t not in free[0] + free[2] and free[1].index(t) % 8 not in (0, 7))
    model.trunk.generation_config.eos_token_id = eos
    plain = model.generate(**kwargs)
    assert plain.finish_reasons[1] == "eos" and plain.sequences[1][-1] == eos and len(plain.sequences[1]) < 24
    assert plain.finish_reasons[0] == plain.finish_reasons[2] == "length"
    for continuations in (plain.sequences, free):  # all drafts right / right only up to the EOS position
        oracle = Oracle(_stream_prompts(tok, PLAN), [list(s) for s in continuations])
        out = model.generate(**kwargs, speculate=oracle, num_speculative_tokens=7)
        _same_decisions(plain, out)
        end = len(plain.sequences[1])
        holding = [(w, d) for s, w, d in oracle.proposals if s == 1 and w < end <= w + len(d)]
        assert holding and holding[-1][1][end - 1 - holding[-1][0]] == eos, "a draft must carry the EOS"
        # Exact acceptance: each draft is kept up to its first wrong token, or up to a stop (EOS or budget).
        expected = 0
        for stream, written, draft in oracle.proposals:
            target = plain.sequences[stream][written:]
            for token, right in zip(draft, target):
                if token != right:
                    break
                expected += 1
        assert out.telemetry.accepted_draft_tokens == expected < out.telemetry.draft_tokens
        if continuations is plain.sequences:
            assert 0 < out.telemetry.draft_tokens - expected <= 7, "only the junk after the EOS is refused"


# ---------------------------------------------------------------------- stream cache rollback of rejected drafts
@pytest.mark.parametrize("static", [False, True], ids=["shared-prefix", "static"])
def test_rejected_drafts_roll_back_to_a_cache_that_never_held_them(static: bool) -> None:
    trunk = tiny_trunk("llama")
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(4, 128, (1, 9), generator=gen)

    def fresh_cache() -> StreamKVCache:
        prefix = DynamicCache()
        with torch.no_grad():
            trunk(prompt, **cache_kwargs(prefix))
        return StreamKVCache.from_prefix(prefix, 3, 24, commit_horizon=8, static=static)

    def step(cache: StreamKVCache, streams: list[int], ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), cache.step(torch.tensor(streams), ids.shape[1]) as kw:
            return trunk(ids, **cache_kwargs(cache), **kw).logits

    spec, clean = fresh_cache(), fresh_cache()
    start = torch.randint(4, 128, (3, 2), generator=gen)
    step(spec, [0, 1, 2], start)
    step(clean, [0, 1, 2], start)
    chunk = torch.randint(4, 128, (3, 5), generator=gen)  # [A, T]: chosen token + 4 drafts (or padding)
    kept = [3, 1, 5]  # stream 0 keeps 2 drafts, stream 1 none, stream 2 all
    step(spec, [0, 1, 2], chunk)
    for k, n in enumerate(kept):
        spec.rollback(k, 5 - n)
        for t in range(n):  # the cache that only ever saw the kept tokens, written one at a time
            step(clean, [k], chunk[k : k + 1, t : t + 1])
    assert spec.lengths.tolist() == clean.lengths.tolist() == [2 + n for n in kept]
    new = torch.randint(4, 128, (3, 1), generator=gen)
    got, expected = step(spec, [0, 1, 2], new), step(clean, [0, 1, 2], new)
    for k, n in enumerate(kept):
        tokens = torch.cat([prompt[0], start[k], chunk[k, :n], new[k]])[None]
        with torch.no_grad():
            full = trunk(tokens).logits[0, -1]
        torch.testing.assert_close(got[k, -1], full, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[k, -1], expected[k, -1], atol=1e-5, rtol=0)
    stale = step(spec, [1], chunk[1:2, 1:2])  # stream 1's rejected slot is overwritten, not appended after
    with torch.no_grad():
        full = trunk(torch.cat([prompt[0], start[1], chunk[1, :1], new[1], chunk[1, 1:2]])[None]).logits[0, -1]
    torch.testing.assert_close(stale[0, -1], full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- sampling
def test_point_mass_acceptance_rule_keeps_the_distribution_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        scores = torch.randn(7, generator=gen, dtype=torch.float64) * 2
        if trial % 4 == 0:
            scores[torch.randperm(7, generator=gen)[:3]] = float("-inf")  # top-k style zeros
        p = torch.softmax(scores, dim=-1)
        for t in range(7):
            before = scores.clone()
            residual = torch.softmax(residual_scores(scores, t), dim=-1)
            assert residual[t] == 0 and torch.equal(scores, before), "residual_scores returns a copy"
            # P(accept) = |{u in [0, 1): accept_draft(p, t, u)}| = p(t): the rule's threshold is exactly p(t).
            assert not accept_draft(p, t, p[t])
            if p[t] > 0:
                assert accept_draft(p, t, torch.nextafter(p[t], torch.tensor(0.0, dtype=p.dtype)))
            assert accept_draft(p, t, 0.0) == bool(p[t] > 0), "a zero-probability draft is never accepted"
            # Accept with p(t), else draw from the residual: token x comes out with probability p(x).
            out = p[t] * torch.nn.functional.one_hot(torch.tensor(t), 7) + (1 - p[t]) * residual
            torch.testing.assert_close(out, p, atol=1e-12, rtol=0)


def test_sampling_with_drafts() -> None:
    model = _model("llama")
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=20, block_size=8, agreement_threshold=0.0)
    greedy = model.generate(**kwargs)
    # top_k = 1 makes p a point mass: accept iff the draft is the argmax, and the residual draw is the argmax.
    out = model.generate(
        **kwargs, do_sample=True, top_k=1, seed=3, speculate="prompt-lookup", num_speculative_tokens=4
    )
    assert out.sequences == greedy.sequences and out.telemetry.accepted_draft_tokens > 0
    assert out.telemetry.accepted_draft_tokens < out.telemetry.draft_tokens, "rejections must be exercised"
    sampled = dict(do_sample=True, temperature=0.7, top_k=8, seed=5, speculate="prompt-lookup")
    first, again = model.generate(**kwargs, **sampled), model.generate(**kwargs, **sampled)
    assert first.sequences == again.sequences, "seeded sampling with drafts is reproducible"
    suppressed = model.generate(**kwargs, **sampled, logits_processor=[SuppressTokensLogitsProcessor([2, 7])])
    assert not any(t in s for s in suppressed.sequences for t in (2, 7)), "residual draws keep the processors"


class Recorder:
    """Wraps a proposer and records ``(stream, tokens written so far, draft)`` per proposal."""

    def __init__(self, inner, prompts: list[list[int]]) -> None:
        self.inner, self.prompts, self.proposals = inner, prompts, []

    def propose(self, stream: int, history: list[int], max_tokens: int) -> list[int]:
        draft = self.inner.propose(stream, history, max_tokens)
        self.proposals.append((stream, len(history) - len(self.prompts[stream]), draft))
        return draft


def test_a_rejected_sampled_draft_is_replaced_by_a_residual_draw() -> None:
    # The draft is the bare trunk's argmax, which the identity sidecar's p ranks first, so it is accepted with
    # probability p_max; once rejected, the residual (p without it) never gives it back at that position. So the
    # output agrees with a draft exactly as far as verification accepted it: a draw from p instead of the
    # residual would repeat the rejected token with probability p_max and the two counts would part.
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3)).eval()
    model.tokenizer = tiny_tokenizer()
    rejected = 0
    for seed in range(4):
        recorder = Recorder(DraftModel(tiny_trunk("llama")), _stream_prompts(model.tokenizer, PLAN))
        out = model.generate(
            prompt=PROMPT,
            plan=PLAN,
            max_new_tokens=24,
            agreement_threshold=0.0,
            do_sample=True,
            top_k=2,
            seed=seed,
            speculate=recorder,
            num_speculative_tokens=3,
        )
        agreeing = 0
        for stream, written, draft in recorder.proposals:
            sequence = out.sequences[stream]
            kept = 0
            while kept < len(draft) and written + kept < len(sequence) and sequence[written + kept] == draft[kept]:
                kept += 1
            agreeing += kept
            rejected += kept < len(draft) and written + kept < len(sequence)
        assert out.telemetry.accepted_draft_tokens == agreeing, seed
    assert rejected >= 20, "the test must see rejections"


# ---------------------------------------------------------------------- draft model, custom_generate, CLI, bench
def test_draft_model_with_an_identity_sidecar_is_always_accepted() -> None:
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3)).eval()
    model.tokenizer = tiny_tokenizer()
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=20, block_size=8, agreement_threshold=0.0)
    plain = model.generate(**kwargs)
    # A separate copy of the bare trunk drafts exactly what the identity sidecar decodes.
    out = model.generate(**kwargs, speculate="draft", draft_model=tiny_trunk("llama"), num_speculative_tokens=3)
    assert out.sequences == plain.sequences
    t = out.telemetry
    assert t.accepted_draft_tokens == t.draft_tokens > 0 and t.forwards < plain.telemetry.forwards
    other = model.generate(**kwargs, speculate="draft", draft_model=tiny_trunk("llama", seed=7))
    assert other.sequences == plain.sequences and other.telemetry.accepted_draft_tokens < other.telemetry.draft_tokens


def test_custom_generate_takes_prompt_lookup_num_tokens() -> None:
    from pdt_hf.generation import custom_generate

    model = _model("llama")
    tok = model.tokenizer
    ids = tok(PROMPT, return_tensors="pt").input_ids
    common = dict(custom_generate=custom_generate, num_streams=3, plan=PLAN, tokenizer=tok, max_new_tokens=12)
    plain = model.trunk.generate(ids, **common)
    out = model.trunk.generate(ids, **common, prompt_lookup_num_tokens=3)
    assert out.telemetry.speculate == "prompt-lookup" and out.telemetry.num_speculative_tokens == 3
    assert out.sequences == plain.sequences


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"speculate": "ngram"}, "unknown speculate='ngram'; use 'prompt-lookup'"),
        ({"speculate": "prompt-lookup", "num_speculative_tokens": 0}, "positive integer (draft tokens per stream"),
        ({"speculate": "prompt-lookup", "num_speculative_tokens": -2}, "got -2"),
        ({"num_speculative_tokens": 3}, "num_speculative_tokens=3 needs speculative decoding on"),
        ({"speculate": "draft"}, "speculate='draft' needs draft_model="),
        ({"speculate": 7}, "speculate=7 is neither one of ['prompt-lookup', 'draft']"),
    ],
)
def test_bad_speculative_arguments_name_the_value_and_the_fix(kwargs: dict, message: str) -> None:
    model = _model("llama")
    with pytest.raises(ValueError) as err:
        model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=4, **kwargs)
    assert message in str(err.value)


def test_draft_models_that_cannot_draft_are_refused() -> None:
    model = _model("llama")
    kwargs = dict(prompt=PROMPT, plan=PLAN, max_new_tokens=4, speculate="draft")
    with pytest.raises(ValueError, match="vocabulary of 256 tokens but the trunk has 128"):
        model.generate(**kwargs, draft_model=tiny_trunk("llama", vocab_size=256))
    with pytest.raises(ValueError, match="draft_model is the trunk itself"):
        model.generate(**kwargs, draft_model=model.trunk)
    with pytest.raises(ValueError, match="only used with speculate='draft'"):
        model.generate(prompt=PROMPT, plan=PLAN, speculate="prompt-lookup", draft_model=tiny_trunk("llama"))


def test_pdt_generate_speculate_flag(tmp_path, capsys) -> None:
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.save_pretrained(tmp_path / "trunk")
    tiny_tokenizer().save_pretrained(tmp_path / "trunk")
    base = ["generate", "Explain tea.", "--model", str(tmp_path / "trunk"), "--plan", "a; b; c"]
    base += ["--max-new-tokens", "12"]
    runs = {}
    for name, extra in (("plain", []), ("spec", ["--speculate", "prompt-lookup", "--num-speculative-tokens", "3"])):
        assert main([*base, *extra, "--json", str(tmp_path / f"{name}.json")]) == 0
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps lines
    assert "speculative decoding: prompt-lookup, up to 3 draft tokens per stream and forward" in printed
    assert "prompt-lookup drafts:" in printed and "tokens per stream forward" in printed
    assert runs["spec"]["sequences"] == runs["plain"]["sequences"]
    t, plain = runs["spec"]["telemetry"], runs["plain"]["telemetry"]
    assert t["speculate"] == "prompt-lookup" and t["num_speculative_tokens"] == 3 and plain["speculate"] is None
    assert t["tokens_per_forward"] == t["decoded_tokens"] / t["stream_forwards"] and plain["tokens_per_forward"] == 1.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--speculate", "ngram"], "argument --speculate: invalid choice: 'ngram' (choose from 'prompt-lookup'"),
        (["--num-speculative-tokens", "0"], "argument --num-speculative-tokens: must be a positive integer (1 or"),
    ],
)
def test_bad_speculative_flag_values_are_usage_errors(flags, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "Explain tea.", "--speculate", "prompt-lookup", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-speculative-tokens", "2"], "--num-speculative-tokens 2 needs speculative decoding on"),
        (["--speculate", "draft"], "--speculate draft needs --draft-model"),
        (["--draft-model", "x", "--speculate", "prompt-lookup"], "--draft-model 'x' is only used with"),
    ],
)
def test_speculative_flag_errors_before_loading(flags, message, monkeypatch, capsys) -> None:
    monkeypatch.setattr(PDTForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
    assert main(["generate", "Explain tea.", "--plan", "a; b", *flags]) == 2
    assert message in capsys.readouterr().err


def test_forward_clock_steps_of_speculative_decoding_are_the_decode_forwards() -> None:
    from pdt_hf.evaluation.timing import ForwardClock

    clock = ForwardClock(tiny_trunk("llama"))
    # prefix prefill, suffix prefill, then decode forwards of 3, 1 and 4 tokens per stream (verify forwards).
    clock.events = [[0.0, 0.2, 30.0], [0.2, 0.4, 5.0], [1.0, 1.1, 3.0], [2.0, 2.1, 1.0], [2.5, 2.6, 4.0]]
    assert clock.steps(3.0, "pdt", decode_forwards=3) == ([1.0, 0.5, 0.5], 1.0)
    assert clock.steps(3.0, "pdt") == ([1.0], 2.0), "without the count only one-token forwards are steps"
    with pytest.raises(ValueError, match="decode_forwards=6 needs kind='pdt' and at most the 5 forwards"):
        clock.steps(3.0, "pdt", decode_forwards=6)


def test_bench_pdt_speculate_records_drafts_and_forwards() -> None:
    from pdt_hf.evaluation.bench import BENCH_METHODS, Bench, BenchConfig
    from pdt_hf.evaluation.bench_report import bench_markdown, summarize_bench
    from pdt_hf.evaluation.prompt_sets import EvalItem

    assert {"prompt-lookup", "pdt-speculate", "pdt-no-rollback"} <= set(BENCH_METHODS)
    model = _model("llama")
    config = BenchConfig(ks=[3], max_new_tokens=24, repeats=1, num_speculative_tokens=3)
    bench = Bench(model, "untrained", config)
    item = EvalItem(PROMPT, PLAN)
    runs = []
    for method in ("serial", "prompt-lookup", "pdt-no-rollback", "pdt-speculate"):
        record = bench.run(method, 3, item, 24)
        runs.append({**record, "repeat": 0, "prompt": 0})
    spec, plain = runs[3], runs[2]
    assert spec["committed"] == plain["committed"] == 72, "EOS suppressed: every stream writes its 24 tokens"
    assert len(spec["steps"]) == spec["forwards"] < len(plain["steps"]) == plain["forwards"] == 24
    # Per stream and forward: a stream that finishes first leaves the later forwards, so at least 72 / (3 x forwards).
    assert 1.0 < 72 / (3 * spec["forwards"]) <= spec["tokens_per_forward"] and plain["tokens_per_forward"] == 1.0
    assert spec["acceptance_rate"] == spec["accepted_draft_tokens"] / spec["draft_tokens"] > 0
    assert runs[0]["tokens_per_forward"] == 1.0 and runs[1]["tokens_per_forward"] >= 1.0
    methods = ["serial", "prompt-lookup", "pdt-no-rollback", "pdt-speculate"]
    rows = {r["method"]: r for r in summarize_bench({"settings": {**vars(config), "methods": methods}, "runs": runs})}
    assert rows["pdt-speculate"]["acceptance_rate"]["median"] == spec["acceptance_rate"]
    assert rows["pdt-no-rollback"]["acceptance_rate"] is None
    line = next(x for x in bench_markdown(list(rows.values())).splitlines() if x.startswith("| pdt-speculate"))
    cells = f"| {spec['forwards']} | {spec['tokens_per_forward']:.2f} | {100 * spec['acceptance_rate']:.0f}% |"
    assert cells in line and rows["prompt-lookup"]["forwards"] is None and rows["serial"]["forwards"] is None


# ---------------------------------------------------------------------- the embedded SmolLM2
@pytest.mark.integration
def test_smollm2_greedy_with_drafts_equals_greedy_without() -> None:
    from pdt_hf.generation.cli import shipped_sidecar

    model = PDTForCausalLM.from_pretrained(None, sidecar=shipped_sidecar()).eval()
    plan = ["The capital of France, in one word", "Three tips for drinking water during exercise"]
    plan.append("How a bicycle works")
    kwargs = dict(prompt="Answer briefly.", plan=plan, max_new_tokens=16)
    plain = model.generate(**kwargs)
    assert "eos" in plain.finish_reasons and "length" in plain.finish_reasons, "a stream must end before the others"
    out = model.generate(**kwargs, speculate="prompt-lookup", num_speculative_tokens=4)
    _same_decisions(plain, out)
    assert out.telemetry.accepted_draft_tokens > 0
    oracle = Oracle(_stream_prompts(model.tokenizer, plan, "Answer briefly."), [list(s) for s in plain.sequences])
    out = model.generate(**kwargs, speculate=oracle, num_speculative_tokens=7)
    _same_decisions(plain, out)
    eos = model.trunk.generation_config.eos_token_id
    ended = [k for k, r in enumerate(plain.finish_reasons) if r == "eos"]
    assert any(
        s in ended and w < len(plain.sequences[s]) <= w + len(d) and d[len(plain.sequences[s]) - 1 - w] == eos
        for s, w, d in oracle.proposals
    ), "an EOS must come inside an accepted draft"
