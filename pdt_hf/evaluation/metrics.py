"""Evaluation metrics for multi-stream answers, one definition each (DESIGN.md, "Metrics").

Design decisions:

- Pure functions over plain Python / numpy values; only ``serial_fidelity*`` touches torch (a forward of
  the trunk under ``torch.no_grad``). Nothing here imports ``sentence_transformers``: the encoder is
  passed in (anything with ``encode(list[str]) -> [S, D]`` array), see ``embeddings.load_sentence_encoder``.
- Serial fidelity scores only the answer: ``labels`` are ``-100`` on the prompt and on padding, and the
  logit at position ``t`` is scored against the token at ``t + 1`` (labels shifted, never unshifted).
  Batches are right-padded, so real tokens keep positions ``0..n-1`` and never attend to padding.
- A section is *empty* when no non-whitespace text is left once special tokens are stripped
  (``empty_sections``). Redundancy, the repeated 4-gram rate and text coverage refuse an answer with an
  empty section (``ValueError`` naming the sections) instead of scoring it: an empty section has nothing to
  repeat or to cover, so a score would reward writing nothing. ``pdt eval`` flags such an answer and leaves
  its metrics ``None``.
- Redundancy of fewer than two sections is 0.0 for both parts: with one stream nothing can repeat
  across streams. A non-empty section with no sentence (no letters, e.g. ``"1."``) contributes similarity
  0.0 to each of its pairs.
- Words are lowercase runs of letters and digits (``[a-z0-9]+``, with an optional ``'s``-style tail);
  sentences end at ``.``, ``!``, ``?`` followed by space, or at a line break; fragments without a
  letter (``"1."``, ``"-"``) are dropped.
- The text coverage check is deliberately crude: lowercase, drop stop words and words under 3
  letters, strip one common suffix (``-ing``, ``-ed``, ``-es``, ``-s``, ``-ies``, ``-ly``), a final
  ``e`` and a doubled final consonant. A plan item counts as covered when at least ``threshold``
  (default 0.5) of its distinct content stems occur in the section written for it.
- Ratios (rollback rate, speedup, step-cost ratio, note-bus overhead) raise ``ValueError`` naming the
  value on a zero or negative denominator instead of returning ``inf``/``nan``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "calibration",
    "coverage_text",
    "embedding_redundancy",
    "empty_sections",
    "note_bus_overhead",
    "redundancy",
    "repeated_ngram_rate",
    "rollback_rate",
    "serial_fidelity",
    "serial_fidelity_batch",
    "speedup",
    "split_sentences",
    "step_cost_ratio",
    "text_covered_items",
]

TokenInput = str | Sequence[int] | torch.Tensor

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+|\n+")
_LETTER_RE = re.compile(r"[^\W\d_]")
_SUFFIXES = (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("ly", ""), ("s", ""))
_STOP_WORDS = frozenset(
    "a about above after again all also an and any are as at be because been before being below between both but "
    "by can could did do does doing down during each few for from further had has have having her here hers him "
    "his how i if in into is it its itself just more most my no nor not now of off on once only or other our ours "
    "out over own same she should so some such than that the their theirs them then there these they this those "
    "through to too under until up very was we were what when where which while who whom why will with would you "
    "your yours using use make get way ways".split()
)


# --------------------------------------------------------------------------------------------- text helpers
def _check_sections(sections: Sequence[Any], name: str = "sections") -> None:
    if isinstance(sections, str | bytes) or not isinstance(sections, Sequence):
        raise ValueError(
            f"{name}={sections!r:.80} must be a list of section texts, one per stream; wrap it in a list."
        )


def empty_sections(sections: Sequence[str | Sequence[str]], special_tokens: Sequence[str] = ()) -> list[int]:
    """Indices of the empty sections: no non-whitespace text once every ``special_tokens`` string is removed.

    A section is a text or a list of words (empty when no word has a non-whitespace character).
    """
    _check_sections(sections)
    empty = []
    for i, section in enumerate(sections):
        if not isinstance(section, str):
            section = " ".join(str(word) for word in section)
        for token in special_tokens:
            if token:
                section = section.replace(token, "")
        if not section.strip():
            empty.append(i)
    return empty


def _refuse_empty(sections: Sequence[str | Sequence[str]], metric: str) -> None:
    empty = empty_sections(sections)
    if empty:
        raise ValueError(
            f"sections {empty} of {len(sections)} are empty; {metric} does not score an answer with an empty "
            "section. Check with empty_sections() first and report the answer as unscored (pdt eval leaves its "
            "metrics None and flags empty_sections)."
        )


def _words(section: str | Sequence[str]) -> list[str]:
    """Lowercase words of a text, or of an already split word list ``[str]``."""
    if isinstance(section, str):
        return _WORD_RE.findall(section.lower())
    return [str(word).lower() for word in section]


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences at ``.!?`` + whitespace and at line breaks; drop letterless fragments."""
    parts = (part.strip() for part in _SENTENCE_END_RE.split(text))
    return [part for part in parts if _LETTER_RE.search(part)]


