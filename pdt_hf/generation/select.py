"""Stream selection (SSR's selective parallel module): keep the K best non-redundant of M candidate plan items.

The planner proposes M >= K candidates (the caller's list of M, or an outline of M items from the skeleton
pass); each is scored by the bare trunk and the K kept items become the streams, in candidate order (the
outline's order is the answer's order). The agreement head stays the block-level verifier during decoding.

The score, for candidate i with tokens ``x_i`` (``" " + item + "\\n"``: one complete outline line):

- *Relevance* ``rel_i``: the mean per-token pointwise mutual information between the item and the request,
  ``rel_i = (1/|x_i|) * sum_t [log p(x_i,t | C_req, x_i,<t) - log p(x_i,t | C_null, x_i,<t)]`` (nats/token),
  where ``C_req`` is the outline request of the skeleton pass for K sections (``plan.SKELETON_INSTRUCTION``,
  chat template) followed by ``"1."``, and ``C_null`` is the same text with the request left out. Plain
  length-normalised log-likelihood was tried first and rejected: on SmolLM2-135M it ranks a fluent sentence
  the outline pass wrote (``"<<The Art of Persuasive Writing: A Guide ...>>"``, -1.2 nats/token) far above
  the request's own parts (``"Thesis"``, -3.2), because later tokens of a long string are predictable from
  its start in any context. Subtracting ``C_null`` cancels that and leaves what the request adds: on six
  hand-written pools the request's own parts score 1.1-7.2 nats/token, that sentence 0.8, generic titles
  ("Overview", "Summary") -1.0 to 0.9, an off-topic one -1.5.
- *Redundancy* ``sim_ij``: cosine similarity of the trunk's middle-layer states (``hidden_states[L // 2]``),
  mean-pooled over each item's tokens in the ``C_req`` rows and centred on the pool mean (raw states of one
  trunk all point the same way; centring leaves what tells the candidates apart). The middle layer because
  the last one groups items by surface form: on SmolLM2 (layer 15 of 30) paraphrases score 0.3-0.75 ("Soil
  preparation" / "Preparing the soil" 0.51, "Thesis" / "Thesis Statement" 0.74), unrelated items below 0.25.
- *Greedy MMR*: starting from nothing kept, K times keep the candidate with the largest
  ``gain_i = rel_i - lambda * max(0, max_{j kept} sim_ij)``; ties go to the earlier candidate. ``lambda`` =
  :data:`REDUNDANCY_WEIGHT` = 2 nats/token per unit of cosine: a paraphrase at 0.5 costs 1 nat/token, about
  the relevance gap between two of a request's own parts. Case-insensitive duplicates of an earlier
  candidate are dropped before scoring. (The score and lambda were set on six hand-written pools; see
  docs/evaluation.md.)

Every candidate is recorded (:meth:`Selection.to_dict`, telemetry ``selection``) with its log-likelihoods,
relevance, redundancy against the kept set, gain, and why it was kept or dropped: ``duplicate`` (of an earlier
candidate), ``redundant`` (its relevance alone would have beaten a kept item, the penalty dropped it; the
kept item it is most similar to is named), or ``less relevant``.

Cost: per context (``C_req``, ``C_null``) one prefill of the context and one batched forward of all M items
over the repeated cache (right padded), and the logit head only at the scored item positions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedTokenizerBase

from ..sidecars.heads.layer import masked_mean
from ..trunk.architectures import base_model, trunk_logits
from ..trunk.compat import cache_kwargs, output_cache
from .plan import SKELETON_INSTRUCTION, PlanError
from .prompts import render_ids

__all__ = ["REDUNDANCY_WEIGHT", "Selection", "greedy_select", "score_candidates", "scoring_rows", "select_plan"]

REDUNDANCY_WEIGHT = 2.0
"""lambda: nats/token of relevance a candidate loses per unit of cosine similarity to a kept one."""

ITEM_LEAD = "1."
"""Text after the outline request and before the item (which follows with a space, as BPE tokenizers split
``"1. Thesis"``): every candidate is scored as the outline's first line."""


def _outline_ids(tokenizer: PreTrainedTokenizerBase, request: str, num_streams: int) -> list[int]:
    message = SKELETON_INSTRUCTION.format(prompt=request.strip(), k=num_streams).strip()
    return render_ids(tokenizer, message) + tokenizer(ITEM_LEAD, add_special_tokens=False)["input_ids"]


