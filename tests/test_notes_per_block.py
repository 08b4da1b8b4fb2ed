"""Several notes per block (``PDTConfig.notes_per_block``): chunk pooling, the same notes in training and
decoding, their visibility, the window check, and a config error that names the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.sidecars.context import ALWAYS_VISIBLE_ROUND
from pdt_hf.sidecars.heads.config import HeadsConfig
from pdt_hf.sidecars.heads.layer import NotesHead, chunk_means, masked_mean
from pdt_hf.training.notes import check_window, row_notes
from pdt_hf.training.objective import block_notes

PROMPT = "Explain how to brew tea."
PLAN = ["Water", "Leaves and time", "Serving"]


def test_chunk_means_split_a_block_into_consecutive_equal_chunks():
    hidden = torch.arange(8, dtype=torch.float).view(1, 8, 1).expand(1, 8, 2).clone()  # token t holds t
    full = torch.ones(1, 8, 1, dtype=torch.bool)
    assert chunk_means(hidden, full, 4)[0, 0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert chunk_means(hidden, full, 8)[0, 0, :, 0].tolist() == list(range(8))
    torch.testing.assert_close(chunk_means(hidden, full, 1)[:, 0, 0], masked_mean(hidden, None))
    five = torch.arange(8).view(1, 8, 1) < 5  # a short last block: 5 tokens in 2 chunks of 3 and 2
    assert chunk_means(hidden, five, 2)[0, 0, :, 0].tolist() == [1.0, 3.5]
    two = torch.arange(8).view(1, 8, 1) < 2  # fewer tokens than chunks (0 and 2): the empty ones take the mean
    assert chunk_means(hidden, two, 4)[0, 0, :, 0].tolist() == [0.0, 0.5, 1.0, 0.5]
    assert chunk_means(hidden, torch.zeros_like(full), 4).abs().sum() == 0  # no token, zeros


def test_notes_head_forward_is_the_mean_of_what_it_publishes():
    torch.manual_seed(0)
    hidden, mask = torch.randn(3, 8, 16), torch.arange(8)[None] < torch.tensor([[8], [5], [2]])
    one = NotesHead(16, 4, HeadsConfig(hidden_size=8))
    four = NotesHead(16, 4, HeadsConfig(hidden_size=8), notes_per_block=4)
    four.load_state_dict(one.state_dict())
    assert one.publish(hidden, mask).shape == (3, 1, 4) and four.publish(hidden, mask).shape == (3, 4, 4)
    torch.testing.assert_close(one(hidden, mask), one.from_states(masked_mean(hidden, mask)))
    torch.testing.assert_close(four(hidden, mask), four.publish(hidden, mask).mean(1))
    assert not torch.allclose(four(hidden, mask), one(hidden, mask))  # the MLP's mean is not the mean's MLP


def test_training_block_notes_are_the_notes_decoding_publishes():
    """Training pools each round's positions of a row; decoding pools the block's own states: same notes."""
    torch.manual_seed(0)
    head = NotesHead(16, 4, HeadsConfig(hidden_size=8), notes_per_block=3)
    # one row: 2 prompt positions (round 0), a full block of 6 (round 1), a short block of 4 (round 2), padding
    query_round = torch.tensor([[0, 0] + [1] * 6 + [2] * 4 + [-1, -1]])
    hidden = torch.randn(1, 14, 16)
    trained = block_notes(head, hidden, query_round, 2)  # [1, 2, 3, 4]
    decoded = [head.publish(hidden[:, 2:8]), head.publish(hidden[:, 8:12])]
    torch.testing.assert_close(trained[0, 0], decoded[0][0])
    torch.testing.assert_close(trained[0, 1], decoded[1][0])


def test_row_notes_give_every_note_of_a_block_the_block_round():
    e, k, r, m, d = 1, 2, 2, 3, 4
    planner = torch.zeros(e, k, d)
    blocks = torch.randn(e, k, r, m, d)
    valid = torch.tensor([[[True, False], [True, True]]])
    query = torch.tensor([[1, 2, 3]] * 2)
    notes = row_notes(planner, blocks, valid, torch.tensor([0, 0]), torch.tensor([0, 1]), query, 1, read_own=False)
    assert notes.notes.shape == (2, k * (1 + r * m), d)
    assert notes.note_round[0].tolist() == [ALWAYS_VISIBLE_ROUND, 1, 1, 1, 2, 2, 2] * 2
    # row 1 (stream 1) sees stream 0's planner note and its round-1 notes, not the invalid round-2 block
    assert notes.note_valid[1].tolist() == [True] * 4 + [False] * 3 + [False] * 7
    torch.testing.assert_close(notes.notes[0, 7 + 1 + 3 : 7 + 1 + 6], blocks[0, 1, 1])
    check_window(3, 4, 2 * (1 + 4 * 3), read_own=False, notes_per_block=3)
    with pytest.raises(ValueError, match=r"note_window to >= 26"):
        check_window(3, 4, 16, read_own=False, notes_per_block=3)


def test_decoding_publishes_m_notes_per_committed_block():
    trunk = tiny_trunk("llama")
    trunk.generation_config.eos_token_id = 2
    trunk.generation_config.pad_token_id = 0
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3, block_size=4, notes_per_block=2, note_window=64))
    model.tokenizer = tiny_tokenizer()
    out = model.generate(prompt=PROMPT, plan=PLAN, max_new_tokens=12, block_size=4, agreement_threshold=0.0)
    committed = sum(1 for c in out.telemetry.commits if c["committed"])
    state = out.bus.state()
    assert committed > 0 and state.count == 3 + 2 * committed
    rows = torch.arange(3, state.count)
    streams, rounds = out.bus.streams[rows], out.bus.rounds[rows]
    assert bool((streams[0::2] == streams[1::2]).all()) and bool((rounds[0::2] == rounds[1::2]).all())
    assert not torch.allclose(out.bus.notes[3], out.bus.notes[4])  # two chunks, two different notes


def test_notes_per_block_over_block_size_names_the_fix():
    with pytest.raises(ValueError, match=r"notes_per_block=8"):
        PDTConfig(block_size=8, notes_per_block=9)
    with pytest.raises(ValueError, match="notes_per_block must be a positive integer"):
        PDTConfig(notes_per_block=0)