def _stem(word: str) -> str:
    for suffix, replacement in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + replacement
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou":
        word = word[:-1]
    return word


def _content_stems(text: str) -> set[str]:
    return {_stem(word) for word in _words(text) if len(word) >= 3 and word not in _STOP_WORDS}


# ---------------------------------------------------------------------------------------- serial fidelity
def _to_ids(value: TokenInput, tokenizer: Any, role: str, add_special_tokens: bool) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(
                f"{role}={value!r:.60} is text but tokenizer=None; pass the trunk's tokenizer or token ids."
            )
        ids = list(tokenizer(value, add_special_tokens=add_special_tokens)["input_ids"])
    elif isinstance(value, torch.Tensor):
        if value.dim() > 2 or (value.dim() == 2 and value.shape[0] != 1):
            raise ValueError(f"{role} has shape {tuple(value.shape)}; pass one sequence as [T] or [1, T].")
        ids = value.reshape(-1).tolist()
    else:
        ids = [int(token) for token in value]
    if not ids:
        raise ValueError(f"{role} is empty after tokenization; the {role} needs at least one token.")
    return ids


@torch.no_grad()
def serial_fidelity_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[TokenInput],
    answers: Sequence[TokenInput],
    batch_size: int = 8,
) -> list[float]:
    """Mean per-token NLL (nats) of each answer under ``model`` reading ``prompt + answer`` serially.

    Args:
        model: a Hugging Face causal LM (``model(input_ids=[N, T], attention_mask=[N, T]).logits`` is
            ``[N, T, V]``). Its train/eval mode is restored afterwards.
        tokenizer: used only for text inputs; prompts get the tokenizer's special tokens (BOS), answers
            do not. Pass ``None`` when every prompt and answer is already token ids. A prompt already
            rendered through a chat template should be passed as ids to avoid a second BOS.
        prompts, answers: equal-length lists; each entry is text, a list of ids, or a ``[T]``/``[1, T]``
            tensor of ids.
        batch_size: pairs per forward.

    Returns:
        One float per pair: ``-mean_t log p(answer_t | prompt, answer_<t)``; lower is closer to what
        serial decoding would write.
    """
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts and {len(answers)} answers; pass equal-length, non-empty lists.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    pairs = [
        (_to_ids(p, tokenizer, "prompt", True), _to_ids(a, tokenizer, "answer", False))
        for p, a in zip(prompts, answers)
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[float] = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            width = max(len(p) + len(a) for p, a in chunk)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)  # [N, T], right-padded
            attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)  # [N, T]
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)  # [N, T], -100 = not scored
            for row, (prompt_ids, answer_ids) in enumerate(chunk):
                n_prompt, n_total = len(prompt_ids), len(prompt_ids) + len(answer_ids)
                input_ids[row, :n_total] = torch.tensor(prompt_ids + answer_ids)
                attention_mask[row, :n_total] = 1
                labels[row, n_prompt:n_total] = torch.tensor(answer_ids)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            shifted_logits = logits[:, :-1].float().transpose(1, 2)  # [N, V, T-1]: position t predicts t+1
            shifted_labels = labels[:, 1:].to(device)  # [N, T-1]
            nll = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="none")  # [N, T-1]
            scored = (shifted_labels != -100).float()
            results.extend(((nll * scored).sum(1) / scored.sum(1)).tolist())
    finally:
        model.train(was_training)
    return results


def serial_fidelity(model: torch.nn.Module, tokenizer: Any, prompt: TokenInput, answer: TokenInput) -> float:
    """Serial fidelity of one answer: mean per-token NLL of ``answer`` given ``prompt`` (see the batch form).

    ``prompt`` and ``answer`` may be text (needs ``tokenizer``) or token ids (``tokenizer`` may be None).
    """
    return serial_fidelity_batch(model, tokenizer, [prompt], [answer])[0]


