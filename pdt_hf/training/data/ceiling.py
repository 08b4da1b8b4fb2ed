"""``pdt data ceiling``: how much of the teacher's sibling dependence a parallel stream could reach through notes.

For every block of every section of a split's prompts, five teacher distributions over the **same** section
tokens (the teacher is the recipe's: the trunk or ``data.build.teacher``):

- (a) *serial*: section k read after the prompt, the plan and the whole of sections 0..k-1 (``serial_message``);
- (b) *lag-consistent*: block r read after the prompt, the plan and the sibling blocks of rounds <= r - Δ as
  text (``generation.text_bus``), the stream's own earlier blocks as the assistant's text so far;
- (c) *isolated*: the student's stream message alone (no sibling content);
- (d) *donor*: (b)'s layout and headings, with the sibling text taken from another prompt of the split (the
  next one, cyclically) at the same lag: the teacher-side twin of the student's shuffled notes;
- (e) *resampled*: the same, with the sibling text of a second writing of the same prompt and plan by the same
  writer, sampled (``data.build.temperature`` / ``top_p``, another seed): other siblings the prompt allows.

Reported per section index, per round, by copying and overall: KL(b ‖ c), the *reachable gain* (what sibling
content a stream can see at that lag changes in the teacher); KL(b ‖ d), its *content-specific* part (what the
siblings' actual text changes beyond the layout and the presence of some sibling text, which a stream adapter
can learn without reading anything); KL(b ‖ e), its *realisation-specific* part (what the siblings' text
changes beyond what the prompt and plan already say about it: what only a note, not the prompt, can tell a
stream); KL(a ‖ c), the serial teacher's sibling dependence (what the ``serial`` data set's
``sibling_dependence`` approximates over top-k buckets); KL(a ‖ b), the part of the serial target no stream can
reach. KLs are exact over the full vocabulary, nats per token. *Copying*: a token whose bigram with
the previous section token occurs in the sibling text it reads in (b) continues that text; the split shows how
much of the reachable gain is such copying, which a pooled block note cannot carry token by token.

Design decisions:
- The sections come from one writer (``--writer serial``: the serial teacher, today's data; ``lag``: the lag
  teacher), with the plans the teacher writes for ``pdt data build``, so all five distributions score the same
  tokens.
- Statistics: a prompt's value in a cell (section k, round r, or all) is the mean over its tokens there; the table
  shows the mean over prompts with a 95% percentile-bootstrap interval over prompts (``evaluation.stats``).
- Log-probs ``[S, V]`` are computed a few prompts at a time and reduced to per-token KLs at once, so memory does
  not grow with the split.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...evaluation.stats import bootstrap_ci, ratio_ci
from ...generation.prompts import render_ids, stream_message
from ...generation.text_bus import check_lag, lag_context, round_contexts
from ..rounds import num_blocks, predicted_blocks
from .builder import load_teacher, write_lag, write_plans, write_serial
from .config import SPLITS
from .plan import serial_message
from .sources import load_prompts, split_prompts

__all__ = [
    "KL_NAMES",
    "RESAMPLE_SEED_OFFSET",
    "ceiling_markdown",
    "copy_flags",
    "donor_contexts",
    "measure_ceiling",
    "plot_ceiling",
    "run_ceiling_command",
    "score_teachers",
    "sibling_similarity",
    "summarize",
]

RESAMPLE_SEED_OFFSET = 7919
"""Added to a batch's writing seed for its resampled sections (teacher (e))."""

