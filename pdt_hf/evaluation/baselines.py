"""The methods ``pdt eval`` compares, each on the same prompt, the same plan and the same token budget.

==================  =========================================================================================
method              what runs
==================  =========================================================================================
``serial``          the serial teacher of ``pdt data build`` (``training.data.builder.write_serial``), bare trunk:
                    section k written after the prompt, the plan and sections 0..k-1 under their titles, its
                    own title named as the one to write; N tokens per section, greedy, each section ending at
                    its first end-of-turn token. K real sections, nothing to split afterwards
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
``pdt-synthesis``   PDT as shipped, then the synthesis stream (``generate(synthesis=True)``): one more stream
                    reads every stream's notes (no section text) and writes the conclusion, N tokens at most;
                    its sections are ``pdt``'s (greedy), ``MethodRun.synthesis_ids`` holds the conclusion,
                    which ``evaluate`` scores against the trunk writing it from the sections' text and from
                    nothing (``run_conclusion``). Needs a sidecar with a synthesis slot; not a default method
``pdt-select``      PDT with stream selection (``generation.select``) from M = 2K candidates: the item's K plan
                    titles followed by K generic titles (``prompt_sets.pad_plan``), the K kept ones in candidate
                    order; ``MethodRun.plan`` is the kept plan, which the metrics then use. Keeping the K given
                    items reproduces ``pdt`` exactly (greedy), so the paired difference isolates the swaps
==================  =========================================================================================

The serial reference is the serial teacher rather than one ``generate`` call cut by headings afterwards: the
135M trunk rarely writes the headings it is asked for, so a heading splitter left most serial answers with an
empty section and the metrics measured the splitter. ``MethodRun.finish_reasons`` says per section whether it
ended at end of turn (``eos``) or hit its budget (``length``); ``contexts`` holds each section's context ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..training.data.builder import write_serial
from ..training.data.config import DataBuildConfig
from ..training.data.teacher import Teacher

__all__ = [
    "CONCLUSION_SOURCES",
    "DEFAULT_EVAL_METHODS",
    "EVAL_METHODS",
    "PDT_METHODS",
    "PDT_VARIANTS",
    "MethodRun",
    "run_conclusion",
    "run_method",
    "run_select",
    "run_serial",
    "run_text_bus",
    "serial_message",
]

SERIAL_INSTRUCTION = "{prompt}\n\nWrite the whole answer in {k} sections, in this order, each starting with its heading line:\n{headings}"

PDT_VARIANTS: dict[str, dict[str, Any]] = {
    "pdt": {"use_notes": True, "rollback": True},
    "pdt-notes-zero": {"use_notes": True, "rollback": True, "note_ablation": "zero"},
    "pdt-notes-shuffle": {"use_notes": True, "rollback": True, "note_ablation": "shuffle"},
    "pdt-no-rollback": {"use_notes": True, "rollback": False},
}
EVAL_METHODS = ("serial", "sot", *PDT_VARIANTS, "pdt-text-bus", "pdt-select", "pdt-synthesis")
DEFAULT_EVAL_METHODS = tuple(m for m in EVAL_METHODS if m != "pdt-synthesis")
"""What ``pdt eval`` runs unless ``--methods`` says otherwise (pdt-synthesis needs a sidecar with the slot)."""
PDT_METHODS = (*PDT_VARIANTS, "pdt-select", "pdt-synthesis")
"""Methods that decode with the sidecar (coverage head, agreement calibration)."""
CONCLUSION_SOURCES = ("pdt-synthesis", "trunk-from-sections", "trunk-from-nothing")
"""Who writes the conclusion ``evaluate`` scores for the same answer: the synthesis stream (notes only), the
bare trunk after the prompt, the plan and the sections' text (the quality reference), and the bare trunk after
the prompt, the plan and the heading only (the synthesis stream's own prompt, with nothing to read)."""


@dataclass
class MethodRun:
    """What one method wrote for one prompt, with everything the metrics need.

    ``sections``: text per plan item; ``section_ids``: token ids per plan item (a trailing end-of-turn token
    kept); ``tokens``: new tokens kept, special tokens excluded; ``decoded``: tokens decoded including
    rolled-back ones; ``telemetry``: ``Telemetry.to_dict()`` for multi-stream methods; ``finish_reasons``: per
    section ``eos`` (ended at end of turn) or ``length`` (hit its budget); ``contexts``: serial only, the
    context ids each section was written after; ``plan``: the plan the method chose itself (``pdt-select``),
    None when it wrote the item's plan; ``synthesis`` / ``synthesis_ids``: the conclusion of ``pdt-synthesis``.
    """

    method: str
    sections: list[str]
    tokens: int
    decoded: int
    seconds: float
    section_ids: list[list[int]] | None = None
    telemetry: dict[str, Any] | None = None
    finish_reasons: list[str] = field(default_factory=list)
    contexts: list[list[int]] | None = None
    plan: list[str] | None = None
    synthesis: str | None = None
    synthesis_ids: list[int] | None = None


def serial_message(prompt: str, plan: Sequence[str]) -> str:
    """One user message asking for the whole answer with the plan's titles as ``## `` headings.

    The context fidelity is scored in (``evaluate``) and the prompt of ``pdt bench``'s one-call serial run.
    """
    headings = "\n".join(f"## {item}" for item in plan)
    return SERIAL_INSTRUCTION.format(prompt=prompt.strip(), k=len(plan), headings=headings)


def _eos_ids(model) -> list[int]:
    eos = model.trunk.generation_config.eos_token_id
    eos = eos if eos is not None else model.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])


