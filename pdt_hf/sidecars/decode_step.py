"""The sidecar's layer delta for one-token decode steps, with the work that repeats inside a block done once.

``PDTSidecar.layer_delta`` is the reference: per call it gathers every row's adapter weights, normalises, and
gathers the visible notes' keys/values from the bus. In a decode block the same A streams step B times with the
same visible notes, so :class:`SidecarDecodeStep` moves that work out of the step:

    per generation (__init__)   adapter norm weight folded into ``down``, adapter gate into ``up``,
                                tanh(SNC gate) into the SNC output projection
    per block (bind)            the stepped streams' adapter weights; each SNC layer's visible note keys gathered
                                into [A*H, Dh, L], values into [A*H, L, Dh], and an additive mask [A*H, 1, L]
    per step (layer_delta)      h += up(act(down(rms(h))))                     bmm, baddbmm
                                h += Wo softmax(mask + s q K) V,  q = Wq rms(h)    mm, baddbmm, softmax, bmm, addmm
                                or, with few notes, the projections folded into them at bind:
                                h += softmax(mask + rms(h) M) V',  M = s Wq K, V' = V Wo    baddbmm, softmax, baddbmm

Design decisions:
- A step is T = 1 token per row, so the hidden state is handled as [A, d] and each residual add is fused into
  the matmul before it (``baddbmm``/``addmm``): ten operators per layer where the reference runs about fifty.
  Explicit batched matmuls beat SDPA here: with at most W = 16 notes its dispatch costs more than the maths.
- Same maths as the reference, not the same floating-point operations: folding reassociates products and the
  matmuls sum in their own order, so outputs agree within float tolerance (tests compare tokens and logits against the
  reference on tiny trunks with open gates), not bit for bit.
- Folding the SNC projections into the bound notes pays when a block's rows see few notes. A step is memory
  bound on a CPU: the unfolded path reads ``Wq`` and ``Wo`` (2 d H Dh floats) per layer and step, the folded
  one ``M`` and ``V'`` (2 A d H L floats, per row). So the fold is used when ``A * L <= Dh`` (profiled on the
  embedded SmolLM2 at K = 3: the bus's step cost fell from +3.0% to +0.4%, docs/benchmarks.md), and
  the projections are then read once per block instead of once per step.
- A row that sees no notes gets an exact zero SNC delta, as in the reference: its mask is finite (no NaN) and its
  attention output is multiplied by 0. A block in which no row sees a note skips SNC entirely.
- Anything the fast path does not cover goes to the reference: more than one token per row, a hidden dtype other
  than the sidecar's, a batch that is not the bound one, or a layer without a binding.
- ``torch.compile`` of this function was measured on the 2-core CPU and did not pay (docs/benchmarks.md): 17 s to
  compile, 105 us per layer call against 95 us eager, and a recompile whenever the visible note count changes.
  The tensors are fixed per block, as CUDA graph capture would need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .adapter.layer import _ACTIVATIONS

__all__ = ["SidecarDecodeStep"]

_EPS = 1e-6  # sidecars.norm.rms_norm's


@dataclass
class _Folded:
    """Per-generation weights of one layer: ``down`` [S, d, r], ``up`` [S, r, d], SNC ``wq_t`` [d, H*Dh], ``wo_t``."""

    down: torch.Tensor
    up: torch.Tensor
    activation: object
    wq_t: torch.Tensor
    wo_t: torch.Tensor
    num_heads: int
    head_dim: int


@dataclass
class _Bound:
    """Per-block tensors of one layer: adapter weights of the A rows and their notes (None: SNC skipped)."""

    down: torch.Tensor  # [A, d, r]
    up: torch.Tensor  # [A, r, d]
    keys: torch.Tensor | None  # [A*H, Dh, L]; folded: M = s Wq K, [A, d, H*L]
    values: torch.Tensor | None  # [A*H, L, Dh]; folded: V' = seen * V Wo, [A, H*L, d]
    mask: torch.Tensor | None  # [A*H, 1, L] additive; folded: [A, 1, H*L]
    seen: torch.Tensor | None  # [A, 1], 0 for rows that see no note; None when every row sees one (or folded)
    folded: bool = False


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    """``sidecars.norm.rms_norm`` as one fused operator (computed in fp32)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=_EPS).to(x.dtype)


