"""``pdt eval``: every method on the same prompts and plans, the metrics of DESIGN.md, CIs and paired differences.

Design decisions:

- One *canonical assembly* is scored for every method, so serial fidelity compares like with like: the
  context is one message asking for the whole answer (request + plan as ``## `` headings, through the chat
  template; ``baselines.serial_message``) and the answer is ``## item\\n`` + section + blank line, in plan
  order. Every method's sections enter as its own token ids (trailing special tokens dropped). Fidelity is
  ``metrics.serial_fidelity_batch`` over these ids under the bare trunk.
- A method that chooses its own plan (``pdt-select``, ``MethodRun.plan``) is assembled, contextualised and
  scored for coverage against the plan it kept; its row records that plan under ``plan`` and the selection
  telemetry (every candidate, its scores, why it was kept or dropped) under ``selection``.
- An answer with an *empty* section (``metrics.empty_sections``: no text once special tokens and whitespace
  are stripped) is not scored: its row lists ``empty_sections`` and its quality metrics (``QUALITY``) are
  ``None``, so none of them can be won by writing nothing. ``tokens``, ``seconds`` and ``rollback_rate``
  describe cost and are kept. ``empty_sections`` in the result counts the excluded answers per method.
- Agreement-head calibration needs a *measured* label per judged block. Label 1 ("agrees") when the
  block's mean NLL under the bare trunk reading the canonical assembly serially (the same forward as
  fidelity) is at most ``label_nll`` nats/token. ``label_nll="auto"`` takes the 90th percentile of the
  serial baseline's own blocks (its sections cut into blocks of B tokens): a block agrees when the trunk
  finds it as likely as 90% of what serial decoding itself writes. Only committed blocks have known
  tokens, so ``pdt`` is calibrated on a sample the head itself selected; ``pdt-no-rollback`` commits every
  block and gives the unbiased figure. Rolled-back blocks are counted, unlabelled.
- ``pdt-synthesis`` (the synthesis stream): its conclusion is scored against two references written by the
  bare trunk for the same answer (``baselines.CONCLUSION_SOURCES``): after the sections' text (the quality
  reference) and after the prompt and heading only (nothing to read). *Conclusion fidelity* is fidelity's
  rule applied to the conclusion: the mean NLL of its tokens under the bare trunk reading the canonical
  assembly of the plan plus the ``Conclusion`` heading, with pdt-synthesis's sections and then the conclusion
  (``conclusion_nll``), so all three are read in the same context. Each source gets a bootstrap CI and the
  paired difference ``pdt-synthesis - reference`` over the prompts where both conclusions are non-empty
  (``result["synthesis"]``). The method's own row scores its sections as every other method's.
- Every per-prompt metric gets a percentile-bootstrap 95% interval over prompts (``stats.bootstrap_ci``)
  and, for each method other than ``pdt``, the paired difference ``method - pdt`` over the same prompts
  (``stats.paired_difference``), over the prompts where both methods wrote K non-empty sections (for every
  metric, so a difference never compares different prompt sets). Calibration intervals resample blocks.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..generation.prompts import render_ids
from .baselines import DEFAULT_EVAL_METHODS, EVAL_METHODS, PDT_METHODS, MethodRun, run_method, serial_message
from .metrics import calibration, coverage_text, empty_sections, redundancy, rollback_rate, serial_fidelity_batch
from .prompt_sets import EvalItem
from .stats import bootstrap_ci, paired_difference

__all__ = [
    "METRICS",
    "QUALITY",
    "assemble_ids",
    "evaluate",
    "token_nlls",
    "within_section_repetition",
]

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")

METRICS: dict[str, str] = {
    "fidelity": "serial fidelity: mean NLL (nats/token) of the canonical answer under the bare trunk; lower is closer",
    "redundancy_embedding": "mean over section pairs of the max sentence cosine (all-MiniLM-L6-v2); lower is better",
    "redundancy_ngram4": "share of word 4-grams that also occur in another section; lower is better",
    "repetition_within": "share of word 4-grams repeating an earlier 4-gram of the same section (loops); lower is "
    "better; an addition to DESIGN.md's metrics, which cannot see a stream that repeats itself",
    "coverage_text": "share of plan items whose section holds >= half of the item's content stems",
    "coverage_head": "share of plan items the coverage head scores >= 0.5 (PDT variants only)",
    "rollback_rate": "rolled-back tokens / decoded tokens (multi-stream methods)",
    "tokens": "new tokens kept in the answer (special tokens excluded)",
    "seconds": "wall-clock seconds of the method's generate call (noisy on a shared CPU)",
}
QUALITY = (
    "fidelity",
    "redundancy_embedding",
    "redundancy_ngram4",
    "repetition_within",
    "coverage_text",
    "coverage_head",
)
"""Metrics left ``None`` for an answer with an empty section."""


def assemble_ids(
    tokenizer, plan: Sequence[str], sections: Sequence[Sequence[int]]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Canonical answer ids ``## item\\n`` + section ids + ``\\n\\n`` per item, and each section's ``[start, end)``."""
    ids: list[int] = []
    spans = []
    for i, (item, section) in enumerate(zip(plan, sections)):
        ids += tokenizer(f"## {item}\n", add_special_tokens=False)["input_ids"]
        spans.append((len(ids), len(ids) + len(section)))
        ids += list(section)
        if i < len(plan) - 1:
            ids += tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    return ids, spans


