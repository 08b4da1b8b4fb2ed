"""Kernels: Triton vs PyTorch reference vs a naive per-row loop, forward and backward, odd shapes.

Triton runs on the CPU through its interpreter (TRITON_INTERPRET=1, set below before anything imports Triton),
at tiny shapes and in fp32/fp16 (the interpreter cannot do bf16 arithmetic). Tests marked `gpu` need CUDA and
compiled Triton (run them with `TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels.py`); they add bf16 and
full shapes (D = 64/128, P = 2048).

Low precision follows flash-attention's rule: the kernel's error against an fp32 reference is at most twice
plain PyTorch's error at the same precision, plus a small absolute slack.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pdt_kernels
import pytest
import torch
from pdt_kernels import dispatch as dispatch_module
from pdt_kernels import (
    note_attention,
    note_attention_decode,
    note_attention_decode_ref,
    note_attention_ref,
    note_visibility,
    ragged_decode_attention,
    ragged_decode_attention_ref,
    sdpa_with_mask_reference,
    use_backend,
)
from pdt_kernels._triton import HAS_TRITON, INTERPRET
from pdt_kernels.ragged_decode_attention import ragged_decode_attention_triton

needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET), reason="needs Triton and TRITON_INTERPRET=1 to run kernels on the CPU"
)
LOW_PRECISION_SLACK = {torch.float16: 5e-4, torch.bfloat16: 4e-3}  # half a unit in the last place at 1.0


@pytest.fixture
def cuda():
    """The CUDA device for `gpu` tests; skips without CUDA or when Triton would only interpret."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not HAS_TRITON or INTERPRET:
        pytest.skip("needs compiled Triton: run with TRITON_INTERPRET=0")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_matches(got, low_ref, truth, name: str) -> None:
    """fp32: close to the reference. fp16/bf16: error vs the fp32 truth <= 2 x plain PyTorch's error + slack."""
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    if got.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(got, truth.to(got.dtype), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        return
    got_err = (got.float() - truth.float()).abs().max().item()
    ref_err = (low_ref.float() - truth.float()).abs().max().item()
    bound = 2 * ref_err + LOW_PRECISION_SLACK[got.dtype]
    assert got_err <= bound, f"{name}: {got.dtype} error {got_err:.3g} > 2 x PyTorch's {ref_err:.3g} + slack"


# ---------------------------------------------------------------------------------------------------------------
# Naive per-row implementations in float64: the definition the references are checked against.
# ---------------------------------------------------------------------------------------------------------------


def naive_attention_rows(queries, keys, values, scale):
    """softmax(q . k * scale) @ v for one query row over an explicit list of keys; no keys -> zeros."""
    if keys.shape[0] == 0:
        return torch.zeros(values.shape[-1], dtype=torch.float64)
    weights = torch.softmax((keys.double() @ queries.double()) * scale, dim=0)
    return weights @ values.double()


def naive_note_attention(q, k, v, q_round, kv_round, kv_valid, lag, scale):
    N, H, T, D = q.shape
    rows = []
    for n in range(N):
        for h in range(H):
            for t in range(T):
                seen = [
                    m
                    for m in range(k.shape[2])
                    if bool(kv_valid[n, m]) and int(kv_round[n, m]) <= int(q_round[n, t]) - lag
                ]
                rows.append(naive_attention_rows(q[n, h, t], k[n, h, seen], v[n, h, seen], scale))
    return torch.stack(rows).reshape(N, H, T, D)


def naive_note_decode(q, k_store, v_store, indices, offsets, scale):
    R, H, D = q.shape
    out = torch.zeros(R, H, D, dtype=torch.float64)
    for r in range(R):
        rows = indices[int(offsets[r]) : int(offsets[r + 1])].long()
        for h in range(H):
            out[r, h] = naive_attention_rows(q[r, h], k_store[rows, h], v_store[rows, h], scale)
    return out


def naive_ragged_decode(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens, scale):
    K, Hq, D = q.shape
    group = Hq // prefix_k.shape[0]
    out = torch.zeros(K, Hq, D, dtype=torch.float64)
    for s in range(K):
        length = int(suffix_lens[s])
        for h in range(Hq):
            hk = h // group
            keys = torch.cat([prefix_k[hk], suffix_k[s, hk, :length]])
            values = torch.cat([prefix_v[hk], suffix_v[s, hk, :length]])
            out[s, h] = naive_attention_rows(q[s, h], keys, values, scale)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Input builders
# ---------------------------------------------------------------------------------------------------------------


def note_inputs(N, H, T, M, D, dtype, rounds=4, valid_p=0.7):
    """Random note-attention inputs. Tokens run through rounds -1 .. rounds-2 in equal blocks and notes carry
    rounds 0 .. rounds-1, so the first block sees no note for any lag >= 0; note 0 is a valid round-0 note, so
    later blocks see at least one when lag < rounds - 1."""
    q, k, v = (torch.randn(N, H, size, D, dtype=dtype, requires_grad=True) for size in (T, M, M))
    q_round = (torch.arange(T) * rounds).div(T, rounding_mode="floor").sub(1).expand(N, T).contiguous()  # [N, T]
    kv_round = torch.randint(0, rounds, (N, M))  # [N, M]
    kv_valid = torch.rand(N, M) < valid_p  # [N, M]
    if M:
        kv_round[:, 0], kv_valid[:, 0] = 0, True
    return q, k, v, q_round, kv_round, kv_valid


def csr_inputs(counts, C, H, D, dtype, index_dtype=torch.int64):
    q = torch.randn(len(counts), H, D, dtype=dtype)
    k_store, v_store = torch.randn(C, H, D, dtype=dtype), torch.randn(C, H, D, dtype=dtype)
    counts = torch.tensor(counts, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(index_dtype)  # [R + 1]
    indices = torch.randint(0, C, (int(counts.sum()),), dtype=index_dtype)  # [nnz]
    return q, k_store, v_store, indices, offsets


def ragged_inputs(lens, Hq, Hkv, P, S_max, D, dtype):
    K = len(lens)
    q = torch.randn(K, Hq, D, dtype=dtype)
    prefix_k, prefix_v = torch.randn(Hkv, P, D, dtype=dtype), torch.randn(Hkv, P, D, dtype=dtype)
    suffix_k, suffix_v = torch.randn(K, Hkv, S_max, D, dtype=dtype), torch.randn(K, Hkv, S_max, D, dtype=dtype)
    return q, prefix_k, prefix_v, suffix_k, suffix_v, torch.tensor(lens, dtype=torch.int64)


def as_float(tensors):
    return [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in tensors]


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping and references
# ---------------------------------------------------------------------------------------------------------------


def test_note_visibility_matches_the_docstring_table():
    q_round = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]])
    kv_round = torch.tensor([[0, 1, 2, -1]])
    kv_valid = torch.tensor([[True, True, True, False]])
    visible = note_visibility(q_round, kv_round, kv_valid, lag=1)[0]
    expected_per_round = {0: [0, 0, 0, 0], 1: [1, 0, 0, 0], 2: [1, 1, 0, 0]}
    expected = torch.tensor([expected_per_round[r] for r in q_round[0].tolist()], dtype=torch.bool)
    assert torch.equal(visible, expected)
    # lag 0 reads same-round notes; planner notes tagged round -lag are visible from round 0
    assert note_visibility(q_round, kv_round, kv_valid, lag=0)[0, 0].tolist() == [True, False, False, False]
    planner = note_visibility(q_round, torch.tensor([[-2]]), torch.tensor([[True]]), lag=2)[0, :, 0]
    assert planner.all()