# --------------------------------------------------------------------------------------------- redundancy
def repeated_ngram_rate(sections: Sequence[str | Sequence[str]], n: int = 4) -> float:
    """Fraction of all word n-grams (pooled over sections) that also occur in at least one other section.

    Each section is a text or a list of words. Repeats inside one section do not count. Sections shorter
    than ``n`` words contribute no n-grams; with fewer than two sections, or no n-gram at all, the rate
    is 0.0. An empty section is refused (``ValueError``).
    """
    _refuse_empty(sections, "repeated_ngram_rate")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer (4 for the redundancy metric).")
    if len(sections) < 2:
        return 0.0
    grams = []
    for section in sections:
        words = _words(section)
        grams.append([tuple(words[i : i + n]) for i in range(len(words) - n + 1)])
    sections_with = Counter(gram for section_grams in grams for gram in set(section_grams))
    total = sum(len(section_grams) for section_grams in grams)
    repeated = sum(1 for section_grams in grams for gram in section_grams if sections_with[gram] >= 2)
    return repeated / total if total else 0.0


def embedding_redundancy(sections: Sequence[str], encoder: Any) -> float:
    """Mean over section pairs ``i < j`` of the max cosine similarity between a sentence of ``i`` and one of ``j``.

    ``encoder.encode(list[str])`` must return a ``[S, D]`` array; all sentences go through one call.
    Fewer than two sections gives 0.0. An empty section is refused (``ValueError``).
    """
    _refuse_empty(sections, "embedding_redundancy")
    if len(sections) < 2:
        return 0.0
    sentences = [split_sentences(section) for section in sections]
    flat = [sentence for section_sentences in sentences for sentence in section_sentences]
    if not flat:
        return 0.0
    embeddings = np.asarray(encoder.encode(flat), dtype=np.float64)  # [S, D]
    if embeddings.ndim != 2 or embeddings.shape[0] != len(flat):
        raise ValueError(
            f"encoder.encode returned shape {embeddings.shape} for {len(flat)} sentences; it must return [S, D]."
        )
    embeddings /= np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    cosine = embeddings @ embeddings.T  # [S, S]
    bounds = np.cumsum([0] + [len(section_sentences) for section_sentences in sentences])
    pair_scores = []
    for i in range(len(sections)):
        for j in range(i + 1, len(sections)):
            block = cosine[bounds[i] : bounds[i + 1], bounds[j] : bounds[j + 1]]  # [S_i, S_j]
            pair_scores.append(float(block.max()) if block.size else 0.0)
    return float(np.clip(np.mean(pair_scores), -1.0, 1.0))


def redundancy(sections: Sequence[str], encoder: Any) -> dict[str, float]:
    """Cross-section redundancy: ``{"embedding": embedding_redundancy, "ngram4": repeated 4-gram rate}``.

    Both are 0.0 for a single section (nothing can repeat across streams); an empty section is refused.
    """
    return {"embedding": embedding_redundancy(sections, encoder), "ngram4": repeated_ngram_rate(sections, 4)}


# ----------------------------------------------------------------------------------------------- coverage
def text_covered_items(sections: Sequence[str], plan: Sequence[str], threshold: float = 0.5) -> list[bool]:
    """Per plan item: do at least ``threshold`` of its content stems occur in ``sections[i]``?

    An item with no content word (only stop words) is covered when its section has any word. An empty
    section is refused (``ValueError``): a score would not tell "never written" from "written off the item".
    """
    _check_sections(sections)
    _check_sections(plan, "plan")
    if len(sections) != len(plan) or not plan:
        raise ValueError(
            f"got {len(sections)} sections for {len(plan)} plan items; pass one section per plan item (non-empty)."
        )
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be in (0, 1]; 0.5 is the documented default.")
    _refuse_empty(sections, "text coverage")
    covered = []
    for section, item in zip(sections, plan):
        wanted = _content_stems(item)
        if not wanted:
            covered.append(bool(_words(section)))
            continue
        present = wanted & {_stem(word) for word in _words(section)}
        covered.append(len(present) / len(wanted) >= threshold)
    return covered


def coverage_text(sections: Sequence[str], plan: Sequence[str], threshold: float = 0.5) -> float:
    """Fraction of plan items judged covered by the text check of ``text_covered_items``."""
    covered = text_covered_items(sections, plan, threshold)
    return sum(covered) / len(covered)