KL_NAMES = {
    "kl_lag_iso": "KL(lag ‖ isolated): reachable gain",
    "kl_lag_donor": "KL(lag ‖ donor): content-specific gain",
    "kl_lag_resampled": "KL(lag ‖ resampled): realisation-specific gain",
    "kl_serial_iso": "KL(serial ‖ isolated): serial sibling dependence",
    "kl_serial_lag": "KL(serial ‖ lag): unreachable part",
}


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> np.ndarray:
    """Per-token ``KL(p ‖ q)`` ``[S]`` of log-prob rows ``[S, V]``."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0).double().numpy()


def donor_contexts(tokenizer, prompt, plan, sections, donor, lag: int, block_size: int) -> list[list[list[int]]]:
    """``[K][nb_k]`` stream k's lag-layout contexts, every sibling's text taken from ``donor`` (``[K]`` token lists).

    Same headings, same lag, same visibility rule as :func:`generation.text_bus.round_contexts`; only the sibling
    content is ``donor``'s (another prompt's for teacher (d), another writing of this prompt's for (e)).
    """
    out = []
    for k, own in enumerate(sections):
        mixed = [list(donor[j]) if j != k else list(own) for j in range(len(sections))]
        nb = num_blocks(len(own), block_size)
        out.append([lag_context(tokenizer, prompt, plan, mixed, k, r, lag, block_size) for r in range(1, nb + 1)])
    return out


def copy_flags(sections, reader: int, block_size: int, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Per token of section ``reader``: (sibling text visible, the token's bigram occurs in that text)."""
    section = list(sections[reader])
    visible, copied = np.zeros(len(section), bool), np.zeros(len(section), bool)
    for i, round_ in enumerate(predicted_blocks(len(section), block_size)):
        end = (round_ - lag) * block_size  # siblings' blocks of rounds <= r - Δ
        if end <= 0:
            continue
        shown = [list(s[:end]) for j, s in enumerate(sections) if j != reader and s[:end]]
        visible[i] = bool(shown)
        pairs = {(a, b) for s in shown for a, b in zip(s, s[1:])}
        copied[i] = i > 0 and (section[i - 1], section[i]) in pairs
    return visible, copied


