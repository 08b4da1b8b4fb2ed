"""Rounds of a section in training: which positions predict which block, which notes each position may read.

Pure index arithmetic (no storage), shared by the data builder (teacher block states) and the trainer (student
block states, query rounds), so both use one definition.

A section ``x_0 .. x_{S-1}`` is cut into blocks of B tokens; block r (1, 2, ...) is decoded in round r. In a
stream row ``[prefix | suffix s_0 .. s_{m-1} | x_0 .. x_{S-1}]`` the input at a position predicts the next token.
The forwards a decoder runs in round r are the ones that predict block r's tokens, except the very first token
``x_0``, which comes out of the prompt prefill (before any note exists). Example with B = 4, S = 10::

    input          s_last  x0  x1  x2  x3  x4  x5  x6  x7  x8  x9
    predicts         x0    x1  x2  x3  x4  x5  x6  x7  x8  x9   -
    predicted block   1     1   1   1   2   2   2   2   3   3   -
    query round     none    1   1   1   2   2   2   2   3   3  none
    block state of round r = positions whose query round is r:
                            |--- 1 ---| |----- 2 -----| |-3-|

- ``query round`` is the round a position is computed in: it reads sibling notes of rounds ``<= r - Δ``.
  ``none`` (prompt positions, the last section token, padding) reads no note at all.
- The *block state* of round r (notes head input, teacher note target, agreement features) pools the hidden
  states of the positions whose query round is r. Block 1 has B - 1 of them; a one-token section has none.
- KD / LM losses and the per-block divergence use the *predicted block* of every position (all S tokens).
"""

from __future__ import annotations

import math

__all__ = [
    "NO_NOTES_ROUND",
    "block_bounds",
    "num_blocks",
    "predicted_blocks",
    "section_query_rounds",
    "state_positions",
]

NO_NOTES_ROUND = -(2**41)
"""Query round that sees no note, not even the always-visible planner notes (``-2**40``), for any lag >= 0."""


def num_blocks(section_len: int, block_size: int) -> int:
    """Blocks a section of ``section_len`` tokens spans: ``ceil(S / B)`` (0 for an empty section)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    return math.ceil(section_len / block_size)


def block_bounds(section_len: int, block_size: int) -> list[int]:
    """Token offsets ``[0, B, 2B, ..., S]``: block r (1-based) holds tokens ``bounds[r-1]:bounds[r]``."""
    return [min(i * block_size, section_len) for i in range(num_blocks(section_len, block_size))] + [section_len]


def predicted_blocks(section_len: int, block_size: int) -> list[int]:
    """Block (round) of each section token ``x_i``: ``i // B + 1``, length S."""
    return [i // block_size + 1 for i in range(section_len)]


def section_query_rounds(section_len: int, block_size: int) -> list[int]:
    """Query round of the input position of each section token ``x_j`` (length S).

    ``x_j`` predicts ``x_{j+1}``, so it is computed in round ``(j + 1) // B + 1``; the last token predicts
    nothing and gets :data:`NO_NOTES_ROUND`. The suffix positions before the section are always
    :data:`NO_NOTES_ROUND` (the prompt prefill runs before any note exists).
    """
    rounds = [(j + 1) // block_size + 1 for j in range(section_len)]
    if rounds:
        rounds[-1] = NO_NOTES_ROUND
    return rounds


def state_positions(section_len: int, block_size: int) -> list[list[int]]:
    """Section-token indices j whose input position forms the block state of each round (one list per block).

    Round r gets ``j`` in ``[(r-1)B - 1, rB - 2]`` clipped to ``[0, S - 2]``; lists may be empty.
    """
    rounds = section_query_rounds(section_len, block_size)
    groups: list[list[int]] = [[] for _ in range(num_blocks(section_len, block_size))]
    for j, r in enumerate(rounds):
        if r != NO_NOTES_ROUND:
            groups[r - 1].append(j)
    return groups
