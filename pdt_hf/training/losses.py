"""Loss terms of the curriculum, as pure functions over tensors (each logged on its own).

Design decisions:
- KD uses only the teacher's top-k log-probs. The teacher's distribution is coarse-grained into the k kept
  tokens plus one "rest" bucket (1 - their mass), and so is the student's; KD is the exact KL between these
  (k + 1)-bucket distributions: >= 0, and 0 iff the student matches the teacher on the kept tokens and on the
  total remaining mass.
- Every loss is a masked mean whose denominator is clamped, so an empty mask gives 0 with a graph that still
  reaches the parameters (DDP needs a gradient, even a zero one, for every trainable parameter).
- The note-usage term is a hinge on per-block KD: with true sibling notes KD must beat KD with ablated notes by
  a margin, weighted by how much the teacher's own distribution depended on sibling content there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "agreement_labels",
    "block_means",
    "masked_bce",
    "masked_mean",
    "note_alignment_loss",
    "section_cross_entropy",
    "topk_bucket_kl",
    "usage_hinge",
]

_EPS = 1e-8


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (same shape, bool) is true; 0 (still in the graph) if none is."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def topk_bucket_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the teacher's top-k tokens plus a rest bucket.

    Args:
        teacher_logp: ``[..., k]`` teacher log-probs of its top-k tokens.
        student_logp: ``[..., k]`` student log-probs (full-vocabulary softmax) of the same tokens.
    Returns:
        ``[...]`` KL in nats.
    """
    teacher_logp = teacher_logp.float()
    student_logp = student_logp.float()
    p = teacher_logp.exp()
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - student_logp.exp().sum(-1)).clamp(min=_EPS)
    kept = (p * (teacher_logp - student_logp)).sum(-1)
    rest = p_rest * (p_rest.clamp(min=_EPS).log() - q_rest.log())
    return kept + rest


def section_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token CE ``[N, S]`` of logits ``[N, S, V]`` that predict ``labels`` ``[N, S]`` (already shifted:
    ``logits[:, i]`` is computed at the position before token ``i``); label -100 gives 0."""
    flat = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return flat.view(labels.shape)


def block_means(values: torch.Tensor, block: torch.Tensor, num_blocks: int, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` ``[N, S]`` per block: ``block`` ``[N, S]`` holds 1-based block ids -> ``[N, num_blocks]``.

    Positions where ``mask`` is false are ignored; empty blocks give 0.
    """
    n = values.shape[0]
    index = (block - 1).clamp(min=0, max=max(num_blocks - 1, 0))
    weights = mask.to(values.dtype)
    sums = values.new_zeros(n, num_blocks).scatter_add(1, index, values * weights)
    counts = values.new_zeros(n, num_blocks).scatter_add(1, index, weights)
    return sums / counts.clamp(min=1.0)


def note_alignment_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error ``[..., d]`` vs ``[..., d]`` averaged over coordinates and the ``valid`` ``[...]`` rows."""
    per_row = (pred.float() - target.float()).pow(2).mean(-1)
    return masked_mean(per_row, valid)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged where ``valid``."""
    per = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return masked_mean(per, valid)


def agreement_labels(block_divergence: torch.Tensor, threshold: float) -> torch.Tensor:
    """1.0 (agree: commit) where a block's mean KL to the teacher is <= ``threshold`` nats/token, else 0.0."""
    return (block_divergence <= threshold).float()


def usage_hinge(kd_true: torch.Tensor, kd_ablated: torch.Tensor, weight: torch.Tensor, margin: float) -> torch.Tensor:
    """``sum w * relu(margin + kd_true - kd_ablated) / sum w`` over blocks (all ``[N, nb]``).

    ``weight`` is the teacher's measured dependence on sibling content (0 where none, e.g. the first section).
    """
    hinge = F.relu(margin + kd_true - kd_ablated)
    weight = weight.to(hinge.dtype)
    return (weight * hinge).sum() / weight.sum().clamp(min=_EPS)