class SidecarDecodeStep:
    """Serves ``layer_delta`` for the one-token steps of a decode block (install it with ``SidecarHooks.using``).

    Args:
        sidecar: the :class:`~pdt_hf.sidecars.model.PDTSidecar` whose reference ``layer_delta`` this replaces.
    """

    fold_notes: bool | None = None
    """Fold the SNC projections into the bound notes: None decides per block (``A * L <= Dh``); tests force it."""

    def __init__(self, sidecar) -> None:
        self.sidecar = sidecar
        self.layers = list(sidecar.config.instrumented_layers)
        self.dtype = next(sidecar.parameters()).dtype
        self.folded: dict[int, _Folded] = {}
        with torch.no_grad():
            for idx in self.layers:
                adapter, snc = sidecar.adapters[str(idx)], sidecar.snc[str(idx)]
                self.folded[idx] = _Folded(
                    down=(adapter.norm_weight[:, :, None] * adapter.down).contiguous(),  # [S, d, r]
                    up=(adapter.gate[:, None, None] * adapter.up).contiguous(),  # [S, r, d]
                    activation=_ACTIVATIONS[adapter.activation],
                    wq_t=snc.q_proj.weight.t().contiguous(),  # [d, H*Dh]
                    wo_t=(torch.tanh(snc.gate) * snc.o_proj.weight).t().contiguous(),  # [H*Dh, d]
                    num_heads=snc.num_heads,
                    head_dim=snc.head_dim,
                )
        self.bound: dict[int, _Bound] = {}
        self.rows = 0
        self.reads_notes = False

    def bind(self, streams: list[int], bus=None, read=None) -> None:
        """Prepare the steps of ``streams`` (batch order) reading ``read`` (a ``NoteRead`` of ``bus``, or None)."""
        device = self.folded[self.layers[0]].down.device
        contiguous = streams == list(range(len(streams)))
        index = None if contiguous else torch.tensor(streams, device=device)
        gather = self._gather_notes(bus, read) if read is not None else None
        self.bound = {}
        for slot, idx in enumerate(self.layers):
            w = self.folded[idx]
            down = w.down[: len(streams)] if contiguous else w.down[index]
            up = w.up[: len(streams)] if contiguous else w.up[index]
            keys = values = mask = seen = None
            if gather is not None:
                rows, additive, seen = gather
                k_store, v_store = bus.layer_kv(slot)
                a, width, heads, dh = len(streams), rows.shape[1], w.num_heads, w.head_dim
                keys = k_store[rows].to(self.dtype).permute(0, 2, 3, 1).reshape(a * heads, dh, width)  # [A*H, Dh, L]
                values = v_store[rows].to(self.dtype).transpose(1, 2).reshape(a * heads, width, dh)  # [A*H, L, Dh]
                mask = additive[:, None, None, :].expand(a, heads, 1, width).reshape(a * heads, 1, width)
                fold = self.fold_notes if self.fold_notes is not None else a * width <= dh
                if fold:
                    self.bound[idx] = self._folded(w, down, up, keys, values, mask, seen, a, width)
                    continue
            self.bound[idx] = _Bound(down, up, keys, values, mask, seen)
        self.rows, self.reads_notes = len(streams), read is not None

    @staticmethod
    def _folded(w: _Folded, down, up, keys, values, mask, seen, a: int, width: int) -> _Bound:
        """Per-row ``M = s Wq K`` [A, d, H*L] and ``V' = seen * V Wo`` [A, H*L, d]: two matmuls per step, not four."""
        heads, dh = w.num_heads, w.head_dim
        d = w.wq_t.shape[0]
        dtype = keys.dtype  # the products are formed in fp32 and rounded once
        wq = w.wq_t.float().reshape(d, heads, dh)  # [d, H, Dh]
        scores = (
            torch.einsum("dhe,ahel->adhl", wq, keys.float().reshape(a, heads, dh, width)) * dh**-0.5
        )  # [A, d, H, L]
        wo = w.wo_t.float().reshape(heads, dh, d)  # [H, Dh, d]
        out = torch.einsum("ahle,hed->ahld", values.float().reshape(a, heads, width, dh), wo)  # [A, H, L, d]
        if seen is not None:
            out = out * seen.float()[:, :, None, None]
        scores, out = scores.reshape(a, d, heads * width).to(dtype), out.reshape(a, heads * width, d).to(dtype)
        return _Bound(down, up, scores, out, mask.reshape(a, 1, heads * width), None, True)

    def _gather_notes(self, bus, read) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Padded store rows [A, L], additive mask [A, L] and the seen-any factor, or None if nobody sees one."""
        counts = read.counts.tolist()
        width = max(counts, default=0)
        if width == 0:
            return None
        device = read.indices.device
        slot = torch.arange(width, device=device)  # [L]
        counts_t = read.counts.to(device)
        present = slot[None, :] < counts_t[:, None]  # [A, L]
        flat = torch.where(present, read.offsets[:-1, None] + slot[None, :], 0)  # [A, L] positions in indices
        rows = read.indices[flat]  # [A, L] store rows (padding repeats a visible row, masked)
        zero = torch.zeros((), dtype=self.dtype, device=device)
        mask = torch.where(present, zero, torch.finfo(self.dtype).min)  # [A, L]
        seen = None
        if min(counts) == 0:
            seen = (counts_t > 0).to(self.dtype)[:, None]  # [A, 1]
        return rows, mask, seen

    def layer_delta(self, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer output ``[A, 1, d]`` -> updated hidden state; the reference for anything else."""
        bound = self.bound.get(layer_idx)
        if bound is None or hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.shape[0] != self.rows:
            return self.sidecar.layer_delta(layer_idx, hidden)
        ctx = self.sidecar.context
        if hidden.dtype != self.dtype or ctx is None or ctx.token_mask is not None:
            return self.sidecar.layer_delta(layer_idx, hidden)
        if (ctx.notes is not None) != self.reads_notes:
            return self.sidecar.layer_delta(layer_idx, hidden)
        w = self.folded[layer_idx]
        z = w.activation(torch.bmm(_rms_norm(hidden), bound.down))  # [A, 1, r]
        hidden = torch.baddbmm(hidden, z, bound.up)  # [A, 1, d]: h + up(z)
        if bound.keys is None:
            return hidden
        a, d = hidden.shape[0], hidden.shape[-1]
        if bound.folded:
            scores = torch.baddbmm(bound.mask, _rms_norm(hidden), bound.keys)  # [A, 1, H*L]
            probs = torch.softmax(scores.view(a, w.num_heads, -1), dim=-1, dtype=torch.float32)  # [A, H, L]
            return torch.baddbmm(hidden, probs.to(scores.dtype).view(a, 1, -1), bound.values)  # [A, 1, d]
        h2 = hidden.view(a, d)  # [A, d]
        q = torch.mm(_rms_norm(h2), w.wq_t).view(a * w.num_heads, 1, w.head_dim)  # [A*H, 1, Dh]
        scores = torch.baddbmm(bound.mask, q, bound.keys, alpha=w.head_dim**-0.5)  # [A*H, 1, L]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)  # fp32, as the reference
        att = torch.bmm(probs, bound.values).view(a, -1)  # [A, H*Dh]
        if bound.seen is not None:
            att = att * bound.seen
        return torch.addmm(h2, att, w.wo_t).view(a, 1, d)  # [A, 1, d]: h + Wo att
