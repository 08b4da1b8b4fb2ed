"""Markdown tables and PNG plots of a ``pdt eval`` result; JSON writing shared with ``pdt bench``.

Design decisions:

- Cells read ``mean [low, high]`` (95% percentile bootstrap over prompts), with ``(n=...)`` when fewer
  answers than prompts were scored (empty sections, or a metric a method does not have). Paired differences are
  ``method - pdt`` on the same prompts; a ``*`` marks an interval that excludes 0.
- Below the tables: how many answers per method were not scored for an empty section (and which prompts),
  and how the sections ended (end of turn or the N-token budget).
- Plots use matplotlib's Agg backend (no display needed): one bar chart per metric with the interval as
  error bars, and a reliability diagram of the agreement head per PDT variant.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

__all__ = ["eval_markdown", "plot_calibration", "plot_eval", "write_json"]

_PLOTTED = (
    "fidelity",
    "redundancy_embedding",
    "redundancy_ngram4",
    "repetition_within",
    "coverage_text",
    "coverage_head",
    "rollback_rate",
    "tokens",
)
_DIGITS = {"tokens": ".0f", "seconds": ".1f"}


def write_json(data: Any, path: str) -> str:
    """Write ``data`` as indented JSON (NaN/inf become null), creating the folder."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(clean(data), handle, indent=1)
    return path


def _cell(stat: dict | None, spec: str, total: int | None = None) -> str:
    if not stat:
        return "–"
    fewer = f" (n={stat['n']})" if total is not None and stat.get("n", total) < total else ""
    return f"{format(stat['mean'], spec)} [{format(stat['low'], spec)}, {format(stat['high'], spec)}]{fewer}"


def _diff(stat: dict | None, spec: str) -> str:
    if not stat:
        return "–"
    mark = "*" if stat["low"] > 0 or stat["high"] < 0 else ""
    return f"{format(stat['diff'], '+' + spec)} [{format(stat['low'], '+' + spec)}, {format(stat['high'], '+' + spec)}]{mark}"


