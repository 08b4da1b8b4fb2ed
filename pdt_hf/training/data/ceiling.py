"""``pdt data ceiling``: how much of the teacher's sibling dependence a parallel stream could reach through notes.

For every block of every section of a split's prompts, three teacher distributions over the **same** section
tokens (the teacher is the recipe's: the trunk or ``data.build.teacher``):

- (a) *serial*: section k read after the prompt, the plan and the whole of sections 0..k-1 (``serial_message``);
- (b) *lag-consistent*: block r read after the prompt, the plan and the sibling blocks of rounds <= r - Δ as
  text (``generation.text_bus``), the stream's own earlier blocks as the assistant's text so far;
- (c) *isolated*: the student's stream message alone (no sibling content).

Reported per section index, per round and overall: KL(b ‖ c), the *reachable gain* (what sibling content a
stream can see at that lag changes in the teacher); KL(a ‖ c), the serial teacher's sibling dependence (what the
``serial`` data set's ``sibling_dependence`` approximates over top-k buckets); KL(a ‖ b), the part of the serial
target no stream can reach. KLs are exact over the full vocabulary, nats per token.

Design decisions:
- The sections come from one writer (``--writer serial``: the serial teacher, today's data; ``lag``: the lag
  teacher), with the plans the teacher writes for ``pdt data build``, so all three distributions score the same
  tokens.
- Statistics: a prompt's value in a cell (section k, round r, or all) is the mean over its tokens there; the table
  shows the mean over prompts with a 95% percentile-bootstrap interval over prompts (``evaluation.stats``).
- Log-probs ``[S, V]`` are computed a few prompts at a time and reduced to per-token KLs at once, so memory does
  not grow with the split.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...evaluation.stats import bootstrap_ci
from ...generation.prompts import render_ids, stream_message
from ...generation.text_bus import check_lag, round_contexts
from ..rounds import num_blocks, predicted_blocks
from .builder import load_teacher, write_lag, write_plans, write_serial
from .config import SPLITS
from .plan import serial_message
from .sources import load_prompts, split_prompts

__all__ = ["KL_NAMES", "ceiling_markdown", "measure_ceiling", "plot_ceiling", "run_ceiling_command", "summarize"]

KL_NAMES = {
    "kl_lag_iso": "KL(lag ‖ isolated): reachable gain",
    "kl_serial_iso": "KL(serial ‖ isolated): serial sibling dependence",
    "kl_serial_lag": "KL(serial ‖ lag): unreachable part",
}


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    """Per-token ``KL(p ‖ q)`` ``[S]`` of log-prob rows ``[S, V]``."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0).double().numpy()


def score_three(teacher, prompts, plans, sections, block_size: int, lag: int, batch_rows: int) -> list[dict]:
    """Per-token KLs of every section: ``[{prompt, section, round, kl_*}]`` rows (token-level, numpy arrays)."""
    tok = teacher.tokenizer
    records = []
    for i, (prompt, plan, secs) in enumerate(zip(prompts, plans, sections)):
        nbs = [num_blocks(len(s), block_size) for s in secs]
        texts = [tok.decode(s, skip_special_tokens=True) for s in secs]
        serial = [[render_ids(tok, serial_message(prompt, plan, k, texts[:k]))] * nb for k, nb in enumerate(nbs)]
        isolated = [[render_ids(tok, stream_message(prompt, plan, item))] * nb for item, nb in zip(plan, nbs)]
        lagged = round_contexts(tok, prompt, plan, secs, lag, block_size)
        logp = {}
        for name, ctxs in (("serial", serial), ("lag", lagged), ("iso", isolated)):
            logp[name] = teacher.round_logprobs(ctxs, [list(s) for s in secs], block_size, batch_rows)
        for k, sec in enumerate(secs):
            if not sec:
                continue
            a, b, c = logp["serial"][k], logp["lag"][k], logp["iso"][k]
            records.append(
                {
                    "prompt": i,
                    "section": k,
                    "round": np.array(predicted_blocks(len(sec), block_size)),
                    "kl_lag_iso": _kl(b, c),
                    "kl_serial_iso": _kl(a, c),
                    "kl_serial_lag": _kl(a, b),
                }
            )
    return records