def score_teachers(
    teacher, prompt, plan, sections, donor, resampled, block_size: int, lag: int, batch_rows: int
) -> list[dict]:
    """Per-token KLs of every section of one prompt: ``[{section, round, visible, copied, kl_*}]`` (numpy arrays).

    ``donor`` (another prompt's) and ``resampled`` (this prompt's, written again) are ``[K]`` sections whose text
    fills the sibling slots of teachers (d) and (e).
    """
    tok = teacher.tokenizer
    nbs = [num_blocks(len(s), block_size) for s in sections]
    texts = [tok.decode(s, skip_special_tokens=True) for s in sections]
    contexts = {
        "serial": [[render_ids(tok, serial_message(prompt, plan, k, texts[:k]))] * nb for k, nb in enumerate(nbs)],
        "lag": round_contexts(tok, prompt, plan, sections, lag, block_size),
        "iso": [[render_ids(tok, stream_message(prompt, plan, item))] * nb for item, nb in zip(plan, nbs)],
        "donor": donor_contexts(tok, prompt, plan, sections, donor, lag, block_size),
        "resampled": donor_contexts(tok, prompt, plan, sections, resampled, lag, block_size),
    }
    targets = [list(s) for s in sections]
    logp = {name: teacher.round_logprobs(ctxs, targets, block_size, batch_rows) for name, ctxs in contexts.items()}
    records = []
    for k, sec in enumerate(sections):
        if not sec:
            continue
        a, b, c, d, e = (logp[name][k] for name in ("serial", "lag", "iso", "donor", "resampled"))
        visible, copied = copy_flags(sections, k, block_size, lag)
        records.append(
            {
                "section": k,
                "round": np.array(predicted_blocks(len(sec), block_size)),
                "visible": visible,
                "copied": copied,
                "kl_lag_iso": _kl(b, c),
                "kl_lag_donor": _kl(b, d),
                "kl_lag_resampled": _kl(b, e),
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


def _share(records: list[dict], top: str, keep, seed: int) -> dict[str, Any] | None:
    """Sum of ``top`` over the kept tokens / sum of the reachable gain over all tokens, 95% bootstrap over prompts."""
    sums: dict[int, list[float]] = {}
    for rec in records:
        pair = sums.setdefault(rec["prompt"], [0.0, 0.0])
        pair[0] += float(rec[top][keep(rec)].sum())
        pair[1] += float(rec["kl_lag_iso"].sum())
    numerator, denominator = (np.array([p[i] for p in sums.values()]) for i in (0, 1))
    if denominator.sum() <= 0:
        return None
    share, low, high = ratio_ci(numerator, denominator, seed=seed)
    return {"mean": share, "low": low, "high": high, "prompts": len(sums)}


def summarize(records: list[dict], seed: int = 0) -> dict[str, Any]:
    """Cells (as in :func:`_cell`) per section, round, copying and overall, and the shares of the reachable gain.

    ``by_copy``: tokens that read some sibling text, split into those continuing a bigram of it and the rest.
    ``shares``: of the reachable gain's mass (sum of KL(lag ‖ isolated)), the content-specific and the
    realisation-specific KLs' masses (``content``, ``realisation``) and the part on copying tokens (``copied``);
    ratios of sums over tokens, CIs over prompts.
    """
    sections = sorted({r["section"] for r in records})
    rounds = sorted({int(x) for r in records for x in r["round"]})

    def cells(keep) -> dict:
        return {name: _cell(records, name, keep, seed) for name in KL_NAMES}

    def every(rec):
        return np.ones_like(rec["round"], dtype=bool)

    return {
        "all": cells(every),
        "by_section": {
            str(k): cells(lambda r, k=k: np.full_like(r["round"], r["section"] == k, dtype=bool)) for k in sections
        },
        "by_round": {str(t): cells(lambda r, t=t: r["round"] == t) for t in rounds},
        "by_copy": {
            "visible": cells(lambda r: r["visible"]),
            "copied": cells(lambda r: r["copied"]),
            "not copied": cells(lambda r: r["visible"] & ~r["copied"]),
        },
        "shares": {
            "content": _share(records, "kl_lag_donor", every, seed),
            "realisation": _share(records, "kl_lag_resampled", every, seed),
            "copied": _share(records, "kl_lag_iso", lambda r: r["copied"], seed),
        },
    }


def sibling_similarity(texts: list[list[str]], resampled: list[list[str]], encoder=None, seed: int = 0) -> dict:
    """How alike the sibling texts of teachers (b), (d) and (e) are, in meaning (sentence-embedding cosine).

    ``texts[i][k]``: section k of prompt i; ``resampled[i][k]``: its resampled writing. For every section, the
    cosine with its resampled text (what (e) shows instead) and with section k of prompt i + 1 (what (d) shows
    instead). A prompt's value is the mean over its sections with text on both sides; cells are means over
    prompts with a 95% bootstrap interval. ``identical`` counts non-empty resampled sections equal to the originals.
    """
    from ...evaluation.embeddings import load_sentence_encoder

    n, width = len(texts), len(texts[0])
    donor = [texts[(i + 1) % n] for i in range(n)]
    flat = [t for rows in (texts, resampled) for row in rows for t in row]
    vectors = load_sentence_encoder(encoder).encode(flat, normalize_embeddings=True, convert_to_numpy=True)
    ours, theirs = vectors.reshape(2, n, width, -1)
    out: dict[str, Any] = {}
    for name, others, other_texts in (("resampled", theirs, resampled), ("donor", np.roll(ours, -1, 0), donor)):
        values = []
        for i in range(n):
            keep = [k for k in range(width) if texts[i][k] and other_texts[i][k]]
            if keep:
                values.append(float(np.mean([ours[i, k] @ others[i, k] for k in keep])))
        mean, low, high = bootstrap_ci(values, seed=seed) if values else (float("nan"),) * 3
        out[name] = {"mean": mean, "low": low, "high": high, "prompts": len(values)}
    out["identical"] = sum(bool(a) and a == b for row, other in zip(texts, resampled) for a, b in zip(row, other))
    out["sections"] = n * width
    return out


def measure_ceiling(
    recipe,
    split: str = "validation",
    writer: str = "serial",
    limit: int | None = None,
    progress: bool = True,
    encoder: str | None = None,
) -> dict[str, Any]:
    """Write the split's sections with ``writer`` and score them under the five teachers; JSON-ready result.

    The donor of prompt i is prompt i + 1 of the split (the last one's is the first), so the split needs at least
    two prompts. Its resampled siblings are the same writer's sections written again with sampling. ``encoder``
    (a sentence-transformers model; default the embedded all-MiniLM-L6-v2) compares the sibling texts.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {list(SPLITS)}.")
    if writer not in ("serial", "lag"):
        raise ValueError(f"writer={writer!r}; use 'serial' (today's data) or 'lag' (the lag teacher's sections).")
    cfg = recipe.data.build
    prompts = split_prompts(load_prompts(cfg), cfg)[split][:limit]
    if len(prompts) < 2:
        raise ValueError(
            f"split {split!r} has {len(prompts)} prompt(s) here; the donor teacher reads another prompt's sections, "
            f"so pass --limit >= 2 and raise data.build.max_prompts.{split} if needed."
        )
    teacher, _, name, pdt = load_teacher(recipe)
    lag, block = check_lag(pdt.note_lag), pdt.block_size
    plans_out, sections_out, resampled_out, start = [], [], [], time.perf_counter()
    sampled = dataclasses.replace(cfg, do_sample=True)
    bar = tqdm(
        total=2 * len(prompts), desc=f"pdt data ceiling ({writer} sections)", unit="prompt", disable=not progress
    )
    for first in range(0, len(prompts), cfg.batch_size):  # write every prompt's sections, then score
        batch = prompts[first : first + cfg.batch_size]
        seed = cfg.seed * 1_000_003 + SPLITS.index(split) * 10_007 + first
        plans, _ = write_plans(batch, teacher, pdt.num_streams, cfg, seed)
        for settings, out, offset in ((cfg, sections_out, 0), (sampled, resampled_out, RESAMPLE_SEED_OFFSET)):
            if writer == "serial":
                sections, _ = write_serial(batch, plans, teacher, settings, seed + offset)
            else:
                sections, _ = write_lag(batch, plans, teacher, settings, block, lag, seed + offset)
            out += sections
        plans_out += plans
        bar.update(len(batch))
    records = []
    for i, (prompt, plan, sections) in enumerate(zip(prompts, plans_out, sections_out)):  # 5 x K x [S, V] at once
        donor = sections_out[(i + 1) % len(prompts)]
        for rec in score_teachers(teacher, prompt, plan, sections, donor, resampled_out[i], block, lag, 16):
            records.append({"prompt": i, **rec})
        bar.update()
    bar.close()
    texts, resampled_texts = (
        [[teacher.tokenizer.decode(s, skip_special_tokens=True).strip() for s in row] for row in written]
        for written in (sections_out, resampled_out)
    )
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
        "resampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "seed_offset": RESAMPLE_SEED_OFFSET},
        "summary": summarize(records, seed=cfg.seed),
        "similarity": sibling_similarity(texts, resampled_texts, encoder, seed=cfg.seed),
        "kl_names": KL_NAMES,
        "plans": plans_out,
        "texts": [{"sections": a, "resampled": b} for a, b in zip(texts, resampled_texts)],
        "tokens": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in records],
    }


def _fmt(cell: dict | None) -> str:
    return "–" if not cell else f"{cell['mean']:.3f} [{cell['low']:.3f}, {cell['high']:.3f}]"


def ceiling_markdown(result: dict) -> str:
    """Teacher table: one row per section index, round, copying group and all (``mean [95% CI]``), then the shares."""
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
    copy_labels = {
        "visible": "tokens reading sibling text",
        "copied": "of them, continuing a sibling bigram",
        "not copied": "of them, not",
    }
    lines += [row(copy_labels[g], c) for g, c in s["by_copy"].items()]
    lines.append(row("**all**", s["all"]))
    share_labels = {
        "content": "content-specific gain (sum of KL(lag ‖ donor))",
        "realisation": "realisation-specific gain (sum of KL(lag ‖ resampled))",
        "copied": "reachable gain on tokens continuing a sibling bigram",
    }
    lines += [
        "",
        "Shares of the reachable gain's mass (sum of KL(lag ‖ isolated) over all tokens), 95% CI over prompts:",
        "",
    ]
    lines += [f"- {share_labels[g]}: {_fmt(c)}" for g, c in s["shares"].items()]
    sim = result["similarity"]
    lines += [
        "",
        "Sibling text in meaning (sentence-embedding cosine of a section with its stand-in, mean over prompts):",
        "",
        f"- the resampled section (teacher (e)): {_fmt(sim['resampled'])}; "
        f"{sim['identical']} of {sim['sections']} identical to the original",
        f"- the donor prompt's section (teacher (d)): {_fmt(sim['donor'])}",
    ]
    return "\n".join(lines) + "\n"


def plot_ceiling(result: dict, path: str) -> str:
    """Two panels (by section index, by round): the KLs with 95% CI error bars; writes ``path`` (PNG)."""
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
            axis.bar(x + (n - (len(KL_NAMES) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=KL_NAMES[name])
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
    result = measure_ceiling(
        recipe, args.split, args.writer, args.limit, progress=not args.no_progress, encoder=args.encoder
    )
    words = ["pdt", "data", "ceiling", "--config", args.config, "--split", args.split, "--writer", args.writer]
    words += ["--limit", str(args.limit)] if args.limit is not None else []
    words += ["--encoder", args.encoder] if args.encoder is not None else []
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
