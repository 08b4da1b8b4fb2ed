"""Collating built examples into padded tensors: one row per (example, stream).

Row ``n = e * K + k`` is stream k of example e. Its *stream part* is ``suffix_k + section_k`` (right padded to S);
the example's shared ``prefix`` is kept apart, read once by the bare trunk::

    prefix (bare trunk) | s_0 .. s_{m-1} x_0 .. x_{L-1} <pad> ...     stream part, length S
                               ^ pred_pos[n, 0] = m - 1 predicts x_0; pred_pos[n, i] = m - 1 + i

Section-indexed tensors (``labels``, ``kd_*``, ``pred_block``, ``dependence``) have width L = longest section;
block-indexed ones (``note_targets``, ``coverage``) have R = most blocks. Rounds follow :mod:`..rounds`.

With ``synthesis=True`` (examples joined with their conclusions, ``data.synthesis.load_synthesis``) each
example also gets one synthesis row, a whole row read with the sidecar masked off the prompt part::

    prefix[:n] (bare trunk) | synthesis suffix  c_0 .. c_{C-1} <pad> ...      width T
                              ^ synthesis_mask (slot K, every note) ^ synthesis_pred_pos[e, 0] predicts c_0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .data.schema import NoteProjection
from .rounds import NO_NOTES_ROUND, predicted_blocks, section_query_rounds, state_positions

__all__ = ["TrainBatch", "collate", "collate_synthesis"]


@dataclass
class TrainBatch:
    """E examples x K streams = N rows; S stream-part width, L section width, R blocks, k top-k."""

    prefix_ids: list[list[int]]  # E prompt prefixes (python lists, for the bare-trunk prefix pass)
    example_index: torch.Tensor  # [N] example of each row
    stream_ids: torch.Tensor  # [N] stream (plan item) of each row
    stream_input: torch.Tensor  # [N, S] suffix + section tokens, right padded
    stream_len: torch.Tensor  # [N] real length of the stream part
    suffix_len: torch.Tensor  # [N]
    query_round: torch.Tensor  # [N, S] round each stream position is computed in (NO_NOTES_ROUND: none)
    pred_pos: torch.Tensor  # [N, L] stream-part position predicting section token i
    section_mask: torch.Tensor  # [N, L] real section tokens
    labels: torch.Tensor  # [N, L] section tokens, -100 on padding
    pred_block: torch.Tensor  # [N, L] block (round) of section token i, 1-based
    kd_ids: torch.Tensor  # [N, L, k]
    kd_logprobs: torch.Tensor  # [N, L, k]
    dependence: torch.Tensor  # [N, L] teacher KL with vs without earlier sections
    block_exists: torch.Tensor  # [N, R] block r < ceil(L_n / B)
    block_has_state: torch.Tensor  # [N, R] block has >= 1 state position (notes, agreement)
    note_targets: torch.Tensor  # [N, R, d_note] projected teacher block states
    section_targets: torch.Tensor  # [N, d_note] projected teacher section state (planner target)
    section_has_state: torch.Tensor  # [N]
    coverage: torch.Tensor  # [N, R, K] 0/1 labels
    num_streams: int
    block_size: int
    synthesis_input: torch.Tensor | None = None  # [E, T] prefix[:n] + synthesis suffix + conclusion, right padded
    synthesis_mask: torch.Tensor | None = None  # [E, T] positions the sidecar acts on (suffix + conclusion)
    synthesis_pred_pos: torch.Tensor | None = None  # [E, C] position predicting conclusion token i
    synthesis_labels: torch.Tensor | None = None  # [E, C] conclusion tokens, -100 on padding
    synthesis_kd_ids: torch.Tensor | None = None  # [E, C, k]
    synthesis_kd_logprobs: torch.Tensor | None = None  # [E, C, k]

    @property
    def num_examples(self) -> int:
        return len(self.prefix_ids)

    @property
    def num_blocks(self) -> int:
        return self.block_exists.shape[1]

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        return TrainBatch(**moved)


def collate_synthesis(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The ``synthesis_*`` fields of a batch (module docstring) from examples joined with their conclusions."""
    prefixes = [list(ex["prefix_ids"][: ex["synthesis_prefix_len"]]) for ex in examples]
    stems = [p + list(ex["synthesis_suffix_ids"]) for p, ex in zip(prefixes, examples)]
    conclusions = [list(ex["conclusion_ids"]) for ex in examples]
    e = len(examples)
    width = max(len(a) + len(b) for a, b in zip(stems, conclusions))
    c_width = max(max(len(c) for c in conclusions), 1)
    top_k = next((len(ex["conclusion_kd_ids"][0]) for ex in examples if ex["conclusion_kd_ids"]), 1)
    out = {
        "synthesis_input": torch.full((e, width), pad_id, dtype=torch.long),
        "synthesis_mask": torch.zeros((e, width), dtype=torch.bool),
        "synthesis_pred_pos": torch.zeros((e, c_width), dtype=torch.long),
        "synthesis_labels": torch.full((e, c_width), -100, dtype=torch.long),
        "synthesis_kd_ids": torch.zeros((e, c_width, top_k), dtype=torch.long),
        "synthesis_kd_logprobs": torch.zeros((e, c_width, top_k)),
    }
    for i, (prefix, stem, conclusion, ex) in enumerate(zip(prefixes, stems, conclusions, examples)):
        m, length = len(stem), len(conclusion)
        out["synthesis_input"][i, : m + length] = torch.tensor(stem + conclusion, dtype=torch.long)
        out["synthesis_mask"][i, len(prefix) : m + length] = True
        if length:
            out["synthesis_pred_pos"][i, :length] = torch.arange(length) + m - 1
            out["synthesis_labels"][i, :length] = torch.tensor(conclusion)
            out["synthesis_kd_ids"][i, :length] = torch.tensor(ex["conclusion_kd_ids"], dtype=torch.long)
            out["synthesis_kd_logprobs"][i, :length] = torch.tensor(ex["conclusion_kd_logprobs"])
    return out


