"""Validation: KD with notes visible vs ablated, and choosing tau (``agreement_threshold``) for the agreement head.

Design decisions:
- Evaluation reads the notes a decoder would publish (``student`` mode, whatever the training mode) and runs
  three variants of every row in one forward: true sibling notes, no notes at all, and sibling block notes
  from another example (``shuffled``). KD and LM are token means over the split.
- A block is *divergent* when its mean KL to the teacher (with true notes) exceeds
  ``train.agreement_divergence``; the agreement head should send it back. A decoder rolls a block back when
  its score is below tau, so tau is chosen on the calibration split to best separate divergent blocks
  (``f1`` of the rollback decision, or ``youden``: recall minus false-rollback rate); ties keep the smaller tau.
- The reachable ceiling (:func:`ceiling_closed`) is the bare trunk's KD on the same tokens; shares of it are
  ratios of token sums with a bootstrap over examples.
- Precision/recall are reported for the rollback decision against the measured divergence.
- A rollback costs a block of decoding, so it must be worth acting on: :func:`rollback_pays` keeps the chosen tau
  only when the rollback decision's precision beats the divergent base rate by a clear margin, judged by the
  lower end of its 95% Wilson interval (``precision_low - base_rate >= calibration.min_precision_gain``).
  Otherwise calibration writes tau = 0 (rollback off; the head is still scored) and says so in the summary.
- Gain labels (``pdt calibrate-rollback``, ``training.rollback_gain``): a block's gain is NLL(original) -
  NLL(regenerated) under the lag-consistent teacher, and rolling it back *pays* when ``gain > rollback_cost``
  (``calibration.rollback_cost``, nats/token), so the label and the net benefit use one number. tau maximises
  ``benefit(tau) = sum over blocks with score < tau of (gain - cost)`` among the taus that roll back at most
  ``calibration.max_rollback_share`` of the blocks (ties keep the smaller tau); it is 0 (rollback off) when no
  tau has a positive benefit, and when the decision fails :func:`rollback_pays` against the gain labels: one
  rule for both kinds of labels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..sidecars.context import DenseNotes
from .batch import TrainBatch
from .losses import note_alignment_loss
from .objective import PDTObjective, block_notes, block_states, concat_notes

__all__ = [
    "agreement_report",
    "ceiling_closed",
    "choose_rollback_threshold",
    "choose_threshold",
    "evaluate_split",
    "gain_decision_report",
    "net_benefit",
    "rollback_labels",
    "rollback_pays",
    "wilson_interval",
]

VARIANTS = ("notes", "no_notes", "shuffled")


@torch.no_grad()
def evaluate_split(
    objective: PDTObjective, examples: list[dict], make_batch: Callable[[list[dict]], TrainBatch], chunk: int = 4
) -> dict:
    """Token-mean KD/LM per variant, note alignment, coverage accuracy, and per-block agreement scores/labels."""
    sums = {f"{m}_{v}": 0.0 for m in ("kd", "lm") for v in VARIANTS}
    per_example: dict[str, list[float]] = {"tokens": [], **{f"kd_{v}": [] for v in VARIANTS}}
    tokens = blocks = 0
    notes_mse = cov_hits = cov_total = 0.0
    scores, agree, divergence = [], [], []
    heads = objective.sidecar.heads
    for start in range(0, len(examples), chunk):
        batch = make_batch(examples[start : start + chunk])
        n, r = len(batch.stream_ids), batch.num_blocks
        prefix = objective.prefix_kv(batch)
        planner, note_blocks, valid = objective.note_pass(batch, prefix, mode="student")
        true = objective.build_notes(batch, planner, note_blocks, valid)
        none = DenseNotes(true.notes, true.note_round, torch.zeros_like(true.note_valid), true.query_round, true.lag)
        shuffled = objective.build_notes(batch, planner, note_blocks, valid, ablate="shuffle")
        rows = torch.arange(n, device=batch.stream_ids.device).repeat(len(VARIANTS))
        hidden = objective.run_rows(batch, rows, concat_notes(true, none, shuffled), prefix)
        kd_tok, lm_tok = objective.token_losses(batch, hidden, rows)
        mask = batch.section_mask.repeat(len(VARIANTS), 1).float()
        count = float(batch.section_mask.sum())
        by_example = torch.zeros(batch.num_examples, n, device=mask.device)
        by_example[batch.example_index, torch.arange(n)] = 1.0  # [E, N] rows of each example
        per_example["tokens"] += (by_example @ batch.section_mask.float().sum(1)).tolist()
        for i, v in enumerate(VARIANTS):
            sums[f"kd_{v}"] += float((kd_tok * mask)[i * n : (i + 1) * n].sum())
            sums[f"lm_{v}"] += float((lm_tok * mask)[i * n : (i + 1) * n].sum())
            per_example[f"kd_{v}"] += (by_example @ (kd_tok * mask)[i * n : (i + 1) * n].sum(1).float()).tolist()
        tokens += count
        states = block_states(hidden[:n], batch.query_round, r)
        note_pred = block_notes(heads.notes, hidden[:n], batch.query_round, r).mean(2)
        has = batch.block_has_state
        notes_mse += float(note_alignment_loss(note_pred, batch.note_targets, has)) * float(has.sum())
        blocks += float(has.sum())
        plan_rows = planner.view(batch.num_examples, batch.num_streams, -1)[batch.example_index]
        cov = heads.coverage(note_pred.flatten(0, 1), plan_rows.repeat_interleave(r, 0)).view(n, r, -1)
        cov_mask = has.unsqueeze(-1).expand_as(cov)
        cov_hits += float((((cov > 0).float() == batch.coverage) & cov_mask).sum())
        cov_total += float(cov_mask.sum())
        logits, labels, div = objective.agreement_logits(batch, kd_tok[:n], states, note_pred, cov, true)
        scores.append(logits.sigmoid()[has].float().cpu())
        agree.append(labels[has].cpu())
        divergence.append(div[has].float().cpu())
    report = {k: v / max(tokens, 1.0) for k, v in sums.items()}
    report.update(
        examples=len(examples),
        tokens=int(tokens),
        blocks=int(blocks),
        notes_mse=notes_mse / max(blocks, 1.0),
        coverage_accuracy=cov_hits / max(cov_total, 1.0),
    )
    report["kd_gain_from_notes"] = report["kd_no_notes"] - report["kd_notes"]
    report["per_example"] = per_example
    report["agreement_scores"] = torch.cat(scores) if scores else torch.zeros(0)
    report["agreement_labels"] = torch.cat(agree) if agree else torch.zeros(0)
    report["block_divergence"] = torch.cat(divergence) if divergence else torch.zeros(0)
    return report


def ceiling_closed(report: dict, bare: dict, seed: int = 0) -> dict[str, list[float]]:
    """Shares of the reachable ceiling closed, each ``[share, low, high]`` (95% bootstrap over examples).

    The ceiling is the bare trunk's KD to the teacher on the same tokens (``bare``: :func:`evaluate_split` with
    the sidecar detached). With the lag-consistent teacher it is all reachable: the teacher differs from the bare
    trunk only by the sibling blocks a stream can see. ``notes`` is what reading true notes closes beyond reading
    none, ``notes_vs_shuffled`` beyond reading another example's, ``total`` what the sidecar closes in all.
    """
    from ..evaluation.stats import ratio_ci

    mine, ref = report["per_example"], bare["per_example"]["kd_notes"]
    pairs = {
        "notes": [a - b for a, b in zip(mine["kd_no_notes"], mine["kd_notes"])],
        "notes_vs_shuffled": [a - b for a, b in zip(mine["kd_shuffled"], mine["kd_notes"])],
        "total": [a - b for a, b in zip(ref, mine["kd_notes"])],
    }
    return {name: list(ratio_ci(values, ref, seed=seed)) for name, values in pairs.items()}


def agreement_report(scores: torch.Tensor, agree: torch.Tensor, tau: float) -> dict[str, float]:
    """Rollback decision ``score < tau`` vs measured divergence (``agree == 0``): precision, recall, F1, rates."""
    rollback = scores < tau
    divergent = agree < 0.5
    tp = float((rollback & divergent).sum())
    fp = float((rollback & ~divergent).sum())
    fn = float((~rollback & divergent).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    negatives = float((~divergent).sum())
    return {
        "tau": float(tau),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_rollback_rate": fp / negatives if negatives else 0.0,
        "rollback_rate": float(rollback.float().mean()) if len(scores) else 0.0,
        "divergent_rate": float(divergent.float().mean()) if len(scores) else 0.0,
        "blocks": int(len(scores)),
    }


def choose_threshold(scores: torch.Tensor, agree: torch.Tensor, objective: str = "f1") -> float:
    """tau in [0, 1] maximising ``objective`` of the rollback decision on these blocks."""
    if scores.numel() == 0:
        raise ValueError("no blocks to calibrate tau on; build a larger calibration split.")
    values = torch.unique(scores.float())
    candidates = torch.cat([torch.zeros(1), (values[1:] + values[:-1]) / 2, values, torch.ones(1)]).unique()
    best, best_tau = -1.0, 0.0
    for tau in candidates.tolist():
        rep = agreement_report(scores, agree, tau)
        value = rep["f1"] if objective == "f1" else rep["recall"] - rep["false_rollback_rate"]
        if value > best + 1e-12:
            best, best_tau = value, tau
    return float(min(max(best_tau, 0.0), 1.0))


def wilson_interval(successes: float, trials: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``successes / trials`` (``(0, 1)`` for no trials)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def rollback_pays(report: dict[str, float], min_precision_gain: float) -> dict[str, float | bool]:
    """Whether the rollback decision of ``report`` (from :func:`agreement_report`) is worth acting on.

    Returns ``{"pays", "precision", "precision_low", "base_rate", "gain_low", "min_precision_gain"}``; ``pays``
    is ``precision_low - base_rate >= min_precision_gain`` (the decision must beat rolling back at random).
    """
    rolled = report["rollback_rate"] * report["blocks"]
    low, _ = wilson_interval(report["precision"] * rolled, rolled)
    gain = low - report["divergent_rate"]
    return {
        "pays": bool(rolled > 0 and gain >= min_precision_gain),
        "precision": report["precision"],
        "precision_low": low,
        "base_rate": report["divergent_rate"],
        "gain_low": gain,
        "min_precision_gain": min_precision_gain,
    }


def _check(scores, gains, cost: float) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    g = _check_gains(gains, cost)
    if s.size == 0 or s.size != g.size:
        raise ValueError(f"got {s.size} scores and {g.size} gains; pass one score and one gain per block.")
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(
            f"scores span [{float(s.min())!r}, {float(s.max())!r}]; pass agreement scores in [0, 1] (after sigmoid)."
        )
    return s, g


def _check_gains(gains, cost: float) -> np.ndarray:
    g = np.asarray(gains, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(g)):
        raise ValueError("gains hold NaN or inf; every block needs a finite NLL(original) - NLL(regenerated).")
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0.0 <= cost < float("inf"):
        raise ValueError(f"rollback_cost={cost!r} must be a finite number >= 0 nats/token, e.g. 0.05.")
    return g


def rollback_labels(gains, cost: float) -> np.ndarray:
    """bool ``[N]``: rolling the block back pays, ``gain > cost``."""
    return _check_gains(gains, cost) > cost


def net_benefit(scores, gains, tau: float, cost: float) -> float:
    """``sum(gain - cost)`` over the blocks rolled back at ``tau`` (``score < tau``), nats/token summed."""
    s, g = _check(scores, gains, cost)
    return float((g[s < tau] - cost).sum())


def _candidates(s: np.ndarray) -> list[float]:
    """0 (nothing rolled back) and one tau per distinct score, just above it (midway to the next one or to 1)."""
    values = np.unique(s)
    above = np.append(values[1:], 1.0)
    taus = [float((a + b) / 2) for a, b in zip(values, above) if a < 1.0]
    return [0.0, *taus]


def choose_rollback_threshold(
    scores, gains, cost: float, max_share: float, min_precision_gain: float
) -> dict[str, object]:
    """tau with the largest net benefit within the rollback budget, else 0 (module docstring).

    Returns ``{"tau", "candidate_tau", "net_benefit", "rollback_share", "reason", "rollback_decision", ...}``:
    ``candidate_tau`` is the best tau before the ``rollback_pays`` check, ``tau`` the one to store.
    """
    s, g = _check(scores, gains, cost)
    if not (isinstance(max_share, (int, float)) and 0.0 < max_share <= 1.0):
        raise ValueError(f"max_rollback_share={max_share!r} must be in (0, 1], e.g. 0.25 (a quarter of the blocks).")
    if not (isinstance(min_precision_gain, (int, float)) and 0.0 <= min_precision_gain <= 1.0):
        raise ValueError(f"min_precision_gain={min_precision_gain!r} must be in [0, 1], e.g. 0.1.")
    best_tau, best = 0.0, 0.0
    for tau in _candidates(s):
        rolled = s < tau
        if rolled.mean() > max_share + 1e-12:
            break  # candidates are increasing, so the share only grows
        value = float((g[rolled] - cost).sum())
        if value > best + 1e-12:
            best_tau, best = tau, value
    pays = g > cost
    decision = rollback_pays(
        agreement_report(torch.tensor(s), torch.tensor(~pays).float(), best_tau), min_precision_gain
    )
    if best_tau == 0.0:
        tau, reason = 0.0, "no tau within the budget has a positive net benefit: rollback off"
    elif not decision["pays"]:
        tau = 0.0
        reason = (
            f"tau {best_tau:.3f} has a positive net benefit but its precision's lower bound "
            f"{decision['precision_low']:.3f} does not beat the base rate {decision['base_rate']:.3f} by "
            f"{min_precision_gain}: rollback off"
        )
    else:
        tau, reason = best_tau, f"tau {best_tau:.3f}: net benefit {best:.3f} over {s.size} blocks"
    return {
        "tau": float(tau),
        "candidate_tau": float(best_tau),
        "net_benefit": best,
        "net_benefit_per_block": best / s.size,
        "rollback_share": float((s < best_tau).mean()),
        "reason": reason,
        "rollback_decision": decision,
        "rollback_cost": float(cost),
        "max_rollback_share": float(max_share),
        "min_precision_gain": float(min_precision_gain),
    }


def gain_decision_report(scores, gains, tau: float, cost: float) -> dict[str, object]:
    """The rollback decision ``score < tau`` against the gain labels (``gain > cost``) of the same blocks.

    Precision/recall/F1 of "roll back" against "rollback pays", the rollback and paying shares, the mean gain
    (of all and of the rolled-back blocks), the net benefit, and the ECE (10 bins, bins for a reliability plot)
    and Brier score of ``1 - score`` as the probability that rolling the block back pays.
    """
    from ..evaluation.metrics import calibration

    s, g = _check(scores, gains, cost)
    pays = g > cost
    rep = agreement_report(torch.tensor(s), torch.tensor(~pays).float(), tau)
    rolled = s < tau
    cal = calibration(1.0 - s, pays.astype(int), n_bins=10)
    return {
        "blocks": int(s.size),
        "tau": float(tau),
        "precision": rep["precision"],
        "recall": rep["recall"],
        "f1": rep["f1"],
        "rollback_share": float(rolled.mean()),
        "pays_share": float(pays.mean()),
        "gain_positive_share": float((g > 0).mean()),
        "mean_gain": float(g.mean()),
        "mean_gain_rolled_back": float(g[rolled].mean()) if rolled.any() else None,
        "net_benefit": float((g[rolled] - cost).sum()),
        "ece": cal["ece"],
        "brier": cal["brier"],
        "bins": {k: cal[k] for k in ("bin_counts", "bin_confidence", "bin_accuracy")},
    }