# ------------------------------------------------------------------------------------------------- ratios
def _number(name: str, value: float, fix: str, allow_zero: bool = False) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}; {fix}")
    return number


def rollback_rate(rolled_back_tokens: int, decoded_tokens: int) -> float:
    """Rolled-back tokens / decoded tokens, where ``decoded_tokens`` counts every token decoded (kept or not)."""
    rolled = _number("rolled_back_tokens", rolled_back_tokens, "count the tokens removed by rollbacks.", True)
    decoded = _number("decoded_tokens", decoded_tokens, "count every decoded token, rolled back or kept.")
    if rolled > decoded:
        raise ValueError(
            f"rolled_back_tokens={rolled_back_tokens!r} exceeds decoded_tokens={decoded_tokens!r}; "
            "decoded_tokens must include the tokens that were later rolled back."
        )
    return rolled / decoded


def speedup(serial_seconds: float, pdt_seconds: float) -> float:
    """Serial ``generate`` time for the same total tokens divided by the PDT time (> 1 means PDT is faster)."""
    serial = _number("serial_seconds", serial_seconds, "pass the measured wall-clock time of serial generate.")
    return serial / _number("pdt_seconds", pdt_seconds, "pass the measured wall-clock time of PDT generate.")


def step_cost_ratio(t_k: float, t_1: float) -> float:
    """Time of one decoding step with K streams divided by the time with one stream (ideal: close to 1)."""
    k_time = _number("t_k", t_k, "pass the measured K-stream step time in seconds.")
    return k_time / _number("t_1", t_1, "pass the measured single-stream step time in seconds.")


def note_bus_overhead(t_on: float, t_off: float) -> float:
    """Relative step-time overhead of the note bus: ``t_on / t_off - 1`` (0.1 means 10% slower with the bus)."""
    on = _number("t_on", t_on, "pass the measured step time with the note bus on.")
    return on / _number("t_off", t_off, "pass the measured step time with the note bus off.") - 1.0


# -------------------------------------------------------------------------------------------- calibration
def calibration(
    scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, n_bins: int = 10, threshold: float = 0.5
) -> dict[str, Any]:
    """Calibration of the agreement head: scores in [0, 1] against labels (1 = block agrees, should commit).

    Bins are ``n_bins`` equal-width intervals of [0, 1] (a score of 1.0 falls in the last bin).

    Returns:
        ``ece``: sum over bins of ``count / N * |mean(label) - mean(score)|``; ``brier``: mean of
        ``(score - label)^2``; ``precision`` / ``recall`` of "commit" (``score >= threshold``) against label
        1, each 0.0 when its denominator is empty; ``threshold``; ``n``; and per bin ``bin_counts``,
        ``bin_confidence`` and ``bin_accuracy`` (None for an empty bin) for reliability plots.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)  # [N]
    y = np.asarray(labels).reshape(-1)  # [N]
    if s.size == 0 or s.size != y.size:
        raise ValueError(f"got {s.size} scores and {y.size} labels; pass equal-length, non-empty arrays.")
    if not np.all(np.isfinite(s)) or s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(f"scores span [{s.min()!r}, {s.max()!r}]; pass probabilities in [0, 1] (apply a sigmoid).")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels contain {sorted(set(y.tolist()) - {0, 1})[:5]}; pass 0/1 (or bool) labels.")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r} must be a positive integer (10 is usual).")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be in [0, 1]; use the agreement threshold tau.")
    y = y.astype(np.float64)
    bins = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)  # [N]
    counts = np.bincount(bins, minlength=n_bins)  # [n_bins]
    score_sums = np.bincount(bins, weights=s, minlength=n_bins)
    label_sums = np.bincount(bins, weights=y, minlength=n_bins)
    commit = s >= threshold
    true_commits = float(np.sum(commit & (y == 1)))
    return {
        "ece": float(np.abs(label_sums - score_sums).sum() / s.size),
        "brier": float(np.mean((s - y) ** 2)),
        "precision": float(true_commits / commit.sum()) if commit.any() else 0.0,
        "recall": float(true_commits / y.sum()) if y.any() else 0.0,
        "threshold": float(threshold),
        "n": int(s.size),
        "bin_counts": counts.tolist(),
        "bin_confidence": [float(v / c) if c else None for v, c in zip(score_sums, counts)],
        "bin_accuracy": [float(v / c) if c else None for v, c in zip(label_sums, counts)],
    }