def eval_markdown(result: dict, header: str = "") -> str:
    """The eval tables: metrics per method, paired differences vs ``pdt``, agreement-head calibration."""
    methods, summary = result["methods"], result["summary"]
    total = result.get("settings", {}).get("num_prompts")
    lines = [header] if header else []
    lines += ["| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for metric in result["metrics"]:
        spec = _DIGITS.get(metric, ".3f")
        lines.append(f"| {metric} | " + " | ".join(_cell(summary[m].get(metric), spec, total) for m in methods) + " |")
    paired = result["paired_vs_pdt"]
    if paired:
        others = list(paired)
        lines += [
            "",
            "Paired differences, method − pdt over the same prompts (95% bootstrap CI; * excludes 0):",
            "",
            "| metric | " + " | ".join(others) + " |",
            "|---|" + "---|" * len(others),
        ]
        for metric in result["metrics"]:
            spec = _DIGITS.get(metric, ".3f")
            lines.append(f"| {metric} | " + " | ".join(_diff(paired[m].get(metric), spec) for m in others) + " |")
    calib = result["calibration"]
    if calib:
        lines += [
            "",
            f"Agreement head (tau = {result['tau']:.2f}); label 1 = block mean NLL under the serial trunk "
            f"<= {result['label_nll']:.3f} nats/token ({result['label_nll_source']}):",
            "",
            "| method | labelled blocks | label=1 rate | ECE [95% CI] | Brier [95% CI] | precision@tau "
            "| recall@tau | rolled back | other unlabelled (EOS only) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, c in calib.items():
            if "ece" not in c:
                lines.append(
                    f"| {method} | 0 | – | – | – | – | – | {c['n_rolled_back']} | "
                    f"{c['n_unlabelled'] - c['n_rolled_back']} |"
                )
                continue
            ece = f"{c['ece']:.3f} [{c['ece_ci'][0]:.3f}, {c['ece_ci'][1]:.3f}]"
            brier = f"{c['brier']:.3f} [{c['brier_ci'][0]:.3f}, {c['brier_ci'][1]:.3f}]"
            lines.append(
                f"| {method} | {c['n']} | {c['label_rate']:.2f} | {ece} | {brier} | {c['precision']:.2f} "
                f"| {c['recall']:.2f} | {c['n_rolled_back']} | {c['n_unlabelled'] - c['n_rolled_back']} |"
            )
    lines += _synthesis_lines(result.get("synthesis"))
    lines += _empty_and_finish_lines(result)
    return "\n".join(lines) + "\n"


def _synthesis_lines(synthesis: dict | None) -> list[str]:
    """Conclusion fidelity per source and pdt-synthesis - reference (``evaluation.conclusion``), if it ran."""
    if not synthesis:
        return []
    summary, paired = synthesis["summary"], synthesis["paired_vs_pdt_synthesis"]
    lines = [
        "",
        "Conclusion of the same answer (pdt-synthesis's sections): conclusion fidelity, mean NLL (nats/token) of "
        "the conclusion under the bare trunk reading the canonical assembly, lower is closer (95% bootstrap CI):",
        "",
        "| source | conclusion fidelity | tokens | paired pdt-synthesis − source |",
        "|---|---|---|---|",
    ]
    for source in synthesis["sources"]:
        stat = summary.get(source)
        tokens = f"{stat['tokens']:.1f}" if stat and "tokens" in stat else "–"
        diff = _diff(paired.get(source), ".3f") if source in paired else "–"
        lines.append(f"| {source} | {_cell(stat, '.3f')} | {tokens} | {diff} |")
    return lines


def _empty_and_finish_lines(result: dict) -> list[str]:
    """Answers excluded for an empty section, and how sections ended, per method."""
    lines: list[str] = []
    empty = result.get("empty_sections")
    if empty:
        parts = [
            f"{m} {e['excluded']} of {e['of']}"
            + (f" (prompts {', '.join(map(str, e['prompts']))})" if e["prompts"] else "")
            for m, e in empty.items()
        ]
        lines += [
            "",
            "Answers with an empty section, not scored (quality metrics None; paired differences use only prompts "
            "where both methods wrote every section): " + "; ".join(parts) + ".",
        ]
    finish = result.get("finish_reasons")
    if finish:
        parts = [
            f"{m} {c.get('eos', 0)} end of turn / {c.get('length', 0)} at the budget"
            + "".join(f" / {c[r]} {r}" for r in sorted(set(c) - {"eos", "length"}))
            for m, c in finish.items()
        ]
        lines += ["", "Sections ending: " + "; ".join(parts) + "."]
    return lines


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_eval(result: dict, path: str, title: str = "") -> str:
    """Bar chart per metric (mean, 95% CI error bars) for every method; writes ``path`` (PNG)."""
    plt = _figure()
    methods, summary = result["methods"], result["summary"]
    metrics = [m for m in _PLOTTED if any(summary[x].get(m) for x in methods)]
    cols = 4
    rows = max(1, -(-len(metrics) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for axis, metric in zip(axes.flat, metrics):
        stats = [summary[m].get(metric) for m in methods]
        x = np.arange(len(methods))
        means = np.array([s["mean"] if s else np.nan for s in stats])
        err = np.array(
            [[s["mean"] - s["low"] if s else 0 for s in stats], [s["high"] - s["mean"] if s else 0 for s in stats]]
        )
        axis.bar(x, means, yerr=err, capsize=3, color=[colors[i % len(colors)] for i in range(len(methods))])
        axis.set_xticks(x, methods, rotation=40, ha="right", fontsize=7)
        axis.set_title(metric, fontsize=9)
        axis.grid(axis="y", alpha=0.3)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.axis("off")
    return save_figure(fig, path, title)


def save_figure(fig, path: str, title: str = "", dpi: int = 110) -> str:
    """Add the title, lay out, write ``path`` (creating its folder) and close the figure."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _figure().close(fig)
    return path


def plot_calibration(result: dict, path: str, title: str = "") -> str:
    """Reliability diagram (label rate against mean score per bin) and score histogram per PDT variant."""
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect")
    scores_by = {}
    for method, c in result["calibration"].items():
        if "bin_confidence" not in c:
            continue
        pts = [(x, y) for x, y in zip(c["bin_confidence"], c["bin_accuracy"]) if x is not None]
        if pts:
            left.plot(*zip(*pts), marker="o", label=f"{method} (ECE {c['ece']:.3f})")
        scores_by[method] = [b["score"] for b in result["blocks"] if b["method"] == method]
    left.axvline(result["tau"], color="red", lw=0.8, ls=":", label=f"tau = {result['tau']:.2f}")
    left.set(
        xlabel="agreement score (bin mean)",
        ylabel="share of blocks with label 1",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="reliability",
    )
    left.legend(fontsize=7)
    bins = np.linspace(0, 1, 21)
    for method, scores in scores_by.items():
        right.hist(scores, bins=bins, histtype="step", lw=1.5, label=method)
    right.axvline(result["tau"], color="red", lw=0.8, ls=":")
    right.set(xlabel="agreement score", ylabel="judged blocks", title="score histogram (incl. rolled back)")
    right.legend(fontsize=7)
    return save_figure(fig, path, title)
