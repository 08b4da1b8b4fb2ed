"""Scoring the bus probe: real decoding (multi-stream ``generate``, every section token but the answer forced)
and the teacher-forced passes of training.

Design decisions:
- :class:`ForcedContinuation` is an ordinary ``LogitsProcessor`` keyed by a stream's prompt, so it goes through
  ``generate(logits_processor=...)`` unchanged; decoding applies processors per stream with that stream's own
  history, so the processor knows which stream and which section position it is choosing for.
- tau = 0: every block commits (the agreement head is not trained by the probe; a rollback would shift rounds).
- ``zero`` and ``shuffle`` are decoding's own ablations (``note_ablation``); see :mod:`.probe` for why both are
  true controls here. Exact match comes with a Wilson score 95% interval.
"""

from __future__ import annotations

import math
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .probe import READER, ProbeExample, ProbeRunner, ProbeTask

__all__ = ["SETTINGS", "ForcedContinuation", "decode_answers", "evaluate_probe", "forced_accuracy", "wilson_interval"]

SETTINGS = {"visible": {}, "zero": {"note_ablation": "zero"}, "shuffle": {"note_ablation": "shuffle"}}


class ForcedContinuation(LogitsProcessor):
    """At the i-th generated position of the stream whose prompt is ``prompt``, keeps only ``steps[prompt][i]``:
    one token id (forced) or a list of ids (the choice is restricted to them, e.g. the probe's items).

    Positions past the list (and streams with an unknown prompt) are left free.
    """

    def __init__(self, steps: dict[tuple[int, ...], list[int | list[int]]]) -> None:
        self.steps = steps
        self.lengths = {len(p) for p in steps}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        history = input_ids[0].tolist()
        for length in self.lengths:
            steps = self.steps.get(tuple(history[:length]))
            if steps is not None and length <= len(history) < length + len(steps):
                keep = steps[len(history) - length]
                out = torch.full_like(scores, float("-inf"))
                out[:, keep] = scores[:, keep]
                return out
        return scores


@torch.no_grad()
def decode_answers(model, tokenizer, task: ProbeTask, examples: list[ProbeExample], **generate_kwargs) -> list[int]:
    """Stream 1's answer token for each example, from real multi-stream ``generate`` (greedy, K = 2, tau = 0).

    Every other section token is forced; with ``answer_among_items`` the answer is the greedy choice among the
    items (as in training), else among the whole vocabulary.
    """
    answers = []
    for ex in examples:
        steps = [list(ex.forced[0]), list(ex.forced[1])]
        if task.config.answer_among_items:
            steps[READER].append(list(task.item_ids))
        forced = {tuple(p): f for p, f in zip(task.stream_prompts(ex), steps)}
        out = model.generate(
            prompt=ex.request,
            plan=task.config.plan,
            tokenizer=tokenizer,
            num_streams=2,
            max_new_tokens=task.answer_index + 1,
            agreement_threshold=0.0,
            logits_processor=LogitsProcessorList([ForcedContinuation(forced)]),
            **generate_kwargs,
        )
        reader = out.sequences[READER]
        if reader[: task.answer_index] != ex.forced[READER]:
            raise RuntimeError(
                f"stream 1 did not keep its forced tokens ({reader} vs {ex.forced[READER]}): the probe's prompts "
                "differ from what generate rendered."
            )
        answers.append(reader[task.answer_index])
    return answers


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}.")
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate_probe(
    model, tokenizer, task: ProbeTask, examples: list[ProbeExample], settings: tuple[str, ...] = tuple(SETTINGS)
) -> dict:
    """Exact match of stream 1's answer per setting (``visible``, ``zero``, ``shuffle``) with Wilson 95% CIs."""
    report = {"chance": task.chance, "examples": len(examples)}
    for name in settings:
        start = time.perf_counter()
        answers = decode_answers(model, tokenizer, task, examples, **SETTINGS[name])
        hits = sum(a == task.item_ids[ex.item] for a, ex in zip(answers, examples))
        low, high = wilson_interval(hits, len(examples))
        report[name] = {
            "accuracy": hits / len(examples),
            "ci95": [low, high],
            "correct": hits,
            "distinct_answers": len(set(answers)),
            "seconds": time.perf_counter() - start,
        }
    return report


@torch.no_grad()
def forced_accuracy(
    model, tokenizer, task: ProbeTask, examples: list[ProbeExample], donor_shift: int = 0, batch_size: int = 16
) -> float:
    """Teacher-forced exact match of stream 1's answer (the training passes, no decoding).

    With ``donor_shift`` != 0 each reader gets another example's writer notes and is scored against *that*
    example's item: high accuracy there shows the answer is the content of the note, not of the reader's context.
    """
    run, hits = ProbeRunner(model, tokenizer, task), 0
    for i in range(0, len(examples), batch_size):
        _, answers, items = run(examples[i : i + batch_size], False, donor_shift)
        hits += int((answers == items).sum())
    return hits / len(examples)