@torch.no_grad()
def run_serial(model, prompt: str, plan: Sequence[str], max_new_tokens: int, seed: int = 0) -> MethodRun:
    """The serial teacher on the bare trunk: K sections one after another, ``max_new_tokens`` each, greedy.

    Section k's context is ``training.data.plan.serial_message``: the request, the plan, sections 0..k-1 under
    their titles, and ``Write only the section "<plan[k]>"``; with K = 1 it is the stream prompt of ``sot``.
    """
    cfg = DataBuildConfig(section_max_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0)
    start = time.perf_counter()
    with model.disable_sidecars():
        teacher = Teacher(model.trunk, model.tokenizer)
        sections, contexts = write_serial([prompt], [list(plan)], teacher, cfg, seed)
    seconds = time.perf_counter() - start
    ids, eos = sections[0], set(teacher.eos_ids)
    tokens = sum(len([t for t in s if t not in eos]) for s in ids)
    return MethodRun(
        "serial",
        [model.tokenizer.decode([t for t in s if t not in eos], skip_special_tokens=True).strip() for s in ids],
        tokens=tokens,
        decoded=sum(len(s) for s in ids),
        seconds=seconds,
        section_ids=[list(s) for s in ids],
        finish_reasons=["eos" if s and s[-1] in eos else "length" for s in ids],
        contexts=[list(c) for c in contexts[0]],
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
    elif method == "pdt-synthesis":
        out = model.generate(**kwargs, **PDT_VARIANTS["pdt"], synthesis=True, synthesis_max_new_tokens=max_new_tokens)
    else:
        raise ValueError(
            f"method {method!r} is not a multi-stream method; use 'sot', 'pdt-synthesis' or one of {list(PDT_VARIANTS)}."
        )
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
        synthesis=out.synthesis,
        synthesis_ids=list(out.synthesis_ids) if out.synthesis_ids is not None else None,
    )


@torch.no_grad()
def run_conclusion(
    model, source: str, prompt: str, plan: Sequence[str], sections: Sequence[str], max_new_tokens: int, seed: int = 0
) -> list[int]:
    """The bare trunk's greedy conclusion ids (a trailing end-of-turn token kept) for a reference source.

    ``trunk-from-sections``: after ``training.data.plan.conclusion_message`` (the request, the plan, every
    section's text, the heading: the serial teacher of ``pdt data synthesis``); ``trunk-from-nothing``: after
    ``generation.prompts.synthesis_message`` (the request, the plan, the heading: what the synthesis stream reads
    besides its notes).
    """
    from ..generation.prompts import render_ids, synthesis_message
    from ..training.data.plan import conclusion_message

    if source == "trunk-from-sections":
        message = conclusion_message(prompt, plan, sections)
    elif source == "trunk-from-nothing":
        message = synthesis_message(prompt, plan)
    else:
        raise ValueError(f"unknown conclusion source {source!r}; references are {list(CONCLUSION_SOURCES[1:])}.")
    with model.disable_sidecars():
        teacher = Teacher(model.trunk, model.tokenizer)
        ids = render_ids(model.tokenizer, message)
        return teacher.generate(
            [ids], max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=seed
        )[0]


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


@torch.no_grad()
def run_select(model, prompt: str, plan: Sequence[str], max_new_tokens: int, seed: int = 0) -> MethodRun:
    """``pdt-select``: PDT keeping K of 2K candidates (the K plan items, then K generic titles; module docstring).

    Telemetry ``selection`` holds every candidate's scores and why it was kept or dropped.
    """
    from .prompt_sets import pad_plan

    k = len(plan)
    candidates, _ = pad_plan(prompt, plan, 2 * k)
    start = time.perf_counter()
    out = model.generate(
        prompt=prompt,
        plan=candidates,
        num_streams=k,
        plan_candidates=len(candidates),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        seed=seed,
        **PDT_VARIANTS["pdt"],
    )
    seconds = time.perf_counter() - start
    eos = set(_eos_ids(model))
    ids = [list(seq) for seq in out.sequences]
    telemetry = out.telemetry.to_dict()
    return MethodRun(
        "pdt-select",
        list(out.texts),
        tokens=sum(len([t for t in seq if t not in eos]) for seq in ids),
        decoded=telemetry["decoded_tokens"],
        seconds=seconds,
        section_ids=ids,
        telemetry=telemetry,
        finish_reasons=list(out.finish_reasons),
        plan=list(out.plan),
    )


def run_method(model, method: str, prompt: str, plan: Sequence[str], max_new_tokens: int, seed: int = 0) -> MethodRun:
    """Run one of ``EVAL_METHODS``; ``max_new_tokens`` is per stream (serial: per section)."""
    if method == "serial":
        return run_serial(model, prompt, plan, max_new_tokens, seed)
    if method == "pdt-text-bus":
        return run_text_bus(model, prompt, plan, max_new_tokens)
    if method == "pdt-select":
        return run_select(model, prompt, plan, max_new_tokens, seed)
    if method not in EVAL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(EVAL_METHODS)}.")
    return run_streams(model, method, prompt, plan, max_new_tokens, seed)