@pytest.mark.parametrize("N,H,T,M,D,lag", [(2, 3, 13, 11, 16, 1), (1, 2, 9, 0, 16, 1), (2, 1, 7, 5, 24, 0)])
def test_note_attention_ref_matches_naive_loop(N, H, T, M, D, lag):
    q, k, v, q_round, kv_round, kv_valid = note_inputs(N, H, T, M, D, torch.float64)
    out = note_attention_ref(q, k, v, q_round, kv_round, kv_valid, lag)
    expected = naive_note_attention(q, k, v, q_round, kv_round, kv_valid, lag, D**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    empty = ~note_visibility(q_round, kv_round, kv_valid, lag).any(-1)  # [N, T]
    assert empty.any(), "the inputs must contain tokens that see no note"
    assert torch.equal(out.detach().permute(0, 2, 1, 3)[empty], torch.zeros_like(out.permute(0, 2, 1, 3)[empty]))
    if M:
        assert (~empty).any() and out.detach().permute(0, 2, 1, 3)[~empty].abs().sum() > 0
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert torch.equal(grads[0].permute(0, 2, 1, 3)[empty], torch.zeros_like(grads[0].permute(0, 2, 1, 3)[empty]))


def test_note_attention_decode_ref_matches_naive_loop():
    q, k_store, v_store, indices, offsets = csr_inputs([3, 0, 19, 1, 0], C=29, H=3, D=16, dtype=torch.float64)
    out = note_attention_decode_ref(q, k_store, v_store, indices, offsets)
    torch.testing.assert_close(out, naive_note_decode(q, k_store, v_store, indices, offsets, 0.25), rtol=1e-10, atol=0)
    assert torch.equal(out[[1, 4]], torch.zeros(2, 3, 16, dtype=torch.float64))
    assert out[[0, 2, 3]].abs().amin(-1).gt(0).all()


@pytest.mark.parametrize(
    "lens,Hq,Hkv,P", [([3, 0, 11], 4, 2, 37), ([5], 3, 3, 0), ([0, 0], 2, 1, 0), ([12, 2], 8, 1, 5)]
)
def test_ragged_references_match_naive_loop(lens, Hq, Hkv, P):
    inputs = ragged_inputs(lens, Hq, Hkv, P, S_max=11, D=16, dtype=torch.float64)
    expected = naive_ragged_decode(*inputs, scale=0.25)
    for fn in (ragged_decode_attention_ref, sdpa_with_mask_reference):
        out = fn(*inputs)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12, msg=lambda m, fn=fn: f"{fn.__name__}: {m}")
        for s, length in enumerate(lens):
            if P == 0 and length == 0:
                assert torch.equal(out[s], torch.zeros_like(out[s])), f"{fn.__name__}: stream {s} must be exactly 0"
            else:
                assert out[s].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels vs references (CPU interpreter)
