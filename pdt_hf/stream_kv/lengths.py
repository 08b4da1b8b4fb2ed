"""Stream KV bookkeeping: per-stream suffix lengths, step positions, step masks and rollback checks.

Design decisions:
- The prompt is prefilled once (P tokens, shared); stream k then owns suffix slots 0..lengths[k]-1 of its own
  preallocated storage. Its next token sits at position P + lengths[k] and is written to slot lengths[k].
- A step runs a subset of A streams, T tokens each, in one batched forward. Slots past a stream's length may hold
  stale K/V from rolled-back tokens; the mask hides them, so a rollback is only ``lengths[k] -= n`` (O(1), no
  re-prefill, no clone, no zeroing).
- A step only looks at the first S_step = max(lengths of the stepped streams) + T suffix slots, so attention
  cost follows the real lengths rather than the capacity.
- Lengths live on the CPU (a [K] int64 tensor): they are read by Python checks every step, and their device
  copies are a handful of integers.

One step of A = 2 streams, P = 4, lengths = [3, 1], T = 2 (S_step = 3 + 2 = 5; 1 = visible, . = masked)::

    kv column        0 1 2 3 | 4 5 6 7 8        prefix | suffix slots 0..4
    stream 0  t=0    1 1 1 1 | 1 1 1 1 .        position P+3 = 7, writes slot 3
              t=1    1 1 1 1 | 1 1 1 1 1        position 8, writes slot 4
    stream 1  t=0    1 1 1 1 | 1 1 . . .        position 5, writes slot 1
              t=1    1 1 1 1 | 1 1 1 . .        position 6, writes slot 2   (slots 3, 4: stale or empty)

Rollback of stream 0 by n = 2 after that step: lengths [5, 3] -> [3, 3]; slots 3, 4 are stale and masked, and
the next token of stream 0 is written to slot 3 at position 7 again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "StreamKVFullError",
    "StreamLengths",
    "StreamStep",
    "check_rollback",
    "flat_write_index",
    "step_positions",
    "step_visibility",
    "visibility_to_mask",
    "write_slots",
]


class StreamKVFullError(RuntimeError):
    """A step would write past a stream's preallocated suffix capacity."""


def write_slots(lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Suffix slots the new tokens go to: ``lengths[:, None] + arange(T)``, int64 [A, T]."""
    return lengths.long()[:, None] + torch.arange(num_tokens, device=lengths.device)[None, :]


def flat_write_index(streams: torch.Tensor, slots: torch.Tensor, heads: int, total: int, offset: int) -> torch.Tensor:
    """Rows of a contiguous [K, Hkv, S_tot, D] storage viewed as [K * Hkv * S_tot, D] that a step writes, int64.

    Entry (a, h, t) is ``(streams[a] * Hkv + h) * S_tot + offset + slots[a, t]``, flattened in the order of the
    step's K/V ``[A, Hkv, T, D]``, so one ``index_copy_`` writes every stream's new tokens; ``offset`` is P when the
    storage holds the prefix first (static layout), else 0. Streams [2, 0], slots [[1], [3]], Hkv 2, S_tot 5::

        stream 2: rows (2*2 + 0)*5 + 1 = 21, (2*2 + 1)*5 + 1 = 26;  stream 0: rows 3, 8   ->   [21, 26, 3, 8]
    """
    head = torch.arange(heads, device=slots.device)[None, :, None]  # [1, Hkv, 1]
    base = (streams[:, None, None] * heads + head) * total + offset  # [A, Hkv, 1]
    return (base + slots[:, None, :]).reshape(-1)  # [A * Hkv * T]


def step_positions(prefix_len: int, lengths: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Position ids of the new tokens: ``P + lengths[:, None] + arange(T)``, int64 [A, T]."""
    return prefix_len + write_slots(lengths, num_tokens)


def step_visibility(prefix_len: int, lengths: torch.Tensor, num_tokens: int, suffix_width: int) -> torch.Tensor:
    """Which kv columns each new token sees: bool [A, T, P + S], S = ``suffix_width``.

    Column j < P is a prefix token (always visible); column P + s is suffix slot s, visible to token t of a stream
    with length l iff s <= l + t (its committed suffix, the earlier new tokens, and itself).
    """
    slot = torch.arange(suffix_width, device=lengths.device)  # [S]
    last = write_slots(lengths, num_tokens)  # [A, T], the slot each token writes
    suffix = slot[None, None, :] <= last[:, :, None]  # [A, T, S]
    prefix = torch.ones(*suffix.shape[:2], prefix_len, dtype=torch.bool, device=lengths.device)  # [A, T, P]
    return torch.cat([prefix, suffix], dim=-1)


def visibility_to_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """4D attention mask [A, 1, T, KV] from bool [A, T, KV]: bool as is, or additive (0 / dtype min) for floats.

    The additive form works for both the ``sdpa`` and the ``eager`` attention of transformers; ``eager`` adds the
    mask to the scores, so it cannot take a bool mask.
    """
    visible = visible[:, None]  # [A, 1, T, KV]
    if dtype == torch.bool:
        return visible
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)


