"""One curriculum step's losses for a batch: the module the trainer hands to accelerate (DDP).

Design decisions:
- Only the sidecar is a registered child, so DDP/FSDP wrapping, broadcasting and ``.to()`` touch sidecar
  parameters only; the frozen trunk is held as a plain attribute and never synchronised or saved.
- Exactly one trunk forward with gradients per step (the *main pass*). Everything else runs under ``no_grad``:
  the bare-trunk prefix pass and the trunk part of the *note pass* that produces the notes siblings publish.
  With a stage's ``note_grad`` the notes and planner heads on the note pass's states keep their graph, so the
  KD of the rows that read those notes trains the heads that wrote them; the trunk pass stays graph-free, so
  this costs two small head backwards and is the same under checkpointing. When the usage term is
  on, the rows with true notes and the rows with ablated notes are concatenated into that one forward, so the
  sidecar context the hooks read is the same in a checkpointed recompute as in the forward.
- Prefix reuse: each example's shared prompt prefix is run once by the bare trunk (no sidecar) and its KV,
  left padded, is the past of every stream row; with checkpointing or sliding-window layers the rows carry the
  prefix tokens themselves instead (``sidecar_mask`` off there). Both give the same numbers; see the tests.
- Sibling notes: ``student`` mode takes the notes head on the student's own sibling block states from a
  no-notes note pass (what a decoder publishes, one pass deep); ``teacher`` mode uses the projected teacher
  targets. Planner notes always come from the student's planner head on the stream suffix, which reads no
  notes (in decoding the prompt is prefilled before any note exists).
- Synthesis losses (``synthesis_lm``/``synthesis_kd``, a stage of their own): the main pass is then the
  synthesis rows, one per example (adapter slot ``num_streams``, prompt part read by the bare trunk), reading
  every note its K streams published (planner notes and every block note of the note pass, no lag, no window,
  as ``NoteBus.read_synthesis`` in decoding), scored against the teacher's conclusion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from ..modeling import PDTForCausalLM
from ..sidecars.context import DenseNotes
from ..sidecars.heads.layer import NotesHead, chunk_means
from ..trunk.architectures import base_model, trunk_logits
from ..trunk.compat import cache_kwargs
from .batch import TrainBatch
from .config import LoopConfig
from .curriculum import SYNTHESIS_LOSSES
from .losses import (
    agreement_labels,
    block_means,
    masked_bce,
    masked_mean,
    note_alignment_loss,
    section_cross_entropy,
    topk_bucket_kl,
    usage_hinge,
)
from .notes import ablate_block_notes, row_notes, visible_summary
from .rounds import NO_NOTES_ROUND

__all__ = ["PDTObjective", "PrefixKV", "block_notes", "block_states", "concat_notes"]


@dataclass
class PrefixKV:
    """Left-padded prefix keys/values per layer ``[E, H, P, D]``, mask ``[E, P]`` and lengths ``[E]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    lengths: torch.Tensor