# ---------------------------------------------------------------------------------------------------------------

NOTE_SHAPES = [  # N, H, T, M, D, lag
    (2, 3, 13, 11, 16, 1),  # odd T and M, one tile each
    (1, 2, 70, 37, 32, 1),  # two query tiles
    (1, 1, 19, 70, 24, 0),  # two note tiles, D padded to 32
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", NOTE_SHAPES, ids=lambda s: "N{}H{}T{}M{}D{}lag{}".format(*s))
def test_note_attention_triton_forward_backward(shape, dtype):
    N, H, T, M, D, lag = shape
    inputs = note_inputs(N, H, T, M, D, dtype)
    q, k, v, q_round, kv_round, kv_valid = inputs
    truth_inputs = as_float(inputs)
    d_out = torch.randn(N, H, T, D, dtype=dtype)

    with use_backend("triton"):
        out = note_attention(*inputs, lag)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    with use_backend("reference"):
        low = note_attention(*inputs, lag)
        truth = note_attention(*truth_inputs, lag)
    low_grads = torch.autograd.grad(low, (q, k, v), d_out)
    truth_grads = torch.autograd.grad(truth, truth_inputs[:3], d_out.float())

    assert_matches(out, low, truth, "out")
    for name, got, ref, want in zip(("dq", "dk", "dv"), grads, low_grads, truth_grads):
        assert_matches(got, ref, want, name)
    empty = ~note_visibility(q_round, kv_round, kv_valid, lag).any(-1)  # [N, T]
    assert empty.any() and (~empty).any(), "inputs must mix tokens that see notes and tokens that see none"
    assert torch.equal(out.permute(0, 2, 1, 3)[empty], torch.zeros_like(out.permute(0, 2, 1, 3)[empty]))
    assert torch.equal(grads[0].permute(0, 2, 1, 3)[empty], torch.zeros_like(grads[0].permute(0, 2, 1, 3)[empty]))


@needs_triton
@pytest.mark.parametrize("case", ["no_notes", "all_invalid", "all_too_recent"])
def test_note_attention_triton_empty_visible_sets_are_exact_zeros(case):
    M = 0 if case == "no_notes" else 6
    q, k, v, q_round, kv_round, kv_valid = note_inputs(2, 2, 9, M, 16, torch.float32)
    if case == "all_invalid":
        kv_valid = torch.zeros_like(kv_valid)
    if case == "all_too_recent":
        kv_round = torch.full_like(kv_round, 100)
    with use_backend("triton"):
        out = note_attention(q, k, v, q_round, kv_round, kv_valid, 1)
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    assert out.shape == q.shape and dk.shape == k.shape == dv.shape
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(t, torch.zeros_like(t)), f"{name} must be exactly zero"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("counts", [[3, 0, 19, 1, 0], [5], [16, 16, 0, 7, 2, 1, 30, 4]], ids=["R5", "R1", "R8"])
def test_note_attention_decode_triton(counts, index_dtype, dtype):
    q, k_store, v_store, indices, offsets = csr_inputs(counts, C=37, H=3, D=24, dtype=dtype, index_dtype=index_dtype)
    with use_backend("triton"):
        out = note_attention_decode(q, k_store, v_store, indices, offsets)
    low = note_attention_decode_ref(q, k_store, v_store, indices, offsets)
    truth = note_attention_decode_ref(*as_float([q, k_store, v_store]), indices, offsets)
    assert_matches(out, low, truth, "out")
    empty = torch.tensor(counts) == 0
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))


