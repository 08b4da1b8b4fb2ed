"""Stream KV: bookkeeping with exact values, then the cache on tiny real trunks against fresh plain forwards.

Tolerances (fp32): a stream's logits match a fresh forward over prompt + that stream's tokens within
atol 1e-5 (different but equivalent masking / summation order); streams a step or rollback must not touch are
compared bitwise where the computation is identical, else within 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pdt_hf.stream_kv import (
    StreamKVCache,
    StreamKVFullError,
    StreamLengths,
    step_positions,
    step_visibility,
    stream_attention,
    visibility_to_mask,
    write_slots,
)
from pdt_hf.trunk.compat import cache_kwargs

ATOL = 1e-5
VOCAB = 128
K = 3
PROMPT_LEN = 6

# Tiny trunks: 2 layers, hidden 64, 4 heads, 2 kv heads (GQA), vocab 128. The full-size models they stand for:
# SmolLM2-135M (Llama): hidden 576, 30 layers, 9 heads, 3 kv heads, vocab 49152;
# Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 kv heads, vocab 151936.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
CASES = [(arch, impl) for arch in ARCHS for impl in ("sdpa", "eager")]


@pytest.fixture(params=CASES, ids=[f"{a}-{i}" for a, i in CASES])
def trunk(request) -> torch.nn.Module:
    arch, impl = request.param
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, attn_implementation=impl)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def new_cache(trunk, prompt, capacity: int = 24, horizon: int | None = 8) -> StreamKVCache:
    prefix = DynamicCache(config=trunk.config)
    with torch.no_grad():
        trunk(prompt, **cache_kwargs(prefix))
    return StreamKVCache.from_prefix(prefix, num_streams=K, suffix_capacity=capacity, commit_horizon=horizon)


def run_step(trunk, cache: StreamKVCache, streams: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """One batched forward of ``tokens`` [A, T] for ``streams``; returns logits [A, T, V]."""
    with torch.no_grad(), cache.step(torch.tensor(streams), tokens.shape[1]) as kwargs:
        return trunk(tokens, **cache_kwargs(cache), **kwargs).logits


def fresh_logits(trunk, prompt: torch.Tensor, tokens: list[int], last: int) -> torch.Tensor:
    """Plain forward over prompt + tokens, no cache: logits of the last ``last`` positions [last, V]."""
    with torch.no_grad():
        ids = torch.cat([prompt, torch.tensor([tokens], dtype=torch.long)], dim=1)
        return trunk(ids).logits[0, -last:]


class Streams:
    """Drives a StreamKVCache and keeps each stream's tokens, checking every step against a fresh forward."""

    def __init__(self, trunk, prompt, cache, seed: int = 2) -> None:
        self.trunk, self.prompt, self.cache = trunk, prompt, cache
        self.tokens: list[list[int]] = [[] for _ in range(K)]
        self.gen = torch.Generator().manual_seed(seed)

    def step(self, streams: list[int], num_tokens: int = 1, check: bool = True) -> torch.Tensor:
        new = torch.randint(0, VOCAB, (len(streams), num_tokens), generator=self.gen)
        logits = run_step(self.trunk, self.cache, streams, new)
        for row, k in enumerate(streams):
            self.tokens[k] += new[row].tolist()
            if check:
                expected = fresh_logits(self.trunk, self.prompt, self.tokens[k], num_tokens)
                torch.testing.assert_close(logits[row], expected, atol=ATOL, rtol=0)
        return logits

    def rollback(self, k: int, n: int) -> None:
        self.cache.rollback(k, n)
        if n:
            del self.tokens[k][-n:]


# ---------------------------------------------------------------------- bookkeeping, exact values
def test_docstring_step_example() -> None:
    lengths = torch.tensor([3, 1])
    assert write_slots(lengths, 2).tolist() == [[3, 4], [1, 2]]
    assert step_positions(4, lengths, 2).tolist() == [[7, 8], [5, 6]]
    visible = step_visibility(4, lengths, 2, suffix_width=5)
    assert visible.int().tolist() == [
        [[1, 1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]],
        [[1, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0]],
    ]
    mask = visibility_to_mask(visible, torch.float32)
    assert mask.shape == (2, 1, 2, 9) and mask[0, 0, 0, 8] == torch.finfo(torch.float32).min and mask[0, 0, 0, 7] == 0
    assert visibility_to_mask(visible, torch.bool).dtype == torch.bool