@torch.no_grad()
def token_nlls(trunk: torch.nn.Module, context_ids: Sequence[int], answer_ids: Sequence[int]) -> np.ndarray:
    """Per-token NLL ``[T_answer]`` (nats) of ``answer_ids`` under ``trunk`` reading ``context + answer``."""
    device = next(trunk.parameters()).device
    ids = torch.tensor([list(context_ids) + list(answer_ids)], device=device)  # [1, C + T]
    logits = trunk(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()  # [C + T - 1, V]
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")  # [C + T - 1]
    return nll[len(context_ids) - 1 :].cpu().numpy()


def within_section_repetition(sections: Sequence[str], n: int = 4) -> float:
    """Share of word n-grams (pooled over sections) equal to an earlier n-gram of the same section; 0.0 if none.

    An empty section is refused (``ValueError``), as by the other metrics.
    """
    empty = empty_sections(sections)
    if empty:
        raise ValueError(f"sections {empty} are empty; within_section_repetition does not score such an answer.")
    total = repeated = 0
    for section in sections:
        words = _WORD.findall(section.lower())
        seen: set[tuple[str, ...]] = set()
        for i in range(len(words) - n + 1):
            gram = tuple(words[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def strip_trailing_special(ids: Sequence[int], special: set[int]) -> list[int]:
    ids = list(ids)
    while ids and ids[-1] in special:
        ids.pop()
    return ids


def section_ids_of(tokenizer, run: MethodRun, special: set[int]) -> list[list[int]]:
    if run.section_ids is not None:
        return [strip_trailing_special(ids, special) for ids in run.section_ids]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in run.sections]


def _blocks(run: MethodRun, spans: list[tuple[int, int]], nlls: np.ndarray, prompt_index: int) -> list[dict]:
    """One record per judged block of a PDT run; committed blocks carry their mean NLL."""
    offsets = [0] * len(spans)
    records = []
    for event in run.telemetry["commits"]:
        k, n = event["stream"], event["tokens"]
        record = {
            "method": run.method,
            "prompt": prompt_index,
            "stream": k,
            "round": event["round"],
            "tokens": n,
            "score": event["score"],
            "committed": event["committed"],
            "flagged": event["flagged"],
            "nll": None,
        }
        if event["committed"]:
            start, end = spans[k][0] + offsets[k], min(spans[k][0] + offsets[k] + n, spans[k][1])
            if end > start:
                record["nll"] = float(nlls[start:end].mean())
            offsets[k] += n
        records.append(record)
    return records


def _serial_blocks(spans: list[tuple[int, int]], nlls: np.ndarray, block_size: int) -> list[float]:
    return [
        float(nlls[s : min(s + block_size, end)].mean()) for start, end in spans for s in range(start, end, block_size)
    ]


def _row(run: MethodRun, plan: Sequence[str], fidelity: float, encoder, empty: list[int]) -> dict[str, Any]:
    telemetry = run.telemetry
    row: dict[str, Any] = dict.fromkeys(QUALITY)
    if not empty:
        red = redundancy(run.sections, encoder)
        row.update(
            fidelity=fidelity,
            redundancy_embedding=red["embedding"],
            redundancy_ngram4=red["ngram4"],
            repetition_within=within_section_repetition(run.sections),
            coverage_text=coverage_text(run.sections, plan),
        )
    row.update(
        empty_sections=empty,
        rollback_rate=None,
        tokens=run.tokens,
        decoded=run.decoded,
        seconds=run.seconds,
        sections=run.sections,
        finish_reasons=run.finish_reasons,
    )
    if run.plan is not None:
        row["plan"] = run.plan
    if telemetry is not None and telemetry.get("selection") is not None:
        row["selection"] = telemetry["selection"]  # every candidate with its scores and why it was kept
    if telemetry is not None:
        row["rollback_rate"] = rollback_rate(telemetry["rolled_back_tokens"], max(1, telemetry["decoded_tokens"]))
        if run.method in PDT_METHODS and telemetry["coverage"] and not empty:
            row["coverage_head"] = float(np.mean([c >= 0.5 for c in telemetry["coverage"]]))
    return row


def _calibration(blocks: list[dict], tau: float, seed: int, n_resamples: int = 1000) -> dict[str, Any]:
    labelled = [b for b in blocks if b["label"] is not None]
    rolled_back = sum(not b["committed"] for b in blocks)
    # Unlabelled: rolled-back blocks (tokens unknown) and committed blocks holding only special tokens (EOS).
    out: dict[str, Any] = {"n_rolled_back": rolled_back, "n_unlabelled": len(blocks) - len(labelled)}
    if not labelled:
        return out
    scores = np.array([b["score"] for b in labelled])
    labels = np.array([b["label"] for b in labelled])
    out.update(calibration(scores, labels, threshold=tau))
    out["label_rate"] = float(labels.mean())
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(labelled), len(labelled)) for _ in range(n_resamples)]
    for name in ("ece", "brier"):
        values = [calibration(scores[d], labels[d], threshold=tau)[name] for d in draws]
        out[f"{name}_ci"] = [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]
    return out


