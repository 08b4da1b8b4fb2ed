"""Note attention for training and prefill: every token of every stream reads its visible sibling notes.

Design decisions:

- Visibility is data, not a dense mask. The launcher folds the inputs into two small integer tensors:
  `q_limit[n, t] = q_round[n, t] - lag` and `kv_key[n, m] = kv_round[n, m]` (or INT64_MAX where the note is not
  a valid sibling note), so the kernels test one comparison, `kv_key <= q_limit`, per (token, note) pair and
  never materialise an [N, T, M] mask.
- A token that sees no note gets exact zeros and zero gradients (the SNC delta of such a stream must be exactly
  zero, never NaN). The online softmax keeps the running max at -inf until a visible note arrives and divides
  by the running sum only where it is positive.
- Flash-attention 2 numerics: base-2 online softmax (log2(e) folded into the scale), fp32 accumulators, P cast
  to the value dtype before the second matmul; the base-2 log-sum-exp is saved for backward.
- Backward recomputes P from that log-sum-exp in two kernels: dK/dV (one program per note tile looping over
  queries) and dQ (one program per query tile looping over notes), so no atomics are needed.
- Notes are few (M <= K * W, tens), so a note tile usually spans all of them; query tiles carry the parallelism.

Layout: q [N, H, T, D] (N = sequences, usually K streams or batch * K), k/v [N, H, M, D].
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ._common import check_float, check_index, check_rank, check_same_device, check_size, resolve_scale, softmax_dtype
from ._triton import tl, triton

__all__ = ["NoteAttentionFunction", "note_attention_ref", "note_attention_triton", "note_visibility"]

_LOG2E = math.log2(math.e)
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@triton.jit
def _note_attn_fwd_kernel(
    Q, K, V, OUT, LSE, Q_LIMIT, KV_KEY,
    T, M, D, H, qk_scale,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # flattened (sequence, head)
    n = bh // H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    q = tl.load(Q + bh * T * D + offs_t[:, None] * D + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    limit = tl.load(Q_LIMIT + n * T + offs_t, mask=t_ok, other=0)

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        kv_ptrs = bh * M * D + offs_m[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kv_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        key = tl.load(KV_KEY + n * M + offs_m, mask=m_ok, other=0)
        visible = m_ok[None, :] & (key[None, :] <= limit[:, None])

        s = tl.where(visible, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))  # [BLOCK_T, BLOCK_M], base 2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows that saw nothing keep acc == 0
    tl.store(OUT + bh * T * D + offs_t[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])  # fmt: skip
    tl.store(LSE + bh * T + offs_t, tl.where(seen, m_i + tl.log2(l_safe), 0.0), mask=t_ok)


@triton.jit
def _note_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_LIMIT, KV_KEY,
    T, M, D, H, qk_scale, sm_scale,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n = bh // H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    kv_ptrs = bh * M * D + offs_m[:, None] * D + offs_d[None, :]
    k = tl.load(K + kv_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + kv_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    key = tl.load(KV_KEY + n * M + offs_m, mask=m_ok, other=0)

    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, T, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        q_ptrs = bh * T * D + offs_t[:, None] * D + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + q_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        limit = tl.load(Q_LIMIT + n * T + offs_t, mask=t_ok, other=0)
        lse = tl.load(LSE + bh * T + offs_t, mask=t_ok, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_t, mask=t_ok, other=0.0)
        visible = t_ok[:, None] & m_ok[None, :] & (key[None, :] <= limit[:, None])

        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_T, BLOCK_M]
        p = tl.exp2(tl.where(visible, s - lse[:, None], float("-inf")))
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)

    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _note_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Q_LIMIT, KV_KEY,
    T, M, D, H, qk_scale, sm_scale,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    n = bh // H
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    q_ptrs = bh * T * D + offs_t[:, None] * D + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    limit = tl.load(Q_LIMIT + n * T + offs_t, mask=t_ok, other=0)
    lse = tl.load(LSE + bh * T + offs_t, mask=t_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_t, mask=t_ok, other=0.0)

    dq = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        kv_ptrs = bh * M * D + offs_m[:, None] * D + offs_d[None, :]
        k = tl.load(K + kv_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + kv_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        key = tl.load(KV_KEY + n * M + offs_m, mask=m_ok, other=0)
        visible = m_ok[None, :] & (key[None, :] <= limit[:, None])

        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(tl.where(visible, s - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


def _blocks(T: int, M: int, D: int, backward: bool) -> tuple[int, int, int]:
    """Tile sizes (BLOCK_T, BLOCK_M, BLOCK_D); tl.dot needs every tile dim >= 16."""
    block_d = max(16, triton.next_power_of_2(D))
    cap = 32 if backward and block_d >= 128 else 64
    return (min(cap, max(16, triton.next_power_of_2(T))), min(cap, max(16, triton.next_power_of_2(M))), block_d)


def _note_attention_fwd(q, k, v, q_limit, kv_key, scale):
    """Launch the forward kernel. Returns out [N, H, T, D] and the base-2 log-sum-exp [N, H, T] (fp32)."""
    N, H, T, D = q.shape
    M = k.shape[2]
    out = torch.zeros_like(q)
    lse = torch.zeros((N, H, T), device=q.device, dtype=torch.float32)
    if M == 0 or out.numel() == 0:
        return out, lse
    block_t, block_m, block_d = _blocks(T, M, D, backward=False)
    grid = (triton.cdiv(T, block_t), N * H)
    _note_attn_fwd_kernel[grid](
        q, k, v, out, lse, q_limit, kv_key, T, M, D, H, scale * _LOG2E,
        BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out, lse


def _note_attention_bwd(d_out, q, k, v, out, lse, q_limit, kv_key, scale):
    """Launch the two backward kernels. Returns dq [N, H, T, D], dk and dv [N, H, M, D]."""
    N, H, T, D = q.shape
    M = k.shape[2]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if M == 0 or q.numel() == 0:
        return dq, dk, dv
    delta = (d_out.float() * out.float()).sum(-1)  # [N, H, T], rowsum(dO * O)
    block_t, block_m, block_d = _blocks(T, M, D, backward=True)
    common = dict(BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    _note_attn_bwd_dkdv_kernel[(triton.cdiv(M, block_m), N * H)](
        q, k, v, d_out, lse, delta, dk, dv, q_limit, kv_key, T, M, D, H, scale * _LOG2E, scale, **common
    )
    _note_attn_bwd_dq_kernel[(triton.cdiv(T, block_t), N * H)](
        q, k, v, d_out, lse, delta, dq, q_limit, kv_key, T, M, D, H, scale * _LOG2E, scale, **common
    )
    return dq, dk, dv


class NoteAttentionFunction(torch.autograd.Function):
    """autograd wrapper: Triton forward, Triton backward for q, k, v (the index tensors get no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, q_limit, kv_key, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _note_attention_fwd(q, k, v, q_limit, kv_key, scale)
        ctx.save_for_backward(q, k, v, out, lse, q_limit, kv_key)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        q, k, v, out, lse, q_limit, kv_key = ctx.saved_tensors
        dq, dk, dv = _note_attention_bwd(d_out.contiguous(), q, k, v, out, lse, q_limit, kv_key, ctx.scale)
        return dq, dk, dv, None, None, None


def _check_inputs(q, k, v, q_round, kv_round, kv_valid, lag) -> None:
    check_rank("q", q, 4, "[N, H, T, D]")
    check_rank("k", k, 4, "[N, H, M, D]")
    check_rank("v", v, 4, "[N, H, M, D]")
    check_rank("q_round", q_round, 2, "[N, T]")
    check_rank("kv_round", kv_round, 2, "[N, M]")
    check_rank("kv_valid", kv_valid, 2, "[N, M]")
    N, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [N, H, M, D], got {tuple(k.shape)} and {tuple(v.shape)}.")
    M = k.shape[2]
    for dim, size, meaning in ((0, N, "q's N"), (1, H, "q's H"), (3, D, "q's D")):
        check_size("k", k, dim, size, meaning)
    check_size("q_round", q_round, 0, N, "q's N")
    check_size("q_round", q_round, 1, T, "q's T")
    for name, tensor in (("kv_round", kv_round), ("kv_valid", kv_valid)):
        check_size(name, tensor, 0, N, "q's N")
        check_size(name, tensor, 1, M, "k's M")
    check_float("q", ("q", q), ("k", k), ("v", v))
    check_index("q_round", q_round, _INT_DTYPES)
    check_index("kv_round", kv_round, _INT_DTYPES)
    check_index("kv_valid", kv_valid, (torch.bool,))
    check_same_device(
        ("q", q), ("k", k), ("v", v), ("q_round", q_round), ("kv_round", kv_round), ("kv_valid", kv_valid)
    )
    if isinstance(lag, bool) or not isinstance(lag, int):
        raise ValueError(f"lag must be a Python int (rounds of delay, the note_lag Δ), got {lag!r}.")


def note_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_round: torch.Tensor,
    kv_round: torch.Tensor,
    kv_valid: torch.Tensor,
    lag: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton note attention; same contract as `note_attention_ref`, differentiable w.r.t. q, k, v."""
    _check_inputs(q, k, v, q_round, kv_round, kv_valid, lag)
    scale = resolve_scale(scale, q.shape[-1])
    q_limit = (q_round.to(torch.int64) - lag).contiguous()  # [N, T]
    kv_key = kv_round.to(torch.int64).masked_fill(~kv_valid, torch.iinfo(torch.int64).max).contiguous()  # [N, M]
    return NoteAttentionFunction.apply(q, k, v, q_limit, kv_key, scale)


def note_visibility(q_round: torch.Tensor, kv_round: torch.Tensor, kv_valid: torch.Tensor, lag: int) -> torch.Tensor:
    """Which notes each query token may read: bool [N, T, M].

    Token t of sequence n sees note m iff `kv_valid[n, m]` and `kv_round[n, m] <= q_round[n, t] - lag`::

        B = 3 tokens per block, lag = 1, notes of rounds 0, 1, 2 (all valid siblings)

        q_round[n, :]   0 0 0 | 1 1 1 | 2 2 2
                         m=0  m=1  m=2
        tokens of round 0  .    .    .     -> nothing visible: output row is exactly 0
        tokens of round 1  x    .    .
        tokens of round 2  x    x    .

    Notes that must be visible from round 0 (the planner's snapshot 0) carry round `-lag`.
    """
    return kv_valid[:, None, :] & (kv_round[:, None, :] <= q_round[:, :, None] - lag)  # [N, T, M]


def note_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_round: torch.Tensor,
    kv_round: torch.Tensor,
    kv_valid: torch.Tensor,
    lag: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch note attention.

    Args:
        q: [N, H, T, D] queries (one row per token of each sequence).
        k, v: [N, H, M, D] note keys and values (M may be 0).
        q_round: integer [N, T], the block round of each query token.
        kv_round: integer [N, M], the round each note was committed in.
        kv_valid: bool [N, M], False for padding and for the reader's own notes.
        lag: rounds before a note becomes visible (Δ); see `note_visibility`.
        scale: softmax scale, default D ** -0.5.

    Returns:
        [N, H, T, D] in q's dtype; rows with no visible note are exactly 0 and pass no gradient.
    """
    _check_inputs(q, k, v, q_round, kv_round, kv_valid, lag)
    scale = resolve_scale(scale, q.shape[-1])
    visible = note_visibility(q_round, kv_round, kv_valid, lag)[:, None]  # [N, 1, T, M]
    scores = torch.matmul(q, k.transpose(-1, -2)).to(softmax_dtype(q.dtype)) * scale  # [N, H, T, M]
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * visible  # an all-masked row is uniform before this, exactly 0 after
    return torch.matmul(probs.to(v.dtype), v)  # [N, H, T, D]