def scoring_rows(
    tokenizer: PreTrainedTokenizerBase, prompt: str, candidates: Sequence[str], num_streams: int
) -> tuple[list[int], list[int], list[list[int]]]:
    """``(C_req ids, C_null ids, item ids per candidate)``; an item's ids are ``" " + item + "\\n"``."""
    items = [tokenizer(f" {c}\n", add_special_tokens=False)["input_ids"] for c in candidates]
    return _outline_ids(tokenizer, prompt, num_streams), _outline_ids(tokenizer, "", num_streams), items


@torch.no_grad()
def _items_after(
    trunk: torch.nn.Module, context: list[int], items: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill ``context`` once, then all M items in one batched forward over the repeated cache.

    Returns the mean log-probability per item token ``[M]`` and the middle layer's state mean-pooled over each
    item's tokens without the closing newline ``[M, d]``. Items are right padded, so positions are ``P + t``::

        context  [c c c c c]            (one row, prefilled once)
        item 0             [x x x \\n] <- hidden at c_last, x, x, x predicts x, x, x, \\n
        item 1             [x \\n . .]    (padding masked, never scored)
    """
    stack, device, m = base_model(trunk), next(trunk.parameters()).device, len(items)
    out = stack(input_ids=torch.tensor([context], device=device), use_cache=True, **cache_kwargs(DynamicCache()))
    cache = output_cache(out)
    cache.batch_repeat_interleave(m)
    last = out.last_hidden_state[:, -1:].expand(m, -1, -1)  # [M, 1, d]: predicts each item's first token
    lengths = torch.tensor([len(x) for x in items], device=device)  # [M]
    width = int(lengths.max())
    ids = torch.zeros(m, width, dtype=torch.long, device=device)  # [M, T]
    for i, x in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x, device=device)
    valid = torch.arange(width, device=device)[None] < lengths[:, None]  # [M, T]
    mask = torch.cat([torch.ones(m, len(context), dtype=torch.long, device=device), valid.long()], dim=1)
    positions = (len(context) + torch.arange(width, device=device)).expand(m, -1)  # [M, T]
    out = stack(
        input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True, **cache_kwargs(cache)
    )
    before = torch.cat([last, out.last_hidden_state[:, :-1]], dim=1)  # [M, T, d]: state before each item token
    logits = trunk_logits(trunk, before[valid][None])[0].float()  # [nnz, V], only the scored positions
    token_logprobs = logits.log_softmax(-1).gather(-1, ids[valid][:, None]).squeeze(-1)  # [nnz]
    rows = torch.arange(m, device=device).repeat_interleave(lengths)  # [nnz]
    mean_logprob = torch.zeros(m, device=device).index_add_(0, rows, token_logprobs) / lengths
    middle = out.hidden_states[len(out.hidden_states) // 2].float()  # [M, T, d]
    pooled_mask = valid & (torch.arange(width, device=device)[None] < (lengths - 1).clamp(min=1)[:, None])
    pooled = masked_mean(middle, pooled_mask)  # [M, d]
    return mean_logprob, pooled


def score_candidates(
    trunk: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    candidates: Sequence[str],
    num_streams: int,
) -> dict[str, torch.Tensor]:
    """Score M candidates -> ``log_likelihood`` / ``null_log_likelihood`` / ``relevance`` ``[M]`` (nats/token),
    ``similarity`` ``[M, M]`` (centred middle-layer cosine) and ``tokens`` ``[M]``.

    Two contexts (``C_req``, ``C_null``), each prefilled once with all M items batched after it.
    """
    request, null, items = scoring_rows(tokenizer, prompt, candidates, num_streams)
    log_likelihood, states = _items_after(trunk, request, items)
    null_log_likelihood, _ = _items_after(trunk, null, items)
    states = F.normalize(states - states.mean(0, keepdim=True), dim=-1)  # [M, d], centred on the pool
    return {
        "log_likelihood": log_likelihood.cpu(),
        "null_log_likelihood": null_log_likelihood.cpu(),
        "relevance": (log_likelihood - null_log_likelihood).cpu(),
        "similarity": (states @ states.T).cpu(),  # [M, M]
        "tokens": torch.tensor([len(x) for x in items]),
    }


def greedy_select(
    relevance: Sequence[float], similarity: Sequence[Sequence[float]], k: int, weight: float = REDUNDANCY_WEIGHT
) -> list[int]:
    """Greedy MMR over the candidates (module docstring): the picked indices, in pick order.

    Deterministic: the largest gain wins, ties go to the lower index.
    """
    if not 1 <= k <= len(relevance):
        raise ValueError(f"cannot keep k={k} of {len(relevance)} candidates; k must lie in [1, {len(relevance)}].")
    picked: list[int] = []
    for _ in range(k):
        best, best_gain = -1, float("-inf")
        for i in range(len(relevance)):
            if i in picked:
                continue
            red = max((similarity[i][j] for j in picked), default=0.0)
            gain = relevance[i] - weight * max(0.0, red)
            if best < 0 or gain > best_gain:  # a NaN gain never wins, but something is always picked
                best, best_gain = i, gain
        picked.append(best)
    return picked


@dataclass
class Selection:
    """The outcome of one selection: the kept plan and a record per candidate."""

    plan: list[str]
    """Kept items, in candidate order (K of them)."""
    candidates: list[dict[str, Any]]
    num_streams: int
    source: str
    """``"plan"`` (the caller's list) or ``"outline"`` (the skeleton pass)."""
    redundancy_weight: float = REDUNDANCY_WEIGHT
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_candidates": len(self.candidates),
            "num_streams": self.num_streams,
            "redundancy_weight": self.redundancy_weight,
            "plan": self.plan,
            "seconds": self.seconds,
            "candidates": self.candidates,
        }


def select_plan(
    trunk: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    candidates: Sequence[str],
    num_streams: int,
    *,
    source: str = "plan",
    redundancy_weight: float = REDUNDANCY_WEIGHT,
) -> Selection:
    """Keep ``num_streams`` of ``candidates`` (score and rule in the module docstring); ``trunk`` must be bare.

    Raises :class:`PlanError` when fewer than ``num_streams`` distinct candidates remain after duplicates.
    """
    start = time.perf_counter()
    first: dict[str, int] = {}
    duplicate_of: dict[int, int] = {}
    for i, item in enumerate(candidates):
        key = " ".join(item.lower().split())
        if key in first:
            duplicate_of[i] = first[key]
        else:
            first[key] = i
    distinct = [i for i in range(len(candidates)) if i not in duplicate_of]
    if len(distinct) < num_streams:
        raise PlanError(
            f"only {len(distinct)} distinct candidates in {list(candidates)} but {num_streams} streams to fill; "
            "give at least num_streams different plan candidates, or lower num_streams."
        )
    scores = score_candidates(trunk, tokenizer, prompt, [candidates[i] for i in distinct], num_streams)
    relevance, similarity = scores["relevance"].tolist(), scores["similarity"].tolist()
    picked = greedy_select(relevance, similarity, num_streams, redundancy_weight)
    kept_rel = min(relevance[p] for p in picked)
    records: list[dict[str, Any]] = []
    for i, item in enumerate(candidates):
        record: dict[str, Any] = {"index": i, "item": item, "kept": False, "pick": None, "similar_to": None}
        if i in duplicate_of:
            record.update(reason="duplicate", similar_to=duplicate_of[i])
            records.append(record)
            continue
        row = distinct.index(i)
        rank = picked.index(row) if row in picked else None
        before = picked[:rank] if rank is not None else picked  # the kept set this candidate was judged against
        closest = max(before, key=lambda p: (similarity[row][p], -p), default=None)
        red = similarity[row][closest] if closest is not None else 0.0
        if rank is not None:
            record.update(kept=True, pick=rank + 1, reason="kept")
        else:
            record["reason"] = "redundant" if relevance[row] >= kept_rel and red > 0 else "less relevant"
        if closest is not None:
            record["similar_to"] = distinct[closest]
        record.update(
            tokens=int(scores["tokens"][row]),
            log_likelihood=float(scores["log_likelihood"][row]),
            null_log_likelihood=float(scores["null_log_likelihood"][row]),
            relevance=relevance[row],
            redundancy=red,
            score=relevance[row] - redundancy_weight * max(0.0, red),
        )
        records.append(record)
    plan = [candidates[distinct[p]] for p in sorted(picked)]
    return Selection(plan, records, num_streams, source, redundancy_weight, seconds=time.perf_counter() - start)