def test_stream_lengths_plan_advance_rollback() -> None:
    book = StreamLengths(num_streams=3, prefix_len=4, capacity=6, commit_horizon=3)
    step = book.plan(torch.tensor([2, 0]), 2, torch.device("cpu"))
    assert (step.slots.tolist(), step.positions.tolist(), step.suffix_width) == ([[0, 1], [0, 1]], [[4, 5], [4, 5]], 2)
    assert not step.all_streams and book.lengths.tolist() == [0, 0, 0]  # planning changes nothing
    book.advance(step)
    assert book.lengths.tolist() == [2, 0, 2]
    step = book.plan(torch.tensor([0, 1, 2]), 3, torch.device("cpu"))
    assert step.all_streams and step.positions.tolist() == [[6, 7, 8], [4, 5, 6], [6, 7, 8]]
    assert step.suffix_width == 5
    book.advance(step)
    book.rollback(0, 3)
    book.rollback(1, 0)
    assert book.lengths.tolist() == [2, 3, 5]
    assert book.plan(torch.tensor([0]), 1, torch.device("cpu")).positions.tolist() == [[6]]
    with pytest.raises(ValueError, match="holds only 2"):
        book.rollback(0, 3)
    with pytest.raises(ValueError, match="commit_horizon"):
        book.rollback(2, 4)
    with pytest.raises(StreamKVFullError, match="suffix_capacity=6"):
        book.plan(torch.tensor([1, 2]), 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="duplicates"):
        book.plan(torch.tensor([1, 1]), 1, torch.device("cpu"))
    assert book.lengths.tolist() == [2, 3, 5]


# ---------------------------------------------------------------------- tiny real trunks
def test_streams_match_fresh_forward(trunk, prompt) -> None:
    driver = Streams(trunk, prompt, new_cache(trunk, prompt))
    driver.step([0, 1, 2], num_tokens=3)  # each stream's own plan item
    for _ in range(3):
        driver.step([0, 1, 2])
    driver.step([1, 2], num_tokens=2)
    driver.step([2, 0, 1])  # batch order need not follow stream order
    assert driver.cache.lengths.tolist() == [7, 9, 9]
    assert driver.cache.get_seq_length() == PROMPT_LEN + 9


def test_rollback_matches_fresh_forward_and_spares_siblings(trunk, prompt) -> None:
    rolled = Streams(trunk, prompt, new_cache(trunk, prompt))
    kept = Streams(trunk, prompt, new_cache(trunk, prompt))
    for driver in (rolled, kept):
        driver.step([0, 1, 2], num_tokens=4)
        driver.step([0, 1, 2], num_tokens=1)
        driver.step([0, 2], num_tokens=2)
    assert rolled.tokens == kept.tokens and rolled.cache.lengths.tolist() == [7, 5, 7]
    rolled.rollback(0, 3)
    rolled.rollback(2, 6)
    assert rolled.cache.lengths.tolist() == [4, 5, 1]
    kw = rolled.cache.begin_step(torch.tensor([0, 1, 2]), 1)
    assert kw["position_ids"].tolist() == [[PROMPT_LEN + 4], [PROMPT_LEN + 5], [PROMPT_LEN + 1]]
    rolled.cache.cancel_step()
    # Stream 1 was not rolled back: stepping it alone gives bitwise the same logits in both caches.
    assert torch.equal(rolled.step([1], check=False), kept.step([1], check=False))
    # Stepping all streams: rolled-back streams match a fresh forward over their kept tokens.
    after = rolled.step([0, 1, 2])
    before = kept.step([0, 1, 2], check=False)
    torch.testing.assert_close(after[1], before[1], atol=1e-6, rtol=0)
    for _ in range(3):  # positions stay right as decoding continues
        rolled.step([0, 1, 2])
    rolled.rollback(1, 2)
    rolled.step([1, 0], num_tokens=2)
    assert rolled.cache.lengths.tolist() == [10, 10, 5]


