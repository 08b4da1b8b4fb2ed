"""The methods ``pdt eval`` compares, each on the same prompt, the same plan and the same token budget.

==================  =========================================================================================
method              what runs
==================  =========================================================================================
``serial``          the bare trunk, one ``generate`` call on one prompt asking for the whole answer with the
                    plan's titles as ``## `` headings, ``K * N`` new tokens; split into sections afterwards
``sot``             Skeleton-of-Thought: K independent streams (the K stream prompts of PDT), sidecars
                    detached, notes off, rollback off; greedy, so each stream equals HF ``generate`` on its
                    own prompt
``pdt``             PDT as shipped: notes on, rollback on (tau from the sidecar config)
``pdt-notes-zero``  PDT with every published note replaced by zeros
``pdt-notes-shuffle`` PDT with each round's notes rotated across streams (stream k reads k-1's as k's)
``pdt-no-rollback`` PDT with every block committed (the agreement head is scored, never obeyed)
``pdt-text-bus``    no sidecars: K streams in rounds of B tokens, each round every stream's context is
                    re-prefilled with the siblings' committed text of rounds <= r - Δ
                    (``generation.text_bus``); greedy. The training-free upper reference for what notes could
                    carry, and a Hogwild!-style baseline; its telemetry reports the re-prefilled tokens per round
==================  =========================================================================================

Splitting the serial answer (``split_sections``), the documented rule:

1. A *heading line* for plan item i looks like a heading (starts with ``#``, ``**`` or a number such as
   ``1.``/``2)``/``Section 3:``, or ends with ``:``, or has at most 6 words and no final ``.``), has at most 12
   words once markdown, the number and a trailing ``:`` are stripped, and either contains the item's text or
   holds at least half of its content words (``training.data.plan.content_words``).
2. Items are searched in plan order, each after the previous match. Section i is the text between its
   heading and the next matched heading (heading lines themselves are not section text). Text before the
   first matched heading belongs to item 0; an item whose heading is never found gets an empty section
   (its text, if any, stays in the section before it).
3. If no heading matches at all, the answer is cut into K contiguous runs of paragraphs (blank-line
   separated; sentences when there are fewer than K paragraphs) of about equal word counts: a unit goes to
   run ``floor(K * midpoint / total words)``.

The rule used is recorded per prompt: ``headings`` (all K found), ``partial-headings`` or ``paragraphs``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generation.prompts import render_ids
from ..training.data.plan import content_words
from .metrics import split_sentences

__all__ = [
    "EVAL_METHODS",
    "PDT_VARIANTS",
    "MethodRun",
    "run_method",
    "run_text_bus",
    "serial_message",
    "split_sections",
]

SERIAL_INSTRUCTION = "{prompt}\n\nWrite the whole answer in {k} sections, in this order, each starting with its heading line:\n{headings}"

PDT_VARIANTS: dict[str, dict[str, Any]] = {
    "pdt": {"use_notes": True, "rollback": True},
    "pdt-notes-zero": {"use_notes": True, "rollback": True, "note_ablation": "zero"},
    "pdt-notes-shuffle": {"use_notes": True, "rollback": True, "note_ablation": "shuffle"},
    "pdt-no-rollback": {"use_notes": True, "rollback": False},
}
EVAL_METHODS = ("serial", "sot", *PDT_VARIANTS, "pdt-text-bus")

_MARKUP = re.compile(r"^[\s#*_>\-]*(?:(?:section|part|step)\s*\d+\s*[:.)-]?|\(?\d+[.):\]])?[\s#*_]*", re.I)


@dataclass
class MethodRun:
    """What one method wrote for one prompt, with everything the metrics need.

    ``sections``: text per plan item; ``section_ids``: token ids per plan item (stream ids for the
    multi-stream methods, ``None`` for serial); ``tokens``: new tokens kept; ``decoded``: tokens decoded
    including rolled-back ones; ``telemetry``: ``Telemetry.to_dict()`` for multi-stream methods.
    """

    method: str
    sections: list[str]
    tokens: int
    decoded: int
    seconds: float
    section_ids: list[list[int]] | None = None
    telemetry: dict[str, Any] | None = None
    raw_text: str | None = None
    split_rule: str | None = None
    finish_reasons: list[str] = field(default_factory=list)


def serial_message(prompt: str, plan: Sequence[str]) -> str:
    """The one user message the serial baseline gets: the request and the plan's titles as ``## `` headings."""
    headings = "\n".join(f"## {item}" for item in plan)
    return SERIAL_INSTRUCTION.format(prompt=prompt.strip(), k=len(plan), headings=headings)