def collate(
    examples: list[dict],
    projection: NoteProjection,
    num_streams: int,
    block_size: int,
    pad_id: int,
    synthesis: bool = False,
) -> TrainBatch:
    """Pad ``examples`` (rows of a built split) into a :class:`TrainBatch` (CPU tensors); ``synthesis`` also
    collates their conclusions (``collate_synthesis``)."""
    rows = [(e, k) for e in range(len(examples)) for k in range(num_streams)]
    for ex in examples:
        if len(ex["section_ids"]) != num_streams:
            raise ValueError(
                f"example {ex['prompt_id']} has {len(ex['section_ids'])} streams, the sidecar has {num_streams}."
            )
    suffix = [examples[e]["suffix_ids"][k] for e, k in rows]
    section = [examples[e]["section_ids"][k] for e, k in rows]
    n = len(rows)
    s_width = max(len(a) + len(b) for a, b in zip(suffix, section))
    l_width = max(max(len(b) for b in section), 1)
    r_width = max(max(-(-len(b) // block_size) for b in section), 1)
    top_k = len(examples[0]["kd_ids"][0][0]) if examples[0]["kd_ids"][0] else 1
    d_teacher = projection.mean.shape[0]

    stream_input = torch.full((n, s_width), pad_id, dtype=torch.long)
    query_round = torch.full((n, s_width), NO_NOTES_ROUND, dtype=torch.long)
    pred_pos = torch.zeros((n, l_width), dtype=torch.long)
    labels = torch.full((n, l_width), -100, dtype=torch.long)
    pred_block = torch.ones((n, l_width), dtype=torch.long)
    kd_ids = torch.zeros((n, l_width, top_k), dtype=torch.long)
    kd_logprobs = torch.zeros((n, l_width, top_k))
    dependence = torch.zeros((n, l_width))
    block_exists = torch.zeros((n, r_width), dtype=torch.bool)
    block_has_state = torch.zeros((n, r_width), dtype=torch.bool)
    raw_targets = torch.zeros((n, r_width, d_teacher))
    raw_section = torch.zeros((n, d_teacher))
    coverage = torch.zeros((n, r_width, num_streams))
    for row, (e, k) in enumerate(rows):
        ex, m, length = examples[e], len(suffix[row]), len(section[row])
        stream_input[row, : m + length] = torch.tensor(suffix[row] + section[row], dtype=torch.long)
        if length:
            query_round[row, m : m + length] = torch.tensor(section_query_rounds(length, block_size))
            pred_pos[row, :length] = torch.arange(length) + m - 1
            labels[row, :length] = torch.tensor(section[row])
            pred_block[row, :length] = torch.tensor(predicted_blocks(length, block_size))
            kd_ids[row, :length] = torch.tensor(ex["kd_ids"][k], dtype=torch.long)
            kd_logprobs[row, :length] = torch.tensor(ex["kd_logprobs"][k])
            dependence[row, :length] = torch.tensor(ex["sibling_dependence"][k])
        groups = state_positions(length, block_size)
        nb = len(groups)
        block_exists[row, :nb] = True
        block_has_state[row, :nb] = torch.tensor([bool(g) for g in groups], dtype=torch.bool)
        if nb:
            raw_targets[row, :nb] = torch.tensor(ex["note_targets"][k])
            coverage[row, :nb] = torch.tensor(ex["coverage"][k], dtype=torch.float32)
        raw_section[row] = torch.tensor(ex["section_targets"][k])
    return TrainBatch(
        prefix_ids=[list(ex["prefix_ids"]) for ex in examples],
        example_index=torch.tensor([e for e, _ in rows], dtype=torch.long),
        stream_ids=torch.tensor([k for _, k in rows], dtype=torch.long),
        stream_input=stream_input,
        stream_len=torch.tensor([len(a) + len(b) for a, b in zip(suffix, section)], dtype=torch.long),
        suffix_len=torch.tensor([len(a) for a in suffix], dtype=torch.long),
        query_round=query_round,
        pred_pos=pred_pos,
        section_mask=labels != -100,
        labels=labels,
        pred_block=pred_block,
        kd_ids=kd_ids,
        kd_logprobs=kd_logprobs,
        dependence=dependence,
        block_exists=block_exists,
        block_has_state=block_has_state,
        note_targets=projection(raw_targets) * block_has_state.unsqueeze(-1),
        section_targets=projection(raw_section),
        section_has_state=block_has_state.any(-1),
        coverage=coverage,
        num_streams=num_streams,
        block_size=block_size,
        **(collate_synthesis(examples, pad_id) if synthesis else {}),
    )
