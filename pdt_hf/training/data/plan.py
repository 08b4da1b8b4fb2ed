"""Text side of the teacher: plan request and parsing, the serial-teacher message, coverage labels.

Design decisions:
- The teacher is asked for exactly K section titles, one a line. Small teachers often answer with prose, so
  the parser keeps only short title-like lines; when fewer than K survive, the plan falls back to the parts the
  prompt itself enumerates ("..., covering A, B, and C"), and last to generic titles. Each example records
  where its plan came from (``teacher``, ``prompt`` or ``generic``).
- The serial teacher writes section k after the prompt, the plan and the sections before k. With no earlier
  section its message is exactly the student's stream message (``generation.prompts.stream_message``), so the
  first section's teacher context equals the student's.
- The conclusion (the synthesis stream's target, ``data.synthesis``) is written by the serial teacher after
  the prompt, the plan and every section's text (``conclusion_message``).
- Coverage labels: a block covers its own stream's plan item; it also covers another item when it contains at
  least ``min_overlap`` of that item's content words (a lexical check, so redundancy is visible to the head).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ...generation.prompts import (
    SYNTHESIS_HEADING,
    SYNTHESIS_TASK,
    request_and_plan,
    stream_message,
    synthesis_message,
)

__all__ = [
    "conclusion_message",
    "content_words",
    "coverage_labels",
    "fallback_plan",
    "parse_plan",
    "plan_message",
    "serial_message",
]

PLAN_INSTRUCTION = (
    "{prompt}\n\nList exactly {k} short titles for the sections of the answer, one per line, with no other text."
)
GENERIC_TITLES = ("Overview", "Key details", "Practical advice", "Examples", "Common mistakes", "Summary")
_STOP = {
    "about",
    "after",
    "also",
    "and",
    "before",
    "between",
    "both",
    "each",
    "from",
    "have",
    "into",
    "like",
    "more",
    "most",
    "over",
    "some",
    "such",
    "than",
    "that",
    "their",
    "them",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "what",
    "when",
    "where",
    "which",
    "while",
    "with",
    "your",
    "ways",
    "how",
    "why",
    "the",
}
_CUES = re.compile(
    r"[:?]|\b(?:covering|including|cover|in terms of|split into|help with|through|about|into|between|with|in|for)\b",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|[a-zA-Z][.)]|#+|section\s+\d+\s*[:.-])\s*", re.IGNORECASE)


def plan_message(prompt: str, k: int) -> str:
    """User message asking the teacher for a K-item plan."""
    return PLAN_INSTRUCTION.format(prompt=prompt.strip(), k=k)


def _title(line: str) -> str | None:
    line = _BULLET.sub("", line.strip())
    bold = re.search(r"\*\*(.+?)\*\*", line)
    if bold:
        line = bold.group(1)
    line = re.split(r"\s[-–—]\s|:", line, maxsplit=1)[0]
    line = line.strip(" *\"'`.#").strip()
    words = line.split()
    if not words or len(words) > 8 or len(line) > 60 or not re.search(r"[A-Za-z]", line):
        return None
    return line[0].upper() + line[1:]


def parse_plan(text: str, k: int) -> list[str] | None:
    """The first K distinct title-like lines of ``text``, or None when fewer than K are found."""
    titles: list[str] = []
    for line in text.splitlines():
        title = _title(line)
        if title and title.lower() not in {t.lower() for t in titles}:
            titles.append(title)
        if len(titles) == k:
            return titles
    return None


def fallback_plan(prompt: str, k: int) -> tuple[list[str], str]:
    """``(plan, source)``: the parts the prompt enumerates, else generic titles.

    The prompt is cut after a colon, a question mark or a cue word ("covering", "about", ...); the shortest
    tail that lists at least K comma/and-separated parts gives the plan.
    """
    text = prompt.strip().rstrip(".?!")
    cuts = [0] + [m.end() for m in _CUES.finditer(text)]
    for start in sorted(set(cuts), reverse=True):
        parts = [p.strip() for p in re.split(r",|;|\band\b|\bor\b", text[start:])]
        parts = [re.sub(r"^(?:the|a|an|how|what|why)\s+", "", p, flags=re.IGNORECASE) for p in parts]
        parts = [p for p in parts if p and len(p.split()) <= 8]
        if len(parts) >= k:
            return [p[0].upper() + p[1:] for p in parts[:k]], "prompt"
    return [GENERIC_TITLES[i % len(GENERIC_TITLES)] for i in range(k)], "generic"


def serial_message(prompt: str, plan: Sequence[str], index: int, earlier: Sequence[str]) -> str:
    """Teacher message for section ``index``: the stream message plus the sections written before it."""
    if not earlier:
        return stream_message(prompt, plan, plan[index])
    written = "\n\n".join(f"{plan[i]}:\n{text.strip()}" for i, text in enumerate(earlier))
    head = request_and_plan(prompt, plan)
    return f'{head}Sections written so far:\n\n{written}\n\nWrite only the section "{plan[index]}".'


def conclusion_message(prompt: str, plan: Sequence[str], sections: Sequence[str]) -> str:
    """Serial-teacher message for the conclusion: the request, the plan, every section's text under its title,
    and the synthesis stream's heading and task. With no sections it is exactly the synthesis stream's message
    (``generation.prompts.synthesis_message``), as ``serial_message`` is the stream message for section 0."""
    if not sections:
        return synthesis_message(prompt, plan)
    written = "\n\n".join(f"{plan[i]}:\n{text.strip()}" for i, text in enumerate(sections))
    head = request_and_plan(prompt, plan)
    return f'{head}Sections written so far:\n\n{written}\n\nWrite only the section "{SYNTHESIS_HEADING}": {SYNTHESIS_TASK}.'


def content_words(text: str) -> set[str]:
    """Lower-cased words of 4+ letters outside a small stop list, cut to 5 letters (a crude stem)."""
    return {w[:5] for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOP}


def coverage_labels(block_texts: Sequence[str], plan: Sequence[str], own: int, min_overlap: float) -> list[list[int]]:
    """``[num_blocks][K]`` 0/1 labels: own item always 1; item p if the block holds >= min_overlap of its words."""
    item_words = [content_words(item) for item in plan]
    labels = []
    for text in block_texts:
        words = content_words(text)
        row = []
        for p, item in enumerate(item_words):
            hit = p == own or (bool(item) and len(item & words) >= min_overlap * len(item))
            row.append(int(hit))
        labels.append(row)
    return labels