def _cell(records: list[dict], name: str, keep, seed: int) -> dict[str, Any] | None:
    """Mean over prompts of the per-prompt token mean of ``name`` where ``keep(record) -> bool mask``."""
    by_prompt: dict[int, list[np.ndarray]] = {}
    for rec in records:
        mask = keep(rec)
        if mask.any():
            by_prompt.setdefault(rec["prompt"], []).append(rec[name][mask])
    if not by_prompt:
        return None
    values = [float(np.concatenate(v).mean()) for v in by_prompt.values()]
    mean, low, high = bootstrap_ci(values, seed=seed)
    tokens = int(sum(np.concatenate(v).size for v in by_prompt.values()))
    return {"mean": mean, "low": low, "high": high, "prompts": len(values), "tokens": tokens}


def summarize(records: list[dict], seed: int = 0) -> dict[str, Any]:
    """``{"all": {kl: cell}, "by_section": {k: ...}, "by_round": {r: ...}}`` (cells as in :func:`_cell`)."""
    sections = sorted({r["section"] for r in records})
    rounds = sorted({int(x) for r in records for x in r["round"]})

    def cells(keep) -> dict:
        return {name: _cell(records, name, keep, seed) for name in KL_NAMES}

    return {
        "all": cells(lambda r: np.ones_like(r["round"], dtype=bool)),
        "by_section": {
            str(k): cells(lambda r, k=k: np.full_like(r["round"], r["section"] == k, dtype=bool)) for k in sections
        },
        "by_round": {str(t): cells(lambda r, t=t: r["round"] == t) for t in rounds},
    }


def measure_ceiling(
    recipe, split: str = "validation", writer: str = "serial", limit: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Write the split's sections with ``writer`` and score them under the three teachers; JSON-ready result."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {list(SPLITS)}.")
    if writer not in ("serial", "lag"):
        raise ValueError(f"writer={writer!r}; use 'serial' (today's data) or 'lag' (the lag teacher's sections).")
    cfg = recipe.data.build
    prompts = split_prompts(load_prompts(cfg), cfg)[split][:limit]
    if not prompts:
        raise ValueError(f"split {split!r} has no prompts; raise data.build.max_prompts.{split}.")
    teacher, _, name, pdt = load_teacher(recipe)
    lag, block = check_lag(pdt.note_lag), pdt.block_size
    records, plans_out, start = [], [], time.perf_counter()
    bar = tqdm(total=len(prompts), desc=f"pdt data ceiling ({writer} sections)", unit="prompt", disable=not progress)
    for first in range(0, len(prompts), cfg.batch_size):
        batch = prompts[first : first + cfg.batch_size]
        seed = cfg.seed * 1_000_003 + SPLITS.index(split) * 10_007 + first
        plans, _ = write_plans(batch, teacher, pdt.num_streams, cfg, seed)
        if writer == "serial":
            sections, _ = write_serial(batch, plans, teacher, cfg, seed)
        else:
            sections, _ = write_lag(batch, plans, teacher, cfg, block, lag, seed)
        for j in range(len(batch)):  # one prompt at a time: 3 x K x [S, V] log-probs
            recs = score_three(teacher, batch[j : j + 1], plans[j : j + 1], sections[j : j + 1], block, lag, 16)
            for rec in recs:
                rec["prompt"] += first + j
            records += recs
            bar.update()
        plans_out += plans
    bar.close()
    return {
        "teacher": cfg.teacher or name,
        "split": split,
        "writer": writer,
        "num_prompts": len(prompts),
        "num_streams": pdt.num_streams,
        "block_size": block,
        "note_lag": lag,
        "section_max_tokens": cfg.section_max_tokens,
        "seconds": time.perf_counter() - start,
        "summary": summarize(records, seed=cfg.seed),
        "kl_names": KL_NAMES,
        "plans": plans_out,
        "tokens": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in records],
    }