def _heading_text(line: str) -> str:
    return _MARKUP.sub("", line).strip().rstrip(":*_ ").strip().lower()


def _looks_like_heading(line: str, text: str) -> bool:
    stripped = line.strip()
    marked = stripped.startswith(("#", "**")) or bool(
        re.match(r"\(?\d+[.):\]]|(?:section|part|step)\s*\d", stripped, re.I)
    )
    return marked or stripped.rstrip("*_ ").endswith(":") or (len(text.split()) <= 6 and not stripped.endswith("."))


def _is_heading_for(line: str, item: str) -> bool:
    text = _heading_text(line)
    if not text or len(text.split()) > 12 or not _looks_like_heading(line, text):
        return False
    if item.lower() in text:
        return True
    wanted = content_words(item)
    return bool(wanted) and len(wanted & content_words(text)) >= 0.5 * len(wanted)


def _split_even(text: str, k: int) -> list[str]:
    units = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(units) < k:
        units = split_sentences(text)
    if not units:
        return [""] * k
    weights = [max(1, len(u.split())) for u in units]
    total, sections, acc = sum(weights), [[] for _ in range(k)], 0
    for unit, weight in zip(units, weights):
        part = min(k - 1, int(k * (acc + weight / 2) / total))  # by the unit's midpoint
        sections[part].append(unit)
        acc += weight
    return ["\n\n".join(s) for s in sections]


def split_sections(text: str, plan: Sequence[str]) -> tuple[list[str], str]:
    """Cut a serial answer into one section per plan item (rule in the module docstring).

    Returns:
        ``(sections, rule)`` with ``len(sections) == len(plan)`` and rule one of ``headings``,
        ``partial-headings``, ``paragraphs``.
    """
    lines = text.splitlines()
    starts: dict[int, int] = {}
    cursor = 0
    for i, item in enumerate(plan):
        for j in range(cursor, len(lines)):
            if _is_heading_for(lines[j], item):
                starts[i], cursor = j, j + 1
                break
    if not starts:
        return _split_even(text, len(plan)), "paragraphs"
    order = sorted(starts.items(), key=lambda kv: kv[1])
    sections = [""] * len(plan)
    bounds = [line for _, line in order] + [len(lines)]
    sections[0] = "\n".join(lines[: order[0][1]]).strip()
    for (i, line), end in zip(order, bounds[1:]):
        body = "\n".join(lines[line + 1 : end]).strip()
        sections[i] = f"{sections[i]}\n\n{body}".strip() if sections[i] else body
    return sections, "headings" if len(starts) == len(plan) else "partial-headings"


def _eos_ids(model) -> list[int]:
    eos = model.trunk.generation_config.eos_token_id
    eos = eos if eos is not None else model.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])


def _pad_id(model) -> int:
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pad is None else int(pad)


@torch.no_grad()
def run_serial(model, prompt: str, plan: Sequence[str], max_new_tokens: int) -> MethodRun:
    """The bare trunk writes the whole answer in one greedy ``generate`` call (stops at EOS like a user's would)."""
    ids = render_ids(model.tokenizer, serial_message(prompt, plan))
    device = next(model.trunk.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    start = time.perf_counter()
    with model.disable_sidecars():
        out = model.trunk.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=_pad_id(model),
            eos_token_id=_eos_ids(model) or None,
        )
    seconds = time.perf_counter() - start
    new = [t for t in out[0, len(ids) :].tolist() if t not in set(_eos_ids(model))]
    text = model.tokenizer.decode(new, skip_special_tokens=True).strip()
    sections, rule = split_sections(text, plan)
    return MethodRun(
        "serial", sections, tokens=len(new), decoded=len(new), seconds=seconds, raw_text=text, split_rule=rule
    )