@needs_triton
def test_note_attention_decode_triton_strided_store_and_no_notes():
    q, k_store, v_store, indices, offsets = csr_inputs([4, 0, 9], C=21, H=2, D=16, dtype=torch.float32)
    buffer = torch.randn(21, 5, 16)  # one layer's [C, H, D] slice of a wider buffer: heads 1..2
    buffer[:, 1:3] = k_store
    strided = buffer[:, 1:3]
    assert not strided.is_contiguous()
    with use_backend("triton"):
        out = note_attention_decode(q, strided, v_store, indices, offsets)
        none = note_attention_decode(q, k_store, v_store, indices[:0], torch.zeros_like(offsets))
    torch.testing.assert_close(out, note_attention_decode_ref(q, k_store, v_store, indices, offsets))
    assert torch.equal(none, torch.zeros_like(q))


RAGGED_CASES = [  # lens (K streams), Hq, Hkv, P, S_max
    ([3, 0, 11], 4, 2, 37, 11),
    ([7], 3, 3, 50, 9),  # K = 1, no GQA
    ([5, 1, 0, 9, 9, 2, 15, 4], 8, 2, 70, 13),  # K = 8, GQA group 4, two prefix tiles, a length past S_max
    ([4, 6], 2, 1, 0, 7),  # no prefix
    ([70, 66, 3], 2, 1, 20, 70),  # two suffix tiles
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda c: f"K{len(c[0])}Hq{c[1]}Hkv{c[2]}P{c[3]}")
def test_ragged_decode_attention_triton(case, dtype):
    lens, Hq, Hkv, P, S_max = case
    inputs = ragged_inputs(lens, Hq, Hkv, P, S_max, D=16, dtype=dtype)
    with use_backend("triton"):
        out = ragged_decode_attention(*inputs)
    low = ragged_decode_attention_ref(*inputs)
    truth = ragged_decode_attention_ref(*as_float(inputs))
    assert_matches(out, low, truth, "out")
    assert_matches(sdpa_with_mask_reference(*inputs), low, truth, "sdpa_with_mask_reference")


