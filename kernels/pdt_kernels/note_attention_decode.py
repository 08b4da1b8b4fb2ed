"""Decode-time note attention over ragged visible note sets stored in CSR form.

Design decisions:

- The note bus computes each SNC layer's note K/V once, at publish, into preallocated per-layer storage
  k_store/v_store [C, H, D]. A reader never copies notes: it passes CSR row indices into that storage, so
  query row r reads store rows `indices[offsets[r]:offsets[r + 1]]`::

      offsets   0     2 2        5
                |     | |        |
      indices   [4 7] [] [0 3 9]          row 0 reads notes 4, 7; row 1 reads none; row 2 reads 0, 3, 9

- One program per (query row, head). Visible sets are small (at most the note window W), so the kernel loops
  over them in tiles of BLOCK_N with an online softmax on fp32 registers, no tensor cores needed for one row.
- A row with an empty set returns exact zeros, so a stream that sees no note gets an exact zero SNC delta.
- The stores may be strided views (one layer's slice of a larger buffer) as long as the head dim is
  contiguous; the kernel takes their row and head strides.
- Forward only: decoding never needs gradients.
"""

from __future__ import annotations

import math

import torch

from ._common import check_float, check_index, check_rank, check_same_device, check_size, resolve_scale, softmax_dtype
from ._triton import tl, triton

__all__ = ["note_attention_decode_ref", "note_attention_decode_triton"]

_LOG2E = math.log2(math.e)


@triton.jit
def _note_decode_kernel(
    Q, K_STORE, V_STORE, INDICES, OFFSETS, OUT,
    D, qk_scale, stride_kc, stride_kh, stride_vc, stride_vh,
    H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = tl.load(OFFSETS + row)
    end = tl.load(OFFSETS + row + 1)
    q = tl.load(Q + (row * H + h) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in range(start, end, BLOCK_N):
        offs_n = j + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        idx = tl.load(INDICES + offs_n, mask=n_ok, other=0).to(tl.int64)  # store rows of this tile
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K_STORE + idx[:, None] * stride_kc + h * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_STORE + idx[:, None] * stride_vc + h * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)

        s = tl.where(n_ok, tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale, float("-inf"))  # [BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: the tile holds at least one note
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new

    out = acc / tl.maximum(l_i, 1e-30)  # an empty row keeps acc == 0
    tl.store(OUT + (row * H + h) * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


def _store_view(store: torch.Tensor) -> torch.Tensor:
    """The store itself when its head dim is contiguous (the usual case), else a contiguous copy."""
    return store if store.stride(-1) == 1 else store.contiguous()


def _check_inputs(q, k_store, v_store, indices, offsets) -> None:
    check_rank("q", q, 3, "[R, H, D]")
    check_rank("k_store", k_store, 3, "[C, H, D]")
    check_rank("v_store", v_store, 3, "[C, H, D]")
    check_rank("indices", indices, 1, "[nnz]")
    check_rank("offsets", offsets, 1, "[R + 1]")
    R, H, D = q.shape
    if k_store.shape != v_store.shape:
        raise ValueError(
            f"k_store and v_store must have the same shape [C, H, D], got {tuple(k_store.shape)} and "
            f"{tuple(v_store.shape)}."
        )
    check_size("k_store", k_store, 1, H, "q's H")
    check_size("k_store", k_store, 2, D, "q's D")
    check_size("offsets", offsets, 0, R + 1, "q's R plus one (CSR offsets)")
    check_float("q", ("q", q), ("k_store", k_store), ("v_store", v_store))
    check_index("indices", indices, (torch.int32, torch.int64))
    check_index("offsets", offsets, (torch.int32, torch.int64))
    check_same_device(("q", q), ("k_store", k_store), ("v_store", v_store), ("indices", indices), ("offsets", offsets))


def note_attention_decode_triton(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton decode note attention; same contract as `note_attention_decode_ref`."""
    _check_inputs(q, k_store, v_store, indices, offsets)
    scale = resolve_scale(scale, q.shape[-1])
    R, H, D = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    k_store, v_store = _store_view(k_store), _store_view(v_store)
    block_n = 16  # visible sets hold at most the note window W (16 by default)
    _note_decode_kernel[(R, H)](
        q, k_store, v_store, indices.contiguous(), offsets.contiguous(), out,
        D, scale * _LOG2E, k_store.stride(0), k_store.stride(1), v_store.stride(0), v_store.stride(1),
        H=H, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(D)), num_warps=1,
    )  # fmt: skip
    return out


def note_attention_decode_ref(
    q: torch.Tensor,
    k_store: torch.Tensor,
    v_store: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch decode note attention: pad the ragged sets to the longest row, mask, softmax.

    Args:
        q: [R, H, D], one query row per stream (or per stream token).
        k_store, v_store: [C, H, D] per-layer note key/value storage.
        indices: int32/int64 [nnz] store rows, grouped by query row.
        offsets: int32/int64 [R + 1] non-decreasing CSR offsets into `indices`, offsets[0] == 0.
        scale: softmax scale, default D ** -0.5.

    Returns:
        [R, H, D] in q's dtype; rows with no notes are exactly 0.
    """
    _check_inputs(q, k_store, v_store, indices, offsets)
    scale = resolve_scale(scale, q.shape[-1])
    offsets = offsets.to(torch.int64)
    counts = offsets[1:] - offsets[:-1]  # [R]
    width = int(counts.max()) if counts.numel() else 0
    if width == 0:
        return torch.zeros_like(q)
    slot = torch.arange(width, device=q.device)  # [L]
    present = slot[None, :] < counts[:, None]  # [R, L]
    flat = torch.where(present, offsets[:-1, None] + slot[None, :], 0)  # [R, L] positions in `indices`
    rows = indices.to(torch.int64)[flat]  # [R, L] store rows (row 0 of `indices` fills the padding)
    k = k_store[rows]  # [R, L, H, D]
    v = v_store[rows]  # [R, L, H, D]
    scores = torch.einsum("rhd,rlhd->rhl", q, k).to(softmax_dtype(q.dtype)) * scale  # [R, H, L]
    mask = present[:, None, :]  # [R, 1, L]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1) * mask  # empty rows: exactly 0
    return torch.einsum("rhl,rlhd->rhd", probs.to(v.dtype), v)  # [R, H, D]