def check_rollback(stream: int, length: int, n: int, commit_horizon: int | None) -> None:
    """Raise ValueError unless 0 <= n <= length and n <= commit_horizon (L)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"rollback count must be an integer >= 0, got {n!r}.")
    if n > length:
        raise ValueError(
            f"cannot roll stream {stream} back by {n} tokens: its suffix holds only {length}; "
            "the shared prompt prefix is never rolled back."
        )
    if commit_horizon is not None and n > commit_horizon:
        raise ValueError(
            f"cannot roll stream {stream} back by {n} tokens: commit_horizon (L) is {commit_horizon}; "
            "roll back at most L tokens per call or raise PDTConfig.commit_horizon."
        )


@dataclass(frozen=True)
class StreamStep:
    """One planned step: which streams, how many tokens, where they go.

    Attributes:
        streams: int64 [A] (on the storage device), the stepped streams in batch order.
        num_tokens: T.
        lengths: int64 [A] (storage device), suffix lengths before the step.
        slots: int64 [A, T] (storage device), the suffix slot of each new token.
        positions: int64 [A, T] (storage device), their position ids.
        suffix_width: S_step = max(lengths) + T, the suffix slots the step attends over.
        all_streams: whether ``streams`` is exactly ``arange(K)`` (storage rows need no gather).
        ragged: whether the fast single-token path serves this step.
    """

    streams: torch.Tensor
    num_tokens: int
    lengths: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    suffix_width: int
    all_streams: bool
    ragged: bool = False


class StreamLengths:
    """Suffix lengths [K] of K streams sharing a P-token prefix, with capacity and rollback-horizon checks."""

    def __init__(self, num_streams: int, prefix_len: int, capacity: int, commit_horizon: int | None = None) -> None:
        for name, value, low in (("num_streams", num_streams, 1), ("suffix_capacity", capacity, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if commit_horizon is not None and (
            isinstance(commit_horizon, bool) or not isinstance(commit_horizon, int) or commit_horizon < 1
        ):
            raise ValueError(f"commit_horizon must be a positive integer or None, got {commit_horizon!r}.")
        self.num_streams, self.prefix_len, self.capacity = num_streams, prefix_len, capacity
        self.commit_horizon = commit_horizon
        self.lengths = torch.zeros(num_streams, dtype=torch.long)  # [K], CPU

    def plan(self, streams: torch.Tensor, num_tokens: int, device: torch.device) -> StreamStep:
        """Validate a step of ``streams`` [A] by T tokens and compute its slots and positions (nothing changes)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}.")
        # Checks run on Python ints (one conversion each way): a decode step plans A <= K streams every token.
        ids = torch.as_tensor(streams).reshape(-1).long().cpu()  # [A]
        rows = ids.tolist()
        if not rows:
            raise ValueError("a step needs at least one stream; skip the forward when every stream is finished.")
        if min(rows) < 0 or max(rows) >= self.num_streams:
            raise ValueError(f"streams {rows} out of range for num_streams={self.num_streams}.")
        if len(set(rows)) != len(rows):
            raise ValueError(f"streams {rows} has duplicates; each stream appears once per step.")
        every = self.lengths.tolist()
        lengths = [every[k] for k in rows]
        for k, held in zip(rows, lengths):
            if held + num_tokens > self.capacity:
                raise StreamKVFullError(
                    f"stream {k} holds {held} of suffix_capacity={self.capacity} tokens and cannot take "
                    f"{num_tokens} more; build the cache with a larger suffix_capacity "
                    f"(StreamKVCache.from_prefix(..., suffix_capacity={held + num_tokens}) or more)."
                )
        lengths_t = torch.tensor(lengths, dtype=torch.long)  # [A]
        slots = write_slots(lengths_t, num_tokens)  # [A, T]
        return StreamStep(
            streams=ids.to(device),
            num_tokens=num_tokens,
            lengths=lengths_t.to(device),
            slots=slots.to(device),
            positions=(self.prefix_len + slots).to(device),
            suffix_width=max(lengths) + num_tokens,
            all_streams=rows == list(range(self.num_streams)),
        )

    def advance(self, step: StreamStep) -> None:
        """Commit a finished step: ``lengths[streams] += T``."""
        self.lengths[step.streams.cpu()] += step.num_tokens

    def rollback(self, stream: int, n: int) -> None:
        """``lengths[stream] -= n`` after ``check_rollback``; other streams are untouched."""
        if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < self.num_streams:
            raise ValueError(f"stream must be an integer in [0, {self.num_streams}), got {stream!r}.")
        check_rollback(stream, int(self.lengths[stream]), n, self.commit_horizon)
        self.lengths[stream] -= n