def test_subset_step_leaves_other_streams_alone(trunk, prompt) -> None:
    stepped = Streams(trunk, prompt, new_cache(trunk, prompt), seed=3)
    idle = Streams(trunk, prompt, new_cache(trunk, prompt), seed=3)
    for driver in (stepped, idle):
        driver.step([0, 1, 2], num_tokens=2)
    stepped.step([2, 0])
    stepped.step([0], num_tokens=3)
    assert stepped.cache.lengths.tolist() == [6, 2, 3]
    stream1 = torch.tensor([[5]])
    assert torch.equal(run_step(trunk, stepped.cache, [1], stream1), run_step(trunk, idle.cache, [1], stream1))
    assert stepped.cache.lengths.tolist() == [6, 3, 3] and idle.cache.lengths.tolist() == [2, 3, 2]


def test_rollback_allocates_nothing(trunk, prompt) -> None:
    driver = Streams(trunk, prompt, new_cache(trunk, prompt))
    driver.step([0, 1, 2], num_tokens=4)
    layers = driver.cache.layers
    storage = [t for layer in layers for t in (layer.prefix_keys, layer.prefix_values, layer.suffix_keys,
                                                layer.suffix_values)]  # fmt: skip
    pointers = [t.data_ptr() for t in storage]
    contents = [t.clone() for t in storage]
    driver.rollback(0, 2)
    driver.rollback(2, 4)
    assert [t.data_ptr() for t in storage] == pointers
    assert all(torch.equal(a, b) for a, b in zip(contents, storage))  # rollback wrote nothing
    driver.step([0, 2])
    layers_after = driver.cache.layers
    assert [t.data_ptr() for layer in layers_after for t in (layer.suffix_keys, layer.suffix_values)] == [
        t.data_ptr() for layer in layers for t in (layer.suffix_keys, layer.suffix_values)
    ]
    assert [t.data_ptr() for t in storage] == pointers


def test_errors(trunk, prompt) -> None:
    cache = new_cache(trunk, prompt, capacity=6, horizon=3)
    driver = Streams(trunk, prompt, cache)
    driver.step([0, 1], num_tokens=4)
    with pytest.raises(ValueError, match="holds only 0"):
        cache.rollback(2, 1)
    with pytest.raises(ValueError, match="commit_horizon"):
        cache.rollback(0, 4)
    with pytest.raises(StreamKVFullError, match="suffix_capacity=6"):
        cache.begin_step(torch.tensor([2, 1]), 3)
    assert cache.current_step is None and cache.lengths.tolist() == [4, 4, 0]
    driver.step([0, 1], num_tokens=2)  # exactly fills streams 0 and 1
    with pytest.raises(StreamKVFullError):
        cache.begin_step(torch.tensor([0]), 1)
    with pytest.raises(RuntimeError, match="begin_step"):
        with torch.no_grad():
            trunk(torch.tensor([[1]]), **cache_kwargs(cache), position_ids=torch.tensor([[PROMPT_LEN]]))
    cache.begin_step(torch.tensor([2]), 1)
    with pytest.raises(RuntimeError, match="step is open"):
        cache.rollback(0, 1)
    cache.cancel_step()
    assert cache.lengths.tolist() == [6, 6, 0]


def test_sliding_window_prefix_is_rejected() -> None:
    config = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    config.layer_types = ["sliding_attention"] * 2
    model = Qwen2ForCausalLM(config).eval()
    prefix = DynamicCache(config=config)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), **cache_kwargs(prefix))
    with pytest.raises(ValueError, match="full-attention"):
        StreamKVCache.from_prefix(prefix, K, 8)


