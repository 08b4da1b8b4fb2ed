"""Multi-stream decode attention: K streams share one prompt prefix and each has its own ragged suffix.

Design decisions:

- Cascade attention. Attention over prefix ∪ suffix equals the log-sum-exp merge of attention over each part,
  so the shared prompt prefix is stored once ([Hkv, P, D]) and read once per step for all K streams::

      stream 0:  [ prefix p_0 ... p_{P-1} ][ s_0 s_1 s_2 .   .  ]   suffix_lens[0] = 3
      stream 1:  [   (the same prefix)    ][ s_0 .   .   .   .  ]   suffix_lens[1] = 1
      stream 2:  [   (the same prefix)    ][ s_0 s_1 s_2 s_3 s_4]   suffix_lens[2] = 5 = S_max

  A rollback of n tokens is `suffix_lens[k] -= n`; nothing here needs the cache to be copied or compacted.
- Prefix kernel: one program per (kv head, prefix split, block of query rows). Its query rows are all
  K x G (stream, query head) pairs that share the kv head (G = Hq // Hkv, GQA), so each prefix tile is loaded
  once and used by every stream and every query head of the group in one tensor-core matmul.
- The prefix is cut into splits (flash-decoding) so a single decode step fills the GPU; each split writes a
  normalised partial output and its base-2 log-sum-exp.
- Suffix kernel: one program per (stream, kv head) over that stream's valid suffix positions. The partial
  for a stream with suffix_lens == 0 has log-sum-exp -inf and weighs nothing in the merge.
- Merge kernel: one program per (stream, query head) folds the partials in with the same online rule; a row
  where nothing is visible (P == 0 and suffix_lens == 0) returns exact zeros.
- Forward only (decoding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import check_float, check_index, check_rank, check_same_device, check_size, resolve_scale, softmax_dtype
from ._triton import tl, triton

__all__ = ["ragged_decode_attention_ref", "ragged_decode_attention_triton", "sdpa_with_mask_reference"]

_LOG2E = math.log2(math.e)
_MIN_TILES_PER_SPLIT = 4


@triton.jit
def _prefix_partial_kernel(
    Q, PK, PV, O_PART, LSE_PART,
    P, D, ROWS, NUM_PARTS, tiles_per_split, qk_scale, stride_pkh, stride_pkp, stride_pvh, stride_pvp,
    HQ: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    hk = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # flattened (stream, head-in-group) pairs
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < ROWS
    d_ok = offs_d < D
    q_row = (rows // GROUP) * HQ + hk * GROUP + rows % GROUP  # stream * HQ + query head
    q = tl.load(Q + q_row[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    p_lo = split * tiles_per_split * BLOCK_P
    p_hi = tl.minimum(p_lo + tiles_per_split * BLOCK_P, P)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for start in range(p_lo, p_hi, BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        p_ok = offs_p < p_hi
        kv_mask = p_ok[:, None] & d_ok[None, :]
        k = tl.load(PK + hk * stride_pkh + offs_p[:, None] * stride_pkp + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(PV + hk * stride_pvh + offs_p[:, None] * stride_pvp + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.where(p_ok[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))  # [BLOCK_Q, BLOCK_P]
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one position
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    part = q_row * NUM_PARTS + split  # [BLOCK_Q] rows of the [K * HQ, NUM_PARTS] partial buffers
    tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _suffix_partial_kernel(
    Q, SK, SV, LENS, O_PART, LSE_PART,
    S_MAX, D, NUM_PARTS, qk_scale, stride_sks, stride_skh, stride_skp, stride_svs, stride_svh, stride_svp,
    HQ: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    stream = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = offs_d < D
    q_row = stream * HQ + hk * GROUP + g  # [BLOCK_G]
    q = tl.load(Q + q_row[:, None] * D + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    length = tl.minimum(tl.load(LENS + stream).to(tl.int32), S_MAX)
    sk_base = SK + stream * stride_sks + hk * stride_skh
    sv_base = SV + stream * stride_svs + hk * stride_svh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, length, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        s_ok = offs_s < length
        kv_mask = s_ok[:, None] & d_ok[None, :]
        k = tl.load(sk_base + offs_s[:, None] * stride_skp + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(sv_base + offs_s[:, None] * stride_svp + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.where(s_ok[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))  # [BLOCK_G, BLOCK_S]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    part = q_row * NUM_PARTS + (NUM_PARTS - 1)  # the suffix is the last partial
    tl.store(O_PART + part[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=g_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part, tl.where(seen, m_i + tl.log2(l_safe), float("-inf")), mask=g_ok)


@triton.jit
def _merge_kernel(
    O_PART, LSE_PART, OUT, D, NUM_PARTS,
    BLOCK_PARTS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # stream * HQ + query head
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, NUM_PARTS, BLOCK_PARTS):
        parts = start + tl.arange(0, BLOCK_PARTS)
        part_ok = parts < NUM_PARTS
        lse = tl.load(LSE_PART + row * NUM_PARTS + parts, mask=part_ok, other=float("-inf"))
        o = tl.load(O_PART + (row * NUM_PARTS + parts)[:, None] * D + offs_d[None, :],
                    mask=part_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible so far: every weight is 0
        w = tl.exp2(lse - m_safe)  # [BLOCK_PARTS]
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(OUT + row * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


def _kv_view(x: torch.Tensor) -> torch.Tensor:
    """The cache itself when its head dim is contiguous (the usual case), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _prefix_plan(P: int, hkv: int, q_blocks: int, block_p: int, device: torch.device, splits: int | None):
    """Returns (tiles_per_split, num_splits) for a prefix of P positions.

    By default about two programs per SM on CUDA, but at least `_MIN_TILES_PER_SPLIT` tiles per split so that
    writing and merging the fp32 partials stays cheap next to reading the prefix.
    """
    tiles = triton.cdiv(P, block_p)
    if tiles == 0:
        return 1, 0
    if splits is None:
        slots = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        splits = min(max(1, slots // max(1, hkv * q_blocks)), triton.cdiv(tiles, _MIN_TILES_PER_SPLIT))
    tiles_per_split = triton.cdiv(tiles, min(max(1, splits), tiles))
    return tiles_per_split, triton.cdiv(tiles, tiles_per_split)


def _check_inputs(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens) -> None:
    check_rank("q", q, 3, "[K, Hq, D]")
    check_rank("prefix_k", prefix_k, 3, "[Hkv, P, D]")
    check_rank("suffix_k", suffix_k, 4, "[K, Hkv, S_max, D]")
    check_rank("suffix_lens", suffix_lens, 1, "[K]")
    K, Hq, D = q.shape
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_v must have prefix_k's shape {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}.")
    if suffix_v.shape != suffix_k.shape:
        raise ValueError(f"suffix_v must have suffix_k's shape {tuple(suffix_k.shape)}, got {tuple(suffix_v.shape)}.")
    hkv = prefix_k.shape[0]
    if hkv == 0 or Hq % hkv != 0:
        raise ValueError(f"q's Hq={Hq} must be a positive multiple of prefix_k's Hkv={hkv} (grouped-query attention).")
    check_size("prefix_k", prefix_k, 2, D, "q's D")
    for dim, size, meaning in ((0, K, "q's K"), (1, hkv, "prefix_k's Hkv"), (3, D, "q's D")):
        check_size("suffix_k", suffix_k, dim, size, meaning)
    check_size("suffix_lens", suffix_lens, 0, K, "q's K")
    check_float("q", ("q", q), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("suffix_k", suffix_k),
                ("suffix_v", suffix_v))  # fmt: skip
    check_index("suffix_lens", suffix_lens, (torch.int32, torch.int64))
    check_same_device(("q", q), ("prefix_k", prefix_k), ("prefix_v", prefix_v), ("suffix_k", suffix_k),
                      ("suffix_v", suffix_v), ("suffix_lens", suffix_lens))  # fmt: skip


def ragged_decode_attention_triton(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float | None = None,
    *,
    block_p: int | None = None,
    prefix_splits: int | None = None,
) -> torch.Tensor:
    """Triton cascade decode attention; same contract as `ragged_decode_attention_ref`.

    `block_p` (prefix tile, power of two >= 16) and `prefix_splits` (how many programs share one kv head's
    prefix) are tuning knobs; by default 64 and about two programs per SM with at least 4 tiles each.
    """
    _check_inputs(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens)
    if block_p is not None and (block_p < 16 or block_p & (block_p - 1)):
        raise ValueError(f"block_p must be a power of two >= 16, got {block_p}; leave it None for 64.")
    if prefix_splits is not None and prefix_splits < 1:
        raise ValueError(f"prefix_splits must be >= 1, got {prefix_splits}; leave it None to size it to the GPU.")
    scale = resolve_scale(scale, q.shape[-1])
    K, Hq, D = q.shape
    hkv, P = prefix_k.shape[0], prefix_k.shape[1]
    S_max = suffix_k.shape[2]
    group = Hq // hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    prefix_k, prefix_v, suffix_k, suffix_v = (_kv_view(x) for x in (prefix_k, prefix_v, suffix_k, suffix_v))
    block_d = max(16, triton.next_power_of_2(D))
    block_p = block_p or 64
    block_q = min(64, max(16, triton.next_power_of_2(K * group)))
    q_blocks = triton.cdiv(K * group, block_q)
    tiles_per_split, splits = _prefix_plan(P, hkv, q_blocks, block_p, q.device, prefix_splits)
    num_parts = splits + 1  # prefix splits, then the suffix
    o_part = torch.empty((K * Hq, num_parts, D), device=q.device, dtype=torch.float32)  # normalised partials
    lse_part = torch.empty((K * Hq, num_parts), device=q.device, dtype=torch.float32)  # base-2 log-sum-exp
    qk_scale = scale * _LOG2E
    num_warps = 8 if block_d >= 128 else 4
    if splits > 0:
        _prefix_partial_kernel[(hkv, splits, q_blocks)](
            q, prefix_k, prefix_v, o_part, lse_part,
            P, D, K * group, num_parts, tiles_per_split, qk_scale,
            prefix_k.stride(0), prefix_k.stride(1), prefix_v.stride(0), prefix_v.stride(1),
            HQ=Hq, GROUP=group, BLOCK_Q=block_q, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
    _suffix_partial_kernel[(K, hkv)](
        q, suffix_k, suffix_v, suffix_lens.contiguous(), o_part, lse_part,
        S_max, D, num_parts, qk_scale, *suffix_k.stride()[:3], *suffix_v.stride()[:3],
        HQ=Hq, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_S=min(64, max(16, triton.next_power_of_2(S_max))), BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    _merge_kernel[(K * Hq,)](
        o_part, lse_part, out, D, num_parts,
        BLOCK_PARTS=min(16, max(2, triton.next_power_of_2(num_parts))), BLOCK_D=block_d, num_warps=2,
    )  # fmt: skip
    return out


def _softmax_with_lse(scores: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax over the last dim plus its natural log-sum-exp; an all-masked row gives 0 and -inf."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [...], -inf where nothing is visible
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return probs, lse


def ragged_decode_attention_ref(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch cascade decode attention: prefix part and suffix part, merged by log-sum-exp.

    Args:
        q: [K, Hq, D], the new token of each stream (its own K/V is already in the suffix).
        prefix_k, prefix_v: [Hkv, P, D] shared prompt cache (P may be 0); Hq must be a multiple of Hkv and
            query head h reads kv head h // (Hq // Hkv).
        suffix_k, suffix_v: [K, Hkv, S_max, D] per-stream suffix caches.
        suffix_lens: int32/int64 [K]; stream k attends suffix positions < suffix_lens[k].
        scale: softmax scale, default D ** -0.5.

    Returns:
        [K, Hq, D] in q's dtype; a stream with P == 0 and suffix_lens == 0 gets exact zeros.
    """
    _check_inputs(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens)
    scale = resolve_scale(scale, q.shape[-1])
    K, Hq, D = q.shape
    hkv, S_max = prefix_k.shape[0], suffix_k.shape[2]
    acc = softmax_dtype(q.dtype)
    q4 = q.reshape(K, hkv, Hq // hkv, D)  # [K, Hkv, G, D]
    scores_p = torch.einsum("kngd,npd->kngp", q4, prefix_k).to(acc) * scale  # [K, Hkv, G, P]
    probs_p, lse_p = _softmax_with_lse(scores_p, None)
    out_p = torch.einsum("kngp,npd->kngd", probs_p.to(prefix_v.dtype), prefix_v).to(acc)  # [K, Hkv, G, D]
    scores_s = torch.einsum("kngd,knsd->kngs", q4, suffix_k).to(acc) * scale  # [K, Hkv, G, S_max]
    valid = torch.arange(S_max, device=q.device)[None, :] < suffix_lens[:, None]  # [K, S_max]
    probs_s, lse_s = _softmax_with_lse(scores_s, valid[:, None, None, :])
    out_s = torch.einsum("kngs,knsd->kngd", probs_s.to(suffix_v.dtype), suffix_v).to(acc)  # [K, Hkv, G, D]
    lse = torch.logaddexp(lse_p, lse_s)  # [K, Hkv, G]
    lse = torch.where(torch.isinf(lse), 0.0, lse)  # nothing visible: both weights below are exp(-inf) = 0
    out = torch.exp(lse_p - lse)[..., None] * out_p + torch.exp(lse_s - lse)[..., None] * out_s
    return out.reshape(K, Hq, D).to(q.dtype)  # [K, Hq, D]


def sdpa_with_mask_reference(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    suffix_k: torch.Tensor,
    suffix_v: torch.Tensor,
    suffix_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """The simple path: copy the prefix into every stream, concatenate, and call SDPA with a boolean mask.

    Same arguments and result as `ragged_decode_attention_ref`; it materialises [K, Hq, P + S_max, D] keys and
    values, which is what the cascade kernel avoids.
    """
    _check_inputs(q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens)
    scale = resolve_scale(scale, q.shape[-1])
    K, Hq, D = q.shape
    hkv, P, S_max = prefix_k.shape[0], prefix_k.shape[1], suffix_k.shape[2]
    keys = torch.cat([prefix_k.expand(K, hkv, P, D), suffix_k], dim=2)  # [K, Hkv, P + S_max, D]
    values = torch.cat([prefix_v.expand(K, hkv, P, D), suffix_v], dim=2)  # [K, Hkv, P + S_max, D]
    keys = keys.repeat_interleave(Hq // hkv, dim=1)  # [K, Hq, P + S_max, D]
    values = values.repeat_interleave(Hq // hkv, dim=1)  # [K, Hq, P + S_max, D]
    position = torch.arange(P + S_max, device=q.device)  # [P + S_max]
    visible = position[None, :] < P + suffix_lens[:, None]  # [K, P + S_max]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible[:, None, None], scale=scale)
    return torch.where(visible.any(-1)[:, None, None], out[:, :, 0], 0.0)  # [K, Hq, D]; all-masked rows -> 0