def block_states(hidden: torch.Tensor, query_round: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Mean of ``hidden`` ``[N, S, d]`` over the positions computed in each round 1..R -> ``[N, R, d]``."""
    rounds = torch.arange(1, num_blocks + 1, device=hidden.device)
    member = (query_round.unsqueeze(-1) == rounds).to(hidden.dtype)  # [N, S, R]
    sums = torch.einsum("nsr,nsd->nrd", member, hidden)
    return sums / member.sum(1).unsqueeze(-1).clamp(min=1.0)


def block_notes(
    notes_head: NotesHead, hidden: torch.Tensor, query_round: torch.Tensor, num_blocks: int
) -> torch.Tensor:
    """The notes each round's block publishes, ``[N, R, M, d_note]``, as ``NotesHead.publish`` gives them in
    decoding (the block's tokens are the positions computed in that round)."""
    rounds = torch.arange(1, num_blocks + 1, device=hidden.device)
    member = query_round.unsqueeze(-1) == rounds  # [N, S, R]
    return notes_head.from_states(chunk_means(hidden, member, notes_head.notes_per_block))


class PDTObjective(nn.Module):
    """``forward(batch, weights, notes_visible)`` -> dict of loss terms, metrics and the weighted ``loss``."""

    def __init__(self, model: PDTForCausalLM, loop: LoopConfig, reuse_prefix: bool, pad_id: int) -> None:
        super().__init__()
        self.sidecar = model.sidecar
        self.__dict__["model"] = model  # not a registered child: DDP must not see the trunk
        self.loop = loop
        self.reuse_prefix = reuse_prefix
        self.pad_id = pad_id

    # ------------------------------------------------------------------ trunk passes
    @torch.no_grad()
    def prefix_kv(self, batch: TrainBatch) -> PrefixKV | None:
        """Run each example's shared prefix through the bare trunk once (None when prefixes are not reused)."""
        if not self.reuse_prefix:
            return None
        model, device = self.model, batch.stream_input.device
        width = max(len(p) for p in batch.prefix_ids)
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        mask = torch.zeros(batch.num_examples, width, dtype=torch.long, device=device)
        with model.disable_sidecars():
            for e, prefix in enumerate(batch.prefix_ids):
                cache = DynamicCache()
                ids = torch.tensor([prefix], dtype=torch.long, device=device)
                base_model(model.trunk)(input_ids=ids, use_cache=True, **cache_kwargs(cache))
                pad = width - len(prefix)
                mask[e, pad:] = 1
                for i, layer in enumerate(cache.layers):
                    if e == 0:
                        keys.append([])
                        values.append([])
                    keys[i].append(nn.functional.pad(layer.keys, (0, 0, pad, 0)))  # [1, H, P, D]
                    values[i].append(nn.functional.pad(layer.values, (0, 0, pad, 0)))
        lengths = torch.tensor([len(p) for p in batch.prefix_ids], dtype=torch.long, device=device)
        return PrefixKV([torch.cat(k) for k in keys], [torch.cat(v) for v in values], mask, lengths)

    def run_rows(
        self,
        batch: TrainBatch,
        rows: torch.Tensor,
        notes: DenseNotes | None,
        prefix: PrefixKV | None,
        width: int | None = None,
    ) -> torch.Tensor:
        """Last hidden states ``[len(rows), S', d]`` of the stream parts of ``rows`` (``S' = width or S``)."""
        model, device = self.model, batch.stream_input.device
        width = width or batch.stream_input.shape[1]
        ids = batch.stream_input[rows, :width]
        examples = batch.example_index[rows]
        if notes is not None:
            notes = dataclasses.replace(notes, query_round=notes.query_round[:, :width])
        if prefix is not None:
            cache = DynamicCache()
            for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
                cache.update(k[examples], v[examples], i)
            mask = torch.cat([prefix.mask[examples], torch.ones_like(ids)], dim=1)  # [N', P + S']
            positions = prefix.lengths[examples].unsqueeze(1) + torch.arange(width, device=device)
            model.set_context(batch.stream_ids[rows], len(rows), notes, device)
            out = base_model(model.trunk)(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **cache_kwargs(cache)
            )
            return out.last_hidden_state
        offsets = torch.tensor([len(batch.prefix_ids[e]) for e in examples.tolist()], device=device)
        total = int(offsets.max()) + width
        full = torch.full((len(rows), total), self.pad_id, dtype=torch.long, device=device)
        index = offsets.unsqueeze(1) + torch.arange(width, device=device)  # [N', S'] stream part in the full row
        for i, e in enumerate(examples.tolist()):
            full[i, : offsets[i]] = torch.tensor(batch.prefix_ids[e], device=device)
        full.scatter_(1, index, ids)
        token_mask = torch.zeros_like(full, dtype=torch.bool).scatter_(1, index, True)
        if notes is not None:
            q = torch.full_like(full, NO_NOTES_ROUND).scatter_(1, index, notes.query_round)
            notes = dataclasses.replace(notes, query_round=q)
        model.set_context(batch.stream_ids[rows], len(rows), notes, device, token_mask)
        hidden = base_model(model.trunk)(input_ids=full, use_cache=False).last_hidden_state  # [N', T, d]
        return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    # ------------------------------------------------------------------ notes
    def suffix_mask(self, batch: TrainBatch, width: int) -> torch.Tensor:
        return torch.arange(width, device=batch.suffix_len.device) < batch.suffix_len.unsqueeze(1)

    def note_pass(
        self, batch: TrainBatch, prefix: PrefixKV | None, mode: str | None = None, grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Notes siblings publish: planner ``[N, d_note]``, block notes ``[N, R, M, d_note]``, validity ``[N, R]``.

        ``mode`` is ``student`` or ``teacher`` (default: ``train.sibling_notes``). The trunk pass never keeps a
        graph; with ``grad`` the planner and notes heads on its states do, so a loss on the rows that read these
        notes trains the heads that wrote them (end to end, as the bus probe needs)."""
        heads, rows = self.sidecar.heads, torch.arange(len(batch.stream_ids), device=batch.stream_ids.device)
        teacher = (mode or self.loop.sibling_notes) == "teacher"
        with torch.no_grad():
            width = int(batch.suffix_len.max()) if teacher else None
            hidden = self.run_rows(batch, rows, None, prefix, width)
            width = hidden.shape[1]
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            if teacher:  # every published note of a block is the block's target
                m = heads.notes.notes_per_block
                blocks = batch.note_targets.unsqueeze(2).expand(-1, -1, m, -1)
            else:
                blocks = block_notes(heads.notes, hidden, batch.query_round, batch.num_blocks)
            planner = heads.planner(hidden, self.suffix_mask(batch, width), batch.stream_ids)
        return planner, blocks, batch.block_has_state

    def build_notes(
        self,
        batch: TrainBatch,
        planner: torch.Tensor,
        blocks: torch.Tensor,
        valid: torch.Tensor,
        ablate: str | None = None,
    ) -> DenseNotes:
        """Dense notes of every row; ``ablate`` (``shuffle``/``drop``) replaces the sibling block notes."""
        e, k = batch.num_examples, batch.num_streams
        planner = planner.view(e, k, -1).float()
        blocks, valid = blocks.reshape(e, k, *blocks.shape[1:]).float(), valid.view(e, k, -1)  # [E, K, R, M, d]
        if ablate:
            blocks, valid = ablate_block_notes(blocks, valid, ablate)
        cfg = self.model.pdt_config
        return row_notes(
            planner,
            blocks,
            valid,
            batch.example_index,
            batch.stream_ids,
            batch.query_round,
            cfg.note_lag,
            cfg.read_own_notes,
        )

    # ------------------------------------------------------------------ losses
    def forward(
        self, batch: TrainBatch, weights: dict[str, float], notes_visible: bool, note_grad: bool = False
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of one batch; ``note_grad`` keeps the sibling notes' graph to the heads that wrote them."""
        if set(weights) & set(SYNTHESIS_LOSSES):
            return self.synthesis_forward(batch, weights, note_grad)
        heads, n, r = self.sidecar.heads, len(batch.stream_ids), batch.num_blocks
        prefix = self.prefix_kv(batch)
        notes = planner_in = None
        usage = "usage" in weights and notes_visible
        rows = torch.arange(n, device=batch.stream_ids.device)
        if notes_visible:
            planner_in, blocks, valid = self.note_pass(batch, prefix, grad=note_grad)
            notes = self.build_notes(batch, planner_in, blocks, valid)
            if usage:
                ablated = self.build_notes(batch, planner_in, blocks, valid, ablate=self.loop.ablation)
                notes = concat_notes(notes, ablated)
                rows = torch.cat([rows, rows])
        hidden = self.run_rows(batch, rows, notes, prefix)  # [N or 2N, S, d]
        true_hidden = hidden[:n]
        states = block_states(true_hidden, batch.query_round, r)  # [N, R, d]
        note_pred = block_notes(heads.notes, true_hidden, batch.query_round, r).mean(2)  # [N, R, d_note]
        out: dict[str, torch.Tensor] = {}
        if "notes" in weights:
            out["notes"] = note_alignment_loss(note_pred, batch.note_targets, batch.block_has_state)
        planner = None
        if {"planner", "coverage", "agreement"} & set(weights):
            planner = heads.planner(true_hidden, self.suffix_mask(batch, hidden.shape[1]), batch.stream_ids)
        if "planner" in weights:
            out["planner"] = note_alignment_loss(planner, batch.section_targets, batch.section_has_state)
        if "speculation" in weights:
            spec = heads.speculation(note_pred[:, :-1].detach())
            valid = batch.block_has_state[:, :-1] & batch.block_has_state[:, 1:]
            out["speculation"] = note_alignment_loss(spec, batch.note_targets[:, 1:], valid)
        kd_tok = None
        if {"lm", "kd", "usage", "agreement"} & set(weights):
            kd_tok, lm_tok = self.token_losses(batch, hidden, rows)
            if "lm" in weights:
                out["lm"] = masked_mean(lm_tok[:n], batch.section_mask)
            if "kd" in weights or "usage" in weights:
                out["kd"] = masked_mean(kd_tok[:n], batch.section_mask)
            if usage:
                out["kd_ablated"] = masked_mean(kd_tok[n:], batch.section_mask).detach()
                per_block = [block_means(x, batch.pred_block, r, batch.section_mask) for x in (kd_tok[:n], kd_tok[n:])]
                dep = block_means(batch.dependence, batch.pred_block, r, batch.section_mask) * batch.block_exists
                out["usage"] = usage_hinge(per_block[0], per_block[1], dep, self.loop.usage_margin)
        if {"coverage", "agreement"} & set(weights):
            plan_in = planner_in if planner_in is not None else planner
            plan_rows = plan_in.detach().view(batch.num_examples, batch.num_streams, -1)[batch.example_index]
            cov_logits = heads.coverage(note_pred.detach().flatten(0, 1), plan_rows.repeat_interleave(r, dim=0)).view(
                n, r, -1
            )  # [N, R, K]
            if "coverage" in weights:
                cov_valid = batch.block_has_state.unsqueeze(-1).expand_as(cov_logits)
                out["coverage"] = masked_bce(cov_logits, batch.coverage, cov_valid)
            if "agreement" in weights:
                out.update(self._agreement(batch, kd_tok[:n], states, note_pred, cov_logits, notes))
        total = sum(weights[name] * out[name] for name in weights if name in out)
        out["loss"] = total
        return out

    # ------------------------------------------------------------------ the synthesis stream
    def synthesis_notes(self, batch: TrainBatch, grad: bool = False, drop: bool = False) -> DenseNotes:
        """Every note of each example's K streams for its synthesis row: ``notes [E, K (1 + R), d_note]``.

        Planner notes first, then every block note, all visible to every token (no lag); ``drop`` marks all
        invalid (the no-notes reference: SNC then gives an exact zero)."""
        e, k, r = batch.num_examples, batch.num_streams, batch.num_blocks
        planner, blocks, valid = self.note_pass(batch, self.prefix_kv(batch), grad=grad)
        m = blocks.shape[2]
        blocks = blocks.reshape(e, k, r * m, -1)  # a block's M notes in a row, as the bus stores them
        valid = valid.view(e, k, r).repeat_interleave(m, dim=2)
        notes = torch.cat([planner.view(e, k, 1, -1), blocks], dim=2).float()  # [E, K, 1 + R M, d]
        valid = torch.cat([torch.ones_like(valid[..., :1]), valid], dim=2)  # [E, K, 1 + R M]
        valid = valid.flatten(1) & (not drop)  # [E, K (1 + R M)]
        return DenseNotes(notes=notes.flatten(1, 2), note_valid=valid)

    def synthesis_token_losses(self, batch: TrainBatch, notes: DenseNotes | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token KD and LM CE ``[E, C]`` of the synthesis rows reading ``notes`` (None: no notes)."""
        if batch.synthesis_input is None:
            raise ValueError(
                "the synthesis losses need the teacher's conclusions in the batch: load the split with "
                "data.synthesis.load_synthesis (run `pdt data synthesis --config <recipe.yaml>` first)."
            )
        model, device = self.model, batch.synthesis_input.device
        e = batch.synthesis_input.shape[0]
        streams = torch.full((e,), model.pdt_config.synthesis_stream, dtype=torch.long, device=device)
        model.set_context(streams, e, notes, device, batch.synthesis_mask)
        hidden = base_model(model.trunk)(input_ids=batch.synthesis_input, use_cache=False).last_hidden_state
        pos = batch.synthesis_pred_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        logits = trunk_logits(model.trunk, hidden.gather(1, pos))  # [E, C, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        kd_tok = topk_bucket_kl(batch.synthesis_kd_logprobs, logp.gather(-1, batch.synthesis_kd_ids))
        return kd_tok, section_cross_entropy(logits, batch.synthesis_labels)

    def synthesis_forward(self, batch: TrainBatch, weights: dict[str, float], note_grad: bool) -> dict:
        """The synthesis stage's losses: the synthesis rows' KD and LM on the teacher's conclusion."""
        kd_tok, lm_tok = self.synthesis_token_losses(batch, self.synthesis_notes(batch, grad=note_grad))
        mask = batch.synthesis_labels != -100
        out = {"synthesis_kd": masked_mean(kd_tok, mask), "synthesis_lm": masked_mean(lm_tok, mask)}
        out["loss"] = sum(weights[name] * out[name] for name in weights if name in out)
        return out

    def token_losses(
        self, batch: TrainBatch, hidden: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token KD and LM CE ``[N', L]`` for every forwarded row."""
        width = hidden.shape[-1]
        pos = batch.pred_pos[rows].unsqueeze(-1).expand(-1, -1, width)
        logits = trunk_logits(self.model.trunk, hidden.gather(1, pos))  # [N', L, V]
        logp = torch.log_softmax(logits.float(), dim=-1)
        kd_tok = topk_bucket_kl(batch.kd_logprobs[rows], logp.gather(-1, batch.kd_ids[rows]))
        return kd_tok, section_cross_entropy(logits, batch.labels[rows])

    def agreement_logits(
        self,
        batch: TrainBatch,
        kd_tok: torch.Tensor,
        states: torch.Tensor,
        note_pred: torch.Tensor,
        cov_logits: torch.Tensor,
        notes: DenseNotes | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Agreement logits ``[N, R]``, labels from the measured per-block divergence to the teacher (never
        random) and that divergence (nats/token) ``[N, R]``."""
        n, r = states.shape[:2]
        divergence = block_means(kd_tok.detach(), batch.pred_block, r, batch.section_mask)  # [N, R]
        if notes is not None:
            true_notes = DenseNotes(notes.notes[:n], notes.note_round[:n], notes.note_valid[:n], None, notes.lag)
            summary = visible_summary(true_notes, r)
        else:
            summary = note_pred.new_zeros(n, r, note_pred.shape[-1])
        own = batch.stream_ids.view(n, 1, 1).expand(n, r, 1)
        coverage = cov_logits.detach().sigmoid().gather(-1, own).squeeze(-1)  # [N, R] own plan item, as decoding
        logits = self.sidecar.heads.agreement(
            states.detach().flatten(0, 1), summary.flatten(0, 1), coverage.flatten(), note_pred.detach().flatten(0, 1)
        ).view(n, r)
        return logits, agreement_labels(divergence, self.loop.agreement_divergence), divergence

    def _agreement(
        self,
        batch: TrainBatch,
        kd_tok: torch.Tensor,
        states: torch.Tensor,
        note_pred: torch.Tensor,
        cov_logits: torch.Tensor,
        notes: DenseNotes | None,
    ) -> dict[str, torch.Tensor]:
        logits, labels, _ = self.agreement_logits(batch, kd_tok, states, note_pred, cov_logits, notes)
        valid = batch.block_has_state
        agree = ((logits > 0).float() == labels).float()
        return {
            "agreement": masked_bce(logits, labels, valid),
            "agreement_acc": masked_mean(agree, valid).detach(),
            "disagree_rate": masked_mean(1.0 - labels, valid).detach(),
        }


def concat_notes(*parts: DenseNotes) -> DenseNotes:
    """Stack the rows of several :class:`DenseNotes` (same M and lag)."""
    return DenseNotes(
        notes=torch.cat([p.notes for p in parts]),
        note_round=torch.cat([p.note_round for p in parts]),
        note_valid=torch.cat([p.note_valid for p in parts]),
        query_round=torch.cat([p.query_round for p in parts]),
        lag=parts[0].lag,
    )