@torch.no_grad()
def run_streams(model, method: str, prompt: str, plan: Sequence[str], max_new_tokens: int, seed: int = 0) -> MethodRun:
    """Skeleton-of-Thought (``sot``) or a PDT variant (``PDT_VARIANTS``): K streams, ``max_new_tokens`` each."""
    kwargs = dict(
        prompt=prompt,
        plan=list(plan),
        num_streams=len(plan),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        seed=seed,
    )
    start = time.perf_counter()
    if method == "sot":
        with model.disable_sidecars():
            out = model.generate(**kwargs, use_notes=False, rollback=False)
    elif method in PDT_VARIANTS:
        out = model.generate(**kwargs, **PDT_VARIANTS[method])
    else:
        raise ValueError(f"method {method!r} is not a multi-stream method; use 'sot' or one of {list(PDT_VARIANTS)}.")
    seconds = time.perf_counter() - start
    eos = set(_eos_ids(model))
    ids = [list(seq) for seq in out.sequences]
    tokens = sum(len([t for t in seq if t not in eos]) for seq in ids)
    telemetry = out.telemetry.to_dict()
    return MethodRun(
        method,
        list(out.texts),
        tokens=tokens,
        decoded=telemetry["decoded_tokens"],
        seconds=seconds,
        section_ids=ids,
        telemetry=telemetry,
        finish_reasons=list(out.finish_reasons),
    )


@torch.no_grad()
def run_text_bus(model, prompt: str, plan: Sequence[str], max_new_tokens: int) -> MethodRun:
    """``pdt-text-bus``: the bare trunk, streams reading each other's lagged text (B and Δ of the sidecar config).

    Telemetry: ``rounds`` (per round: active streams, prefill tokens, new tokens, seconds), ``prefill_tokens``
    (all rounds), ``decoded_tokens``, and ``rolled_back_tokens`` = 0 (nothing is judged or rolled back).
    """
    from ..generation.text_bus import decode_text_bus, hf_generate, stop_and_pad_ids

    cfg, tok = model.pdt_config, model.tokenizer
    eos, pad = stop_and_pad_ids(model.trunk, tok)
    start = time.perf_counter()
    with model.disable_sidecars():
        result = decode_text_bus(
            hf_generate(model.trunk, pad, eos),
            tok,
            [(prompt, list(plan))],
            cfg.block_size,
            cfg.note_lag,
            max_new_tokens,
            eos,
        )
    seconds = time.perf_counter() - start
    ids = result.sections[0]
    decoded = sum(len(s) for s in ids)
    telemetry = {
        "decoded_tokens": decoded,
        "rolled_back_tokens": 0,
        "prefill_tokens": result.prefill_tokens,
        "rounds": result.rounds,
        "commits": [],
        "coverage": [],
    }
    return MethodRun(
        "pdt-text-bus",
        [tok.decode(s, skip_special_tokens=True).strip() for s in ids],
        tokens=sum(len([t for t in s if t not in set(eos)]) for s in ids),
        decoded=decoded,
        seconds=seconds,
        section_ids=[list(s) for s in ids],
        telemetry=telemetry,
        finish_reasons=list(result.finish_reasons[0]),
    )


def run_method(model, method: str, prompt: str, plan: Sequence[str], max_new_tokens: int, seed: int = 0) -> MethodRun:
    """Run one of ``EVAL_METHODS``; ``max_new_tokens`` is per stream (serial gets ``K * max_new_tokens``)."""
    if method == "serial":
        return run_serial(model, prompt, plan, len(plan) * max_new_tokens)
    if method == "pdt-text-bus":
        return run_text_bus(model, prompt, plan, max_new_tokens)
    if method not in EVAL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(EVAL_METHODS)}.")
    return run_streams(model, method, prompt, plan, max_new_tokens, seed)
