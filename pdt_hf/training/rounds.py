"""Rounds of a section in training: which positions predict which block, which notes each position may read.

Pure index arithmetic (no storage), shared by the data builder (teacher block states) and the trainer (student
block states, query rounds), so both use one definition. It follows the decode loop
(``generation/decode.py``): the first section token ``x_0`` comes out of the prompt prefill, before any note
exists; in round r each token of block r is sampled and then fed, reading the notes visible in round r, and
the hidden states of those B fed tokens are the block's state. Example with B = 4, S = 10::

    input          s_last  x0  x1  x2  x3  x4  x5  x6  x7  x8  x9
    predicts         x0    x1  x2  x3  x4  x5  x6  x7  x8  x9   -
    predicted block   1     1   1   1   2   2   2   2   3   3   -
    query round     none    1   1   1   1   2   2   2   2   3   3
    block state             |----- 1 -----| |----- 2 -----| |-3-|

- ``query round`` is the round a position is computed in: it reads sibling notes of rounds ``<= r - Δ``.
  ``none`` (prompt positions, padding) reads no note at all.
- The *block state* of round r (notes head input, teacher note target, agreement features) pools the hidden
  states at block r's own tokens (the positions whose query round is r).
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
    """Query round of the input position of each section token ``x_j`` (length S): ``j // B + 1``.

    ``x_j`` is fed in the round of its own block. The suffix positions before the section are always
    :data:`NO_NOTES_ROUND` (the prompt prefill runs before any note exists).
    """
    return [j // block_size + 1 for j in range(section_len)]


def state_positions(section_len: int, block_size: int) -> list[list[int]]:
    """Section-token indices whose hidden states form the block state of each round: block r's own tokens."""
    bounds = block_bounds(section_len, block_size)
    return [list(range(bounds[r], bounds[r + 1])) for r in range(len(bounds) - 1)]