# ---------------------------------------------------------------------- fast path
def test_fast_path_equals_simple_path(trunk, prompt, monkeypatch) -> None:
    pdt_kernels = pytest.importorskip("pdt_kernels", reason="the pdt_kernels package is not importable")
    calls = []
    kernel = pdt_kernels.ragged_decode_attention

    def counting_kernel(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(pdt_kernels, "ragged_decode_attention", counting_kernel)
    simple = Streams(trunk, prompt, new_cache(trunk, prompt), seed=4)
    fast = Streams(trunk, prompt, new_cache(trunk, prompt), seed=4)
    previous = trunk.config._attn_implementation
    schedule = [([0, 1, 2], 3), ([0, 1, 2], 1), ([2, 0], 1), ([0, 1, 2], 2), ([1], 1), ([0, 1, 2], 1)]
    for streams, tokens in schedule:
        expected = simple.step(streams, tokens, check=False)
        with stream_attention(trunk, fast.cache):
            got = fast.step(streams, tokens)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert len(calls) == 4 * trunk.config.num_hidden_layers  # the 4 single-token steps, every layer
    assert [c[0] for c in calls[::2]] == [3, 2, 1, 3]
    for driver in (simple, fast):
        driver.rollback(0, 2)
        driver.rollback(1, 1)
    with stream_attention(trunk, fast.cache):
        for _ in range(2):
            torch.testing.assert_close(fast.step([0, 1, 2]), simple.step([0, 1, 2]), atol=ATOL, rtol=0)
        assert trunk.config._attn_implementation != previous
    assert trunk.config._attn_implementation == previous and not fast.cache.ragged_decode


def test_fast_path_restores_implementation_on_error(trunk, prompt) -> None:
    pytest.importorskip("pdt_kernels", reason="the pdt_kernels package is not importable")
    cache = new_cache(trunk, prompt)
    previous = trunk.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with stream_attention(trunk, cache):
            with torch.no_grad():  # a plain prefill inside the context goes to the previous implementation
                inside = trunk(prompt).logits
            raise RuntimeError("boom")
    assert trunk.config._attn_implementation == previous and not cache.ragged_decode
    with torch.no_grad():
        torch.testing.assert_close(inside, trunk(prompt).logits, atol=ATOL, rtol=0)


_INTERPRETER_SCRIPT = """
import torch
import pdt_kernels
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from pdt_hf.stream_kv import StreamKVCache, stream_attention
from pdt_hf.trunk.compat import cache_kwargs

kernel, backends = pdt_kernels.ragged_decode_attention, []
def counting(*args, **kwargs):
    backends.append(pdt_kernels.current_backend())
    return kernel(*args, **kwargs)
pdt_kernels.ragged_decode_attention = counting
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
model = LlamaForCausalLM(config).eval()
prompt = torch.randint(0, 128, (1, 7))
def new_cache():
    prefix = DynamicCache(config=config)
    with torch.no_grad():
        model(prompt, **cache_kwargs(prefix))
    return StreamKVCache.from_prefix(prefix, 3, 16)
simple, fast = new_cache(), new_cache()
gen, worst = torch.Generator().manual_seed(0), 0.0
with torch.no_grad():
    for streams, tokens in [([0, 1, 2], 3), ([0, 1, 2], 1), ([2, 0], 1), ([0, 1, 2], 1)]:
        ids = torch.randint(0, 128, (len(streams), tokens), generator=gen)
        with simple.step(torch.tensor(streams), tokens) as kw:
            expected = model(ids, **cache_kwargs(simple), **kw).logits
        with stream_attention(model, fast), fast.step(torch.tensor(streams), tokens) as kw:
            got = model(ids, **cache_kwargs(fast), **kw).logits
        worst = max(worst, (got - expected).abs().max().item())
print(worst, ",".join(backends))
"""


@pytest.mark.slow
def test_fast_path_triton_kernel_in_interpreter_matches_simple_path() -> None:
    """The Triton cascade kernel itself (run by Triton's CPU interpreter) on the fast path, against the simple path."""
    pytest.importorskip("triton", reason="Triton is not installed")
    pytest.importorskip("pdt_kernels", reason="the pdt_kernels package is not importable")
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "PDT_KERNELS": "triton"}
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    worst, backends = run.stdout.split()
    assert float(worst) <= ATOL
    assert backends.split(",") == ["triton"] * 6  # 3 single-token steps x 2 layers went through the kernel