def _summaries(prompts: list[dict], methods: Sequence[str], seed: int) -> tuple[dict, dict]:
    summary: dict[str, dict] = {m: {} for m in methods}
    paired: dict[str, dict] = {m: {} for m in methods if m != "pdt"}
    complete = {m: [not p["methods"][m]["empty_sections"] for p in prompts] for m in methods}
    for metric in METRICS:
        values = {m: [p["methods"][m][metric] for p in prompts] for m in methods}
        for m in methods:
            present = [v for v in values[m] if v is not None]
            if present:
                mean, low, high = bootstrap_ci(present, seed=seed)
                summary[m][metric] = {"mean": mean, "low": low, "high": high, "n": len(present)}
        if "pdt" not in methods:
            continue
        for m in paired:
            both = zip(values[m], values["pdt"], complete[m], complete["pdt"])
            pairs = [(a, b) for a, b, ok_a, ok_b in both if ok_a and ok_b and a is not None and b is not None]
            if pairs:
                diff, low, high = paired_difference([a for a, _ in pairs], [b for _, b in pairs], seed=seed)
                paired[m][metric] = {"diff": diff, "low": low, "high": high, "n": len(pairs)}
    return summary, paired


def evaluate(
    model,
    items: Sequence[EvalItem],
    max_new_tokens: int,
    encoder,
    methods: Sequence[str] = DEFAULT_EVAL_METHODS,
    label_nll: float | str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``methods`` on every item and score them; returns the JSON-ready result (see ``report``)."""
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(EVAL_METHODS)}.")
    if label_nll != "auto" and (isinstance(label_nll, str) or not float(label_nll) > 0):
        raise ValueError(f"label_nll={label_nll!r} must be 'auto' or a positive NLL in nats/token, e.g. 2.5.")
    if "pdt-synthesis" in methods and not model.pdt_config.synthesis:
        raise ValueError(
            "method pdt-synthesis needs a sidecar with a synthesis slot, and this one has none (pdt_config.json "
            "synthesis: false); pass --sidecar DIR of a sidecar trained with the synthesis stage (docs/training.md), "
            "or drop pdt-synthesis from --methods."
        )
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    block_size = model.pdt_config.block_size
    prompts, blocks, serial_blocks, conclusions = [], [], [], []
    bar = tqdm(total=len(items) * len(methods), desc="pdt eval", unit="run", disable=not progress)
    for index, item in enumerate(items):
        runs = {}
        for method in methods:
            bar.set_postfix_str(f"prompt {index + 1}/{len(items)} {method}")
            runs[method] = run_method(model, method, item.prompt, item.plan, max_new_tokens, seed=seed)
            bar.update()
        plans = {m: run.plan or item.plan for m, run in runs.items()}  # pdt-select writes the plan it kept
        contexts = {m: render_ids(tok, serial_message(item.prompt, plans[m])) for m in runs}
        assembled = {m: assemble_ids(tok, plans[m], section_ids_of(tok, run, special)) for m, run in runs.items()}
        with model.disable_sidecars():
            fidelity = serial_fidelity_batch(
                model.trunk, None, list(contexts.values()), [a[0] for a in assembled.values()]
            )
            for method, run in runs.items():
                if method == "serial" or method in PDT_METHODS:
                    nlls = token_nlls(model.trunk, contexts[method], assembled[method][0])
                    if method == "serial":
                        serial_blocks += _serial_blocks(assembled[method][1], nlls, block_size)
                    else:
                        blocks += _blocks(run, assembled[method][1], nlls, index)
        rows = {
            m: _row(run, plans[m], f, encoder, empty_sections(run.sections, tok.all_special_tokens))
            for (m, run), f in zip(runs.items(), fidelity)
        }
        prompts.append({"prompt": item.prompt, "plan": item.plan, "plan_source": item.plan_source, "methods": rows})
        if "pdt-synthesis" in runs:
            from .conclusion import synthesis_scores

            scored = synthesis_scores(model, item.prompt, item.plan, runs["pdt-synthesis"], max_new_tokens, seed)
            conclusions.append({"prompt": index, **scored})
    bar.close()

    if label_nll == "auto":
        threshold = float(np.quantile(serial_blocks, 0.9)) if serial_blocks else 2.5
        threshold_source = "90th percentile of serial blocks" if serial_blocks else "fixed (no serial run)"
    else:
        threshold, threshold_source = float(label_nll), "given"
    for block in blocks:
        block["label"] = None if block["nll"] is None else int(block["nll"] <= threshold)
    tau = float(model.pdt_config.agreement_threshold)
    calib = {m: _calibration([b for b in blocks if b["method"] == m], tau, seed) for m in methods if m in PDT_METHODS}
    summary, paired = _summaries(prompts, methods, seed)
    flagged = {m: [i for i, p in enumerate(prompts) if p["methods"][m]["empty_sections"]] for m in methods}
    excluded = {m: {"excluded": len(v), "of": len(prompts), "prompts": v} for m, v in flagged.items()}
    finish = {m: dict(Counter(r for p in prompts for r in p["methods"][m]["finish_reasons"])) for m in methods}
    result = {
        "methods": list(methods),
        "metrics": METRICS,
        "summary": summary,
        "paired_vs_pdt": paired,
        "calibration": calib,
        "label_nll": threshold,
        "label_nll_source": threshold_source,
        "tau": tau,
        "empty_sections": excluded,
        "finish_reasons": finish,
        "prompts": prompts,
        "blocks": blocks,
        "settings": {
            "num_streams": len(items[0].plan) if items else 0,
            "max_new_tokens": max_new_tokens,
            "block_size": block_size,
            "seed": seed,
            "num_prompts": len(items),
        },
    }
    if "pdt-synthesis" in methods:
        from .conclusion import synthesis_summary

        result["synthesis"] = synthesis_summary(conclusions, seed)
    return result