@needs_triton
@pytest.mark.parametrize("P,splits", [(77, 2), (77, 3), (77, 5), (300, 19)])  # 300 / 16 -> 19 tiles, 20 partials
def test_ragged_decode_attention_triton_prefix_splits_merge(P, splits):
    q, *rest, suffix_lens = ragged_inputs([3, 0, 11, 1], 4, 2, P=P, S_max=11, D=32, dtype=torch.float32)
    rest[2] = rest[2].abs() * 2  # suffix keys aligned with |q|: the last partial has the largest log-sum-exp
    inputs = (q.abs(), *rest, suffix_lens)
    out = ragged_decode_attention_triton(*inputs, block_p=16, prefix_splits=splits)
    torch.testing.assert_close(out, ragged_decode_attention_ref(*inputs), rtol=1e-4, atol=1e-5)


@needs_triton
def test_ragged_decode_attention_triton_nothing_visible_is_exact_zero():
    inputs = ragged_inputs([0, 0, 3], 4, 2, P=0, S_max=5, D=16, dtype=torch.float32)
    with use_backend("triton"):
        out = ragged_decode_attention(*inputs)
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    assert out[2].abs().amin(-1).gt(0).all()


@needs_triton
def test_online_softmax_rescales_when_later_tiles_score_higher():
    """Keys whose scores rise with position make the running max grow tile after tile (and partial after
    partial), so a kernel that forgot to rescale its accumulator by exp(m_old - m_new) would disagree."""
    rising = lambda n, lo=0.1, hi=3.0: torch.linspace(lo, hi, n)[:, None]  # noqa: E731  [n, 1]
    q = torch.randn(1, 2, 9, 16).abs()
    k = torch.randn(1, 2, 70, 16).abs() * rising(70)  # 70 notes: two note tiles
    v = torch.randn(1, 2, 70, 16)
    rounds = (torch.zeros(1, 9, dtype=torch.long), torch.full((1, 70), -5), torch.ones(1, 70, dtype=torch.bool))
    with use_backend("triton"):
        out = note_attention(q, k, v, *rounds, 1)
    torch.testing.assert_close(out, note_attention_ref(q, k, v, *rounds, 1), rtol=1e-4, atol=1e-5)

    store = torch.randn(40, 2, 16).abs() * rising(40)[:, :, None]  # [C, H, D], rows rise with the index
    indices, offsets = torch.arange(40).repeat(2), torch.tensor([0, 40, 80])  # both rows read all 40 in order
    q_rows = torch.randn(2, 2, 16).abs()
    with use_backend("triton"):
        out = note_attention_decode(q_rows, store, store, indices, offsets)
    torch.testing.assert_close(out, note_attention_decode_ref(q_rows, store, store, indices, offsets))

    q, prefix_k, prefix_v, suffix_k, suffix_v, lens = ragged_inputs([70, 66], 2, 1, P=300, S_max=70, D=16,
                                                                    dtype=torch.float32)  # fmt: skip
    prefix_k = prefix_k.abs() * rising(300)
    suffix_k = suffix_k.abs() * rising(70, 0.1, 4.0)  # two suffix tiles, the second scoring higher
    inputs = (q.abs(), prefix_k, prefix_v, suffix_k, suffix_v, lens)
    with use_backend("triton"):
        out = ragged_decode_attention(*inputs)
    torch.testing.assert_close(out, ragged_decode_attention_ref(*inputs), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch, import without Triton, input errors
# ---------------------------------------------------------------------------------------------------------------


def test_dispatch_routes_by_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch_module, "note_attention_decode_triton", lambda *a: calls.append("triton"))
    monkeypatch.setattr(dispatch_module, "note_attention_decode_ref", lambda *a: calls.append("reference"))
    monkeypatch.delenv("PDT_KERNELS", raising=False)
    args = csr_inputs([1], C=2, H=1, D=16, dtype=torch.float32)
    note_attention_decode(*args)  # auto on CPU -> reference
    with use_backend("reference"):
        note_attention_decode(*args)
    monkeypatch.setenv("PDT_KERNELS", "reference")
    note_attention_decode(*args)
    if HAS_TRITON and INTERPRET:
        with use_backend("triton"):  # the context manager wins over the environment variable
            note_attention_decode(*args)
        monkeypatch.setenv("PDT_KERNELS", "triton")
        note_attention_decode(*args)
        assert calls == ["reference"] * 3 + ["triton"] * 2
    else:
        assert calls == ["reference"] * 3
    assert dispatch_module.current_backend() == os.environ["PDT_KERNELS"]


