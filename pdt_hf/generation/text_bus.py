"""The text bus: the lag-consistent prompt layout, and decoding K streams that read each other's text.

A parallel stream in round r can see what its siblings committed in rounds ``<= r - Δ`` and nothing newer.
The *text bus* gives a stream exactly that, as text: the trunk reads the prompt, the plan, the siblings'
visible blocks and its own section so far. One module owns this layout; three users share it:

- the lag-consistent teacher of ``pdt data build`` (``data.build.teacher_mode: lag``) writes its sections
  with :func:`decode_text_bus` and scores them in the same per-round contexts (:func:`round_contexts`);
- ``pdt data ceiling`` scores given sections in these contexts (the reachable ceiling of notes);
- ``pdt eval`` / ``pdt bench`` run it as the training-free decoding method ``pdt-text-bus``.

Layout of stream k's context in round r: its own stream message (``prompts.stream_message``) with one part
inserted before the last line, then its own blocks of rounds 1..r-1 as the assistant's text so far. Example,
K = 3, B = 4, Δ = 1, reader "Evidence" (k = 1) in round 3::

    user:      Explain essays.

               The answer has these sections: Thesis; Evidence; Conclusion.
               What the other sections have written so far:

               Thesis:
               <decoded text of Thesis blocks 1-2>

               Conclusion:
               <decoded text of Conclusion blocks 1-2>

               Write only the section "Evidence".
    assistant: <Evidence blocks 1-2, as token ids>   -> writes block 3 (B tokens)

Which sibling blocks a reader sees (a stream writes block r in round r; siblings in plan order, the reader
itself never)::

    round r        1     2     3      4
    Δ = 1          -     1     1-2    1-3
    Δ = 2          -     -     1      1-2

Design decisions:
- With nothing visible (round r <= Δ, or every sibling's visible text is empty) the message is exactly the
  student's stream message, so round 1 of the text bus is isolated decoding and the lag teacher's first blocks
  are what a stream with no notes would be taught.
- Siblings' text is their visible blocks decoded together (special tokens skipped, stripped); a sibling with
  no visible text is left out. Own text stays token ids, so a stream continues its own tokens exactly.
- No window: every visible sibling block is shown (decoding's note window W bounds notes, not text).
- Δ >= 1 is required: with Δ = 0 a stream would read sibling text written in the same round.
- The context of round r depends only on blocks of rounds <= r - 1, so contexts recomputed from the finished
  sections (:func:`round_contexts`) equal the ones decoding used; teacher-forced scoring relies on this.
- Cost, honestly: each round re-prefills every active stream's whole context (the siblings' text grows each
  round); notes avoid this. :class:`TextBusResult` reports the prefill tokens and seconds of every round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from .prompts import render_ids, request_and_plan, stream_message

__all__ = [
    "SIBLINGS_HEADER",
    "TextBusResult",
    "check_lag",
    "decode_text_bus",
    "hf_generate",
    "lag_context",
    "lag_message",
    "round_contexts",
    "stop_and_pad_ids",
    "visible_sibling_blocks",
]

SIBLINGS_HEADER = "What the other sections have written so far:"

Generate = Callable[[list[list[int]], int, int], list[list[int]]]
"""``generate(rows, max_new_tokens, round)`` -> the new tokens of each row, cut after the first EOS (kept)."""


def _num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)  # ceil(S / B), as training.rounds.num_blocks


def check_lag(lag: int) -> int:
    """Validate Δ for the text bus (an integer >= 1)."""
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 1:
        raise ValueError(
            f"note_lag={lag!r}: the text bus and the lag teacher need an integer note_lag >= 1 (at 0 a stream "
            "would read sibling text written in the same round); set pdt.note_lag=1."
        )
    return lag


def visible_sibling_blocks(
    block_rounds: Sequence[Sequence[int]], reader: int, round_: int, lag: int
) -> dict[int, list[int]]:
    """Rounds of the sibling blocks reader ``reader`` sees in round ``round_``: those with round <= r - Δ.

    Args:
        block_rounds: ``[K][nb_j]`` the round of each block of each stream (``[1, 2, ..., nb_j]`` when a stream
            writes one block per round).
    Returns:
        ``{j: [rounds]}`` for the siblings ``j != reader`` with at least one visible block, in plan order.
    """
    check_lag(lag)
    out = {}
    for j, rounds in enumerate(block_rounds):
        seen = [r for r in rounds if r <= round_ - lag]
        if j != reader and seen:
            out[j] = seen
    return out


def lag_message(prompt: str, plan: Sequence[str], reader: int, siblings: Sequence[tuple[int, str]]) -> str:
    """The user message of stream ``reader`` given the siblings' visible text ``[(j, text), ...]``.

    Empty texts are left out; with none left this is exactly ``stream_message(prompt, plan, plan[reader])``.
    """
    shown = [(j, text.strip()) for j, text in siblings if text.strip()]
    if not shown:
        return stream_message(prompt, plan, plan[reader])
    head = request_and_plan(prompt, plan)
    written = "\n\n".join(f"{plan[j]}:\n{text}" for j, text in shown)
    return f'{head}{SIBLINGS_HEADER}\n\n{written}\n\nWrite only the section "{plan[reader]}".'


def lag_context(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    plan: Sequence[str],
    sections: Sequence[Sequence[int]],
    reader: int,
    round_: int,
    lag: int,
    block_size: int,
) -> list[int]:
    """Context ids (chat-templated user turn + assistant header) of ``reader``'s block ``round_``.

    ``sections[j]`` holds stream j's tokens so far (block r = tokens ``[(r-1)B, rB)``); the reader's own
    tokens are not part of the context (the caller appends them).
    """
    rounds = [list(range(1, _num_blocks(len(s), block_size) + 1)) for s in sections]
    visible = visible_sibling_blocks(rounds, reader, round_, lag)
    texts = []
    for j, seen in visible.items():
        end = min(len(sections[j]), max(seen) * block_size)  # block r holds tokens [(r-1)B, rB)
        texts.append((j, tokenizer.decode(list(sections[j][:end]), skip_special_tokens=True)))
    return render_ids(tokenizer, lag_message(prompt, plan, reader, texts))


def round_contexts(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    plan: Sequence[str],
    sections: Sequence[Sequence[int]],
    lag: int,
    block_size: int,
) -> list[list[list[int]]]:
    """``[K][nb_k]`` the context of every block of every finished section (what decoding read in that round)."""
    return [
        [
            lag_context(tokenizer, prompt, plan, sections, k, r, lag, block_size)
            for r in range(1, _num_blocks(len(sections[k]), block_size) + 1)
        ]
        for k in range(len(sections))
    ]


@dataclass
class TextBusResult:
    """What :func:`decode_text_bus` wrote for P requests of K streams each.

    ``sections`` ``[P][K][S]``: new tokens per stream (a final EOS kept); ``contexts`` ``[P][K][nb]``: the
    context ids each block was written after (own earlier tokens not included); ``finish_reasons`` ``[P][K]``:
    ``eos`` or ``length``; ``rounds``: per round, ``active`` streams, ``prefill_tokens`` (context + own tokens
    fed again this round, summed over active streams), ``new_tokens`` and ``seconds``.
    """

    sections: list[list[list[int]]]
    contexts: list[list[list[list[int]]]]
    finish_reasons: list[list[str]]
    rounds: list[dict] = field(default_factory=list)

    @property
    def prefill_tokens(self) -> int:
        return sum(r["prefill_tokens"] for r in self.rounds)


def decode_text_bus(
    generate: Generate,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, Sequence[str]]],
    block_size: int,
    lag: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
) -> TextBusResult:
    """Write K sections per ``(prompt, plan)`` request round by round, every stream reading lagged sibling text.

    Round r: every active stream of every request (one batch) continues ``lag_context(...) + own tokens`` by
    ``min(B, max_new_tokens - written)`` tokens through ``generate``; a stream stops at EOS or at
    ``max_new_tokens``. Contexts of round r use only blocks of earlier rounds.
    """
    check_lag(lag)
    if block_size < 1 or max_new_tokens < 1:
        raise ValueError(f"block_size={block_size} and max_new_tokens={max_new_tokens} must be >= 1.")
    eos = set(eos_ids)
    sections = [[[] for _ in plan] for _, plan in requests]
    contexts = [[[] for _ in plan] for _, plan in requests]
    reasons: list[list[str | None]] = [[None for _ in plan] for _, plan in requests]
    rounds: list[dict] = []
    round_ = 0
    while any(r is None for row in reasons for r in row):
        round_ += 1
        start = time.perf_counter()
        active = [(p, k) for p, row in enumerate(reasons) for k, r in enumerate(row) if r is None]
        rows, before = [], []
        for p, k in active:
            prompt, plan = requests[p]
            context = lag_context(tokenizer, prompt, plan, sections[p], k, round_, lag, block_size)
            contexts[p][k].append(context)
            rows.append(context + sections[p][k])
            before.append(len(sections[p][k]))
        budget = min(block_size, max_new_tokens - (round_ - 1) * block_size)
        written = generate(rows, budget, round_)
        for (p, k), block in zip(active, written):
            block = list(block[:budget])
            cut = next((i + 1 for i, t in enumerate(block) if t in eos), None)
            block = block[:cut] if cut is not None else block
            sections[p][k] += block
            if cut is not None:
                reasons[p][k] = "eos"
            elif len(sections[p][k]) >= max_new_tokens or len(block) < budget:
                reasons[p][k] = "length"
        rounds.append(
            {
                "round": round_,
                "active": len(active),
                "prefill_tokens": sum(len(r) for r in rows),
                "new_tokens": sum(len(sections[p][k]) - n for (p, k), n in zip(active, before)),
                "seconds": time.perf_counter() - start,
            }
        )
    return TextBusResult(sections, contexts, [[str(r) for r in row] for row in reasons], rounds)


def stop_and_pad_ids(trunk, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], int]:
    """``(EOS ids, pad id)``: the trunk's generation-config EOS ids and the tokenizer's, pad = pad or first EOS."""
    ids: set[int] = set()
    for eos in (getattr(trunk.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    eos_ids = sorted(int(e) for e in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0]
    return eos_ids, int(pad)


def hf_generate(trunk, pad_id: int, eos_ids: Sequence[int], exact: bool = False) -> Generate:
    """A :data:`Generate` over an HF causal LM: one left-padded greedy ``generate`` call per round.

    ``exact``: EOS cannot end a row (``min_new_tokens = max_new_tokens``), so every stream writes its budget
    (``pdt bench``).
    """

    @torch.no_grad()
    def generate(rows: list[list[int]], max_new_tokens: int, round_: int) -> list[list[int]]:
        width = max(len(r) for r in rows)
        device = next(trunk.parameters()).device
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)  # [N, T] left padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        extra = {"min_new_tokens": max_new_tokens} if exact else {}
        out = trunk.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            **extra,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=list(eos_ids) or None,
        )
        return out[:, width:].tolist()  # [N, <= max_new_tokens]; decode_text_bus cuts after EOS

    return generate
