"""Refit the agreement head on rollback-gain labels: what ``pdt calibrate-rollback --fit-head`` does.

The head is trained in the curriculum on divergence labels (does the block agree with the teacher?), while a
rollback pays only when the regenerated block is better (``training.rollback_gain``). This refits the head's
output layer on the measured gains of one prompt set, keeping the layers below as trained::

    inputs  HEAD_INPUTS, recorded as the head read them          -> hidden = head.hidden(inputs)   [N, H]
    label   commit (y = 1) when gain <= cost, else roll back      weight |gain - cost| (mean 1)
    fit     min_w,b  sum_i weight_i * BCE(hidden_i . w + b, y_i) + l2 * |w - w_0|^2        (convex, L-BFGS)

Design decisions:
- The weights make the fit a convex surrogate of the net benefit ``sum over rolled-back blocks of (gain - cost)``:
  a wrong decision costs ``|gain - cost|``, so blocks near the cost barely count and large gains or losses
  dominate, as they do in the benefit tau is chosen by.
- Only the output layer moves, pulled towards its trained value by ``l2``: a few hundred blocks with a few dozen
  paying ones cannot refit the 280k weights below without memorising them: even the 256 output weights, pulled
  weakly (l2 = 0.01), reach AUC 0.94 on the fit set and 0.54 on validation (docs/evaluation.md).
- The fit set must be neither the set tau is chosen on nor the held-out set; the command enforces that.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import WEIGHTS_NAME, atomic_write
from ..sidecars.heads.config import HeadsConfig
from ..sidecars.heads.layer import AgreementHead
from .calibration import rollback_labels
from .rollback_gain import HEAD_INPUTS, RollbackGainRecords

__all__ = ["fit_agreement_head", "load_agreement_head", "rescore", "save_agreement_head"]

PREFIX = "heads.agreement."


def load_agreement_head(sidecar_dir: str, records: RollbackGainRecords) -> AgreementHead:
    """The sidecar's agreement head in float32, sized from its weights and the records' note width."""
    state = {
        k[len(PREFIX) :]: v.float()
        for k, v in load_file(os.path.join(sidecar_dir, WEIGHTS_NAME)).items()
        if k.startswith(PREFIX)
    }
    if not state:
        raise ValueError(f"{sidecar_dir!r} holds no {PREFIX}* weights; pass a PDT sidecar folder.")
    d_note = records.inputs["notes_summary"].shape[-1]
    width, d_in = state["mlp.0.weight"].shape
    head = AgreementHead(d_in - 2 * d_note - 1, d_note, HeadsConfig(hidden_size=width))
    head.load_state_dict(state)
    return head.eval()


@torch.no_grad()
def rescore(head: AgreementHead, records: RollbackGainRecords) -> RollbackGainRecords:
    """A copy of ``records`` whose ``score`` is ``head``'s sigmoid on the recorded inputs."""
    scores = head(*(records.inputs[name].float() for name in HEAD_INPUTS)).sigmoid().tolist()
    blocks = [{**block, "score": float(s)} for block, s in zip(records.blocks, scores)]
    return dataclasses.replace(records, blocks=blocks)


def fit_agreement_head(
    head: AgreementHead, records: RollbackGainRecords, cost: float, l2: float = 1.0
) -> tuple[AgreementHead, dict[str, float]]:
    """``(refitted copy of head, fit summary)``: the output layer fitted on ``records``' gains (module docstring)."""
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not 0.0 <= l2 < float("inf"):
        raise ValueError(f"l2={l2!r} must be a finite number >= 0, e.g. 1.0.")
    if not records.blocks:
        raise ValueError("no blocks to fit the agreement head on; measure more prompts (--fit-limit).")
    gains = records.array("gain")
    pays = rollback_labels(gains, cost)
    weight = np.abs(gains - cost)
    if not weight.sum() > 0:
        raise ValueError(f"every gain equals the rollback cost {cost}; the blocks carry no label to fit.")
    fitted = copy.deepcopy(head).double()
    with torch.no_grad():
        hidden = fitted.hidden(*(records.inputs[name].double() for name in HEAD_INPUTS))  # [N, H]
    y = torch.tensor(~pays, dtype=torch.float64)  # 1: commit
    w = torch.tensor(weight / weight.mean(), dtype=torch.float64)
    out = fitted.mlp[-1]
    w0 = out.weight.detach().clone()
    params = [out.weight, out.bias]
    optimiser = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        logits = (hidden @ out.weight.T + out.bias).squeeze(-1)
        return (w * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum() + l2 * (
            (out.weight - w0) ** 2
        ).sum()

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(objective())
    optimiser.step(closure)
    with torch.no_grad():
        after = float(objective())
    summary = {
        "blocks": len(gains),
        "paying": int(pays.sum()),
        "l2": float(l2),
        "loss_before": before,
        "loss_after": after,
    }
    return fitted.float().eval(), summary


def save_agreement_head(sidecar_dir: str, head: AgreementHead) -> str:
    """Replace the agreement head's tensors in ``sidecar_dir/sidecar.safetensors`` (dtype kept, atomic)."""
    path = os.path.join(sidecar_dir, WEIGHTS_NAME)
    state = load_file(path)
    for name, value in head.state_dict().items():
        key = PREFIX + name
        if key not in state or state[key].shape != value.shape:
            raise ValueError(f"{path} has no tensor {key} of shape {tuple(value.shape)}; is it this head's sidecar?")
        state[key] = value.to(state[key].dtype).contiguous()

    def write(tmp: str) -> None:
        save_file(state, tmp, metadata={"format": "pt"})
        shutil.copymode(path, tmp)  # the temporary file is private; keep the weights' permissions

    atomic_write(path, write)
    return path