def test_backend_names_are_validated(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("cuda"):
            pass
    monkeypatch.setenv("PDT_KERNELS", "fast")
    with pytest.raises(ValueError, match="PDT_KERNELS"):
        dispatch_module.current_backend()
    with use_backend("reference"):
        with use_backend("auto"):
            assert dispatch_module.current_backend() == "auto"
        assert dispatch_module.current_backend() == "reference"


def test_package_imports_and_runs_references_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, pdt_kernels\n"
        "from pdt_kernels.note_attention_decode import note_attention_decode_triton\n"
        "q = torch.randn(1, 1, 16); store = torch.randn(2, 1, 16)\n"
        "idx, off = torch.tensor([1]), torch.tensor([0, 1])\n"
        "out = pdt_kernels.note_attention_decode(q, store, store, idx, off)\n"
        "assert torch.allclose(out, store[1:]), out\n"
        "try:\n"
        "    note_attention_decode_triton(q, store, store, idx, off)\n"
        "except ImportError as err:\n"
        "    assert 'pip install triton' in str(err), err\n"
        "else:\n"
        "    raise SystemExit('the Triton path ran without Triton')\n"
        "with pdt_kernels.use_backend('triton'):\n"
        "    try:\n"
        "        pdt_kernels.note_attention_decode(q, store, store, idx, off)\n"
        "    except RuntimeError as err:\n"
        "        assert 'not installed' in str(err), err\n"
        "    else:\n"
        "        raise SystemExit('use_backend(\"triton\") fell back silently')\n"
        "print('ok')\n"
    )
    kernels_dir = str(Path(pdt_kernels.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([kernels_dir, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_public_api_is_sorted_and_complete():
    assert pdt_kernels.__all__ == sorted(pdt_kernels.__all__, key=lambda name: (not name.isupper(), name))
    assert all(hasattr(pdt_kernels, name) for name in pdt_kernels.__all__)


def note_args(**overrides):
    q, k, v, q_round, kv_round, kv_valid = note_inputs(1, 1, 3, 2, 16, torch.float32)
    args = dict(q=q, k=k, v=v, q_round=q_round, kv_round=kv_round, kv_valid=kv_valid, lag=1)
    return {**args, **overrides}


def csr_args(**overrides):
    q, k_store, v_store, indices, offsets = csr_inputs([1, 2], C=4, H=1, D=16, dtype=torch.float32)
    return {**dict(q=q, k_store=k_store, v_store=v_store, indices=indices, offsets=offsets), **overrides}


def ragged_args(Hq=2, Hkv=1, **overrides):
    names = ("q", "prefix_k", "prefix_v", "suffix_k", "suffix_v", "suffix_lens")
    return {**dict(zip(names, ragged_inputs([1], Hq, Hkv, P=4, S_max=2, D=16, dtype=torch.float32))), **overrides}


BAD_INPUTS = {  # id: (function, argument builder, message the ValueError must contain)
    "lag_float": (note_attention_ref, lambda: note_args(lag=1.5), "lag must be a Python int"),
    "q_rank": (note_attention_ref, lambda: note_args(q=torch.randn(2, 3, 16)), r"q must have shape \[N, H, T, D\]"),
    "kv_valid_dtype": (note_attention_ref, lambda: note_args(kv_valid=torch.ones(1, 2)), "kv_valid must have dtype"),
    "k_head_dim": (
        note_attention_ref,
        lambda: note_args(k=torch.randn(1, 1, 2, 8), v=torch.randn(1, 1, 2, 8)),
        "expected 16 to match q's D",
    ),  # fmt: skip
    "v_dtype": (
        note_attention_ref,
        lambda: note_args(v=torch.randn(1, 1, 2, 16, dtype=torch.float64)),
        "v has dtype torch.float64",
    ),  # fmt: skip
    "offsets_len": (note_attention_decode_ref, lambda: csr_args(offsets=torch.tensor([0, 3])), "offsets has size 2"),
    "scale": (note_attention_decode_ref, lambda: csr_args(scale=-1.0), "scale must be a positive number"),
    "gqa": (ragged_decode_attention_ref, lambda: ragged_args(Hq=3, Hkv=2), "multiple of prefix_k's Hkv=2"),
    "lens_dtype": (
        ragged_decode_attention_ref,
        lambda: ragged_args(suffix_lens=torch.tensor([1.0])),
        "suffix_lens must have dtype",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise_value_error_naming_the_fix(case):
    fn, build, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        fn(**build())


# ---------------------------------------------------------------------------------------------------------------
# GPU: compiled Triton, bf16, full shapes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_note_attention_full_shape(cuda, D, dtype):
    N, H, T, M = 3, 8, 257, 48  # K = 3 streams, 32 blocks of B = 8 tokens, K * W = 48 notes
    inputs = [t.to(cuda) if not t.is_floating_point() else t.detach().to(cuda).requires_grad_() for t in
              note_inputs(N, H, T, M, D, dtype, rounds=32)]  # fmt: skip
    truth_inputs = as_float(inputs)
    d_out = torch.randn(N, H, T, D, dtype=dtype, device=cuda)
    with use_backend("triton"):
        out = note_attention(*inputs, 1)
    grads = torch.autograd.grad(out, inputs[:3], d_out)
    low = note_attention_ref(*inputs, 1)
    low_grads = torch.autograd.grad(low, inputs[:3], d_out)
    truth = note_attention_ref(*truth_inputs, 1)
    truth_grads = torch.autograd.grad(truth, truth_inputs[:3], d_out.float())
    assert_matches(out, low, truth, "out")
    for name, got, ref, want in zip(("dq", "dk", "dv"), grads, low_grads, truth_grads):
        assert_matches(got, ref, want, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_note_attention_decode_full_shape(cuda, dtype):
    counts = [16, 0, 16, 9, 16, 16, 1, 16]  # K = 8 streams, window W = 16
    inputs = [t.to(cuda) for t in csr_inputs(counts, C=512, H=8, D=128, dtype=dtype)]
    with use_backend("triton"):
        out = note_attention_decode(*inputs)
    low = note_attention_decode_ref(*inputs)
    truth = note_attention_decode_ref(*as_float(inputs[:3]), *inputs[3:])
    assert_matches(out, low, truth, "out")
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,D", [(1, 128), (8, 64), (8, 128)])
def test_gpu_ragged_decode_attention_full_shape(cuda, K, D, dtype):
    lens = torch.randint(0, 97, (K,)).tolist()
    inputs = [t.to(cuda) for t in ragged_inputs(lens, Hq=32, Hkv=8, P=2048, S_max=96, D=D, dtype=dtype)]
    with use_backend("triton"):
        out = ragged_decode_attention(*inputs)
    low = ragged_decode_attention_ref(*inputs)
    truth = ragged_decode_attention_ref(*as_float(inputs))
    assert_matches(out, low, truth, "out")