def _fmt(cell: dict | None) -> str:
    return "–" if not cell else f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def ceiling_markdown(result: dict) -> str:
    """Three-teacher table: one row per section index, per round, and all; cells ``mean [95% CI]``."""
    s = result["summary"]
    lines = [
        f"Teacher {result['teacher']}, {result['num_prompts']} {result['split']} prompts, sections written by the "
        f"{result['writer']} teacher; K = {result['num_streams']}, B = {result['block_size']}, "
        f"Δ = {result['note_lag']}. Nats/token, mean over prompts [95% bootstrap CI over prompts].",
        "",
        "| cell | tokens | " + " | ".join(KL_NAMES.values()) + " |",
        "|---|---|" + "---|" * len(KL_NAMES),
    ]

    def row(label: str, cells: dict) -> str:
        n = next((c["tokens"] for c in cells.values() if c), 0)
        return f"| {label} | {n} | " + " | ".join(_fmt(cells[name]) for name in KL_NAMES) + " |"

    lines += [row(f"section {int(k) + 1}", c) for k, c in s["by_section"].items()]
    lines += [row(f"round {r}", c) for r, c in s["by_round"].items()]
    lines.append(row("**all**", s["all"]))
    return "\n".join(lines) + "\n"


def plot_ceiling(result: dict, path: str) -> str:
    """Two panels (by section index, by round): the three KLs with 95% CI error bars; writes ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...evaluation.report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((axes[0], "by_section", "section index"), (axes[1], "by_round", "round r")):
        groups = result["summary"][key]
        x = np.arange(len(groups))
        width = 0.8 / len(KL_NAMES)
        for n, name in enumerate(KL_NAMES):
            cells = [groups[g][name] for g in groups]
            mean = np.array([c["mean"] if c else np.nan for c in cells])
            err = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] if c else [0, 0] for c in cells]).T
            axis.bar(x + (n - 1) * width, mean, width, yerr=err, capsize=3, label=KL_NAMES[name])
        ticks = [str(int(g) + 1) if key == "by_section" else g for g in groups]
        axis.set(xticks=x, xticklabels=ticks, xlabel=label, ylabel="nats/token")
    axes[0].legend(fontsize=7)
    title = (
        f"{result['teacher']}: {result['num_prompts']} {result['split']} prompts, {result['writer']}-written "
        "sections, "
        f"B={result['block_size']}, Δ={result['note_lag']}"
    )
    return save_figure(fig, path, title)


def run_ceiling_command(args: argparse.Namespace) -> int:
    """``pdt data ceiling``: measure, then write ``ceiling-<split>-<writer>.{json,md,png}`` under ``--out``."""
    from ...evaluation.report import write_json
    from ..config import load_recipe

    recipe = load_recipe(args.config, args.overrides)
    result = measure_ceiling(recipe, args.split, args.writer, args.limit, progress=not args.no_progress)
    words = ["pdt", "data", "ceiling", "--config", args.config, "--split", args.split, "--writer", args.writer]
    words += ["--limit", str(args.limit)] if args.limit is not None else []
    result["command"] = shlex.join(words + list(args.overrides))
    out = args.out or os.path.join("outputs", "ceiling", os.path.splitext(os.path.basename(args.config))[0])
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"ceiling-{args.split}-{args.writer}")
    write_json(result, stem + ".json")
    markdown = ceiling_markdown(result)
    with open(stem + ".md", "w", encoding="utf-8") as handle:
        handle.write(markdown)
    plot_ceiling(result, stem + ".png")
    print(markdown)
    print(f"wrote {stem}.json, .md, .png ({result['seconds']:.0f} s)")
    return 0
