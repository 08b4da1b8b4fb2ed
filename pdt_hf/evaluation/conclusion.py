"""Scoring the synthesis stream's conclusion (``pdt eval`` method ``pdt-synthesis``) against two references.

For the same answer (pdt-synthesis's K sections) three conclusions are written (``baselines.CONCLUSION_SOURCES``):
the synthesis stream's, from notes only; the bare trunk's after the prompt, the plan and the sections' text
(the quality reference, the serial teacher of ``pdt data synthesis``); the bare trunk's after the prompt, the
plan and the heading only (nothing to read: what the synthesis stream has besides its notes).

*Conclusion fidelity* applies DESIGN.md's serial fidelity to the conclusion: the mean NLL of its tokens under
the bare trunk reading the canonical context (request + plan + ``Conclusion`` as ``## `` headings) and the
canonical assembly of the same sections, then ``## Conclusion`` and the conclusion (``evaluate.assemble_ids``,
``evaluate.token_nlls``). The context is the same for all three, so differences are the conclusions' own. Each
source gets a percentile-bootstrap CI over prompts, and each reference the paired difference
``pdt-synthesis - reference`` (``stats.paired_difference``) over the prompts where both are non-empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..generation.prompts import SYNTHESIS_HEADING, render_ids
from .baselines import CONCLUSION_SOURCES, MethodRun, run_conclusion, serial_message
from .evaluate import assemble_ids, section_ids_of, strip_trailing_special, token_nlls
from .stats import bootstrap_ci, paired_difference

__all__ = ["conclusion_nll", "synthesis_scores", "synthesis_summary"]


def conclusion_nll(
    trunk: torch.nn.Module,
    tokenizer,
    prompt: str,
    plan: Sequence[str],
    sections: Sequence[Sequence[int]],
    conclusion: Sequence[int],
) -> float:
    """Conclusion fidelity: mean NLL (nats/token) of ``conclusion`` under ``trunk`` reading the canonical context of
    ``plan`` + the conclusion heading and the assembled ``sections``, then ``## Conclusion`` (``assemble_ids``)."""
    items = [*plan, SYNTHESIS_HEADING]
    context = render_ids(tokenizer, serial_message(prompt, items))
    ids, spans = assemble_ids(tokenizer, items, [*sections, conclusion])
    start, end = spans[-1]
    return float(token_nlls(trunk, context, ids)[start:end].mean())


@torch.no_grad()
def synthesis_scores(model, prompt: str, plan: Sequence[str], run: MethodRun, max_new_tokens: int, seed: int) -> dict:
    """Every conclusion source for ``run`` (a ``pdt-synthesis`` run): its text, tokens and conclusion fidelity.

    A conclusion with no text once special tokens are dropped is not scored (``nll`` None)."""
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    sections = section_ids_of(tok, run, special)
    ids = {"pdt-synthesis": list(run.synthesis_ids or [])}
    for source in CONCLUSION_SOURCES[1:]:
        ids[source] = run_conclusion(model, source, prompt, plan, run.sections, max_new_tokens, seed)
    out = {}
    with model.disable_sidecars():
        for source, written in ids.items():
            kept = strip_trailing_special(written, special)
            text = tok.decode(kept, skip_special_tokens=True).strip()
            nll = conclusion_nll(model.trunk, tok, prompt, plan, sections, kept) if text else None
            out[source] = {"text": text, "tokens": len(kept), "nll": nll}
    return out


def synthesis_summary(rows: list[dict], seed: int) -> dict:
    """Bootstrap CI of conclusion fidelity per source, paired ``pdt-synthesis - reference`` per reference."""
    summary, paired = {}, {}
    for source in CONCLUSION_SOURCES:
        values = [r[source]["nll"] for r in rows if r[source]["nll"] is not None]
        if values:
            mean, low, high = bootstrap_ci(values, seed=seed)
            summary[source] = {"mean": mean, "low": low, "high": high, "n": len(values)}
        tokens = [r[source]["tokens"] for r in rows]
        if tokens and source in summary:
            summary[source]["tokens"] = float(np.mean(tokens))
    for reference in CONCLUSION_SOURCES[1:]:
        pairs = [
            (r["pdt-synthesis"]["nll"], r[reference]["nll"])
            for r in rows
            if r["pdt-synthesis"]["nll"] is not None and r[reference]["nll"] is not None
        ]
        if pairs:
            diff, low, high = paired_difference([a for a, _ in pairs], [b for _, b in pairs], seed=seed)
            paired[reference] = {"diff": diff, "low": low, "high": high, "n": len(pairs)}
    return {
        "metric": "conclusion fidelity: mean NLL (nats/token) of the conclusion under the bare trunk reading the "
        "canonical assembly of the same sections; lower is closer",
        "sources": list(CONCLUSION_SOURCES),
        "summary": summary,
        "paired_vs_pdt_synthesis": paired,
        "prompts": rows,
    }
