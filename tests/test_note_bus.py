"""Note Bus: visibility arithmetic with exact values, then the storage / note-KV manager built on it."""

from __future__ import annotations

import pytest
import torch

from pdt_hf.bus import (
    SNAPSHOT_EFFECTIVE_ROUND,
    NoteBus,
    NoteBusFullError,
    effective_round,
    lagged_visible,
    visible_mask,
)
from pdt_hf.bus.visibility import csr_from_mask, expand_csr, pad_csr

D_NOTE = 4
K = 3


class CountingProjector:
    """Stands in for an SNC layer's key/value projection and records every call."""

    def __init__(self, heads: int = 2, head_dim: int = 3, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.wk = torch.randn(D_NOTE, heads * head_dim, generator=gen)
        self.wv = torch.randn(D_NOTE, heads * head_dim, generator=gen)
        self.heads, self.head_dim = heads, head_dim
        self.calls: list[torch.Tensor] = []

    def __call__(self, notes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(notes.clone())
        shape = (notes.shape[0], self.heads, self.head_dim)
        return (notes @ self.wk).view(shape), (notes @ self.wv).view(shape)


def note(stream: int, round: int) -> torch.Tensor:
    """A recognisable note: [stream, round, 1, 0]."""
    return torch.tensor([float(stream), float(round), 1.0, 0.0])


def filled_bus(rounds: int = 3, **kwargs) -> NoteBus:
    """Snapshot notes for all K streams, then one note per stream for rounds 1..rounds."""
    defaults = dict(num_streams=K, d_note=D_NOTE, capacity=64, note_lag=1, note_window=None)
    bus = NoteBus(**{**defaults, **kwargs})
    bus.publish_snapshot(torch.stack([note(s, 0) for s in range(K)]))
    for r in range(1, rounds + 1):
        bus.publish(torch.arange(K), r, torch.stack([note(s, r) for s in range(K)]))
    return bus


def seen(bus: NoteBus, reader: int, round: int) -> list[tuple[int, int]]:
    """(stream, round) of the notes ``reader`` sees at ``round``, in storage order."""
    read = bus.read(torch.tensor([reader]), round)
    return [(int(bus._stream[i]), int(bus._round[i])) for i in read.indices]


# ---------------------------------------------------------------------- pure arithmetic
def test_visible_mask_docstring_example() -> None:
    mask = visible_mask(
        reader_stream=torch.tensor([1]),
        reader_round=4,
        note_stream=torch.tensor([0, 1, 2, 0, 2, 0, 1, 2, 0]),
        note_round=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3]),
        lag=2,
        window=3,
        read_own=False,
    )
    assert mask.tolist() == [[False, False, False, False, True, True, False, True, False]]


def test_visible_mask_several_readers_and_per_reader_rounds() -> None:
    note_stream = torch.tensor([0, 1, 2, 0, 1, 2])
    note_round = torch.tensor([0, 0, 0, 1, 1, 2])
    mask = visible_mask(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), note_stream, note_round, 1, None, False)
    assert mask.int().tolist() == [
        [0, 1, 1, 0, 0, 0],  # stream 0 at round 1: sibling snapshots only
        [1, 0, 1, 1, 0, 0],  # stream 1 at round 2: snapshots + round-1 note of stream 0
        [1, 1, 0, 1, 1, 0],  # stream 2 at round 3: snapshots + round-1 notes of 0 and 1 (own round 2 hidden)
    ]
    own = visible_mask(torch.tensor([2]), 3, note_stream, note_round, 1, None, True)
    assert own.int().tolist() == [[1, 1, 1, 1, 1, 1]]


def test_window_ties_broken_by_stream_index() -> None:
    # Four notes of round 2 from streams 3, 1, 2, 0 (published in that row order); reader 4 keeps the newest two.
    mask = visible_mask(torch.tensor([4]), 5, torch.tensor([3, 1, 2, 0]), torch.tensor([2, 2, 2, 2]), 1, 2, False)
    assert mask.tolist() == [[True, False, True, False]]  # streams 3 and 2 are the newest of round 2


def test_snapshot_effective_round_and_kernel_predicate_agree() -> None:
    rounds = torch.tensor([0, 1, 2, 3, 0])
    assert effective_round(rounds).tolist() == [SNAPSHOT_EFFECTIVE_ROUND, 1, 2, 3, SNAPSHOT_EFFECTIVE_ROUND]
    assert SNAPSHOT_EFFECTIVE_ROUND == -(2**40)
    q = torch.tensor([[1], [2], [3], [4]])  # [Tq, 1]
    pred = lagged_visible(q, effective_round(rounds)[None, :], lag=2)
    assert pred.int().tolist() == [[1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 0, 0, 1], [1, 1, 1, 0, 1]]
    valid = torch.tensor([True, True, False, True, True])
    assert lagged_visible(q, effective_round(rounds)[None, :], 2, valid)[:, 2].tolist() == [False] * 4
    # The window-free mask is the predicate restricted to siblings.
    streams = torch.tensor([0, 1, 1, 2, 2])
    for lag in (0, 1, 2):
        for r in range(1, 5):
            mask = visible_mask(torch.tensor([1]), r, streams, rounds, lag, None, False)[0]
            expected = lagged_visible(r, effective_round(rounds), lag) & (streams != 1)
            assert torch.equal(mask, expected)


def test_csr_helpers_exact() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    indices, offsets, counts = csr_from_mask(mask)
    assert (indices.tolist(), offsets.tolist(), counts.tolist()) == ([1, 2, 0], [0, 2, 2, 3], [2, 0, 1])
    padded, pmask = pad_csr(indices, offsets, 3)
    assert padded.tolist() == [[1, 2, 0], [0, 0, 0], [0, 0, 0]]
    assert pmask.int().tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    e_idx, e_off, e_cnt = expand_csr(torch.tensor([4, 7, 5]), torch.tensor([0, 2, 3]), 2)
    assert (e_idx.tolist(), e_off.tolist(), e_cnt.tolist()) == ([4, 7, 4, 7, 5, 5], [0, 2, 4, 5, 6], [2, 2, 1, 1])
    with pytest.raises(ValueError, match="width"):
        pad_csr(indices, offsets, 1)
    with pytest.raises(ValueError, match="lag"):
        visible_mask(torch.tensor([0]), 1, torch.tensor([1]), torch.tensor([0]), -1, None)


# ---------------------------------------------------------------------- bus reads
@pytest.mark.parametrize(
    ("lag", "expected"),
    [
        (0, [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2), (1, 3), (2, 3)]),
        (1, [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2)]),
        (2, [(1, 0), (2, 0), (1, 1), (2, 1)]),
    ],
)
def test_visibility_by_round_and_lag(lag: int, expected: list[tuple[int, int]]) -> None:
    bus = filled_bus(rounds=3, note_lag=lag)
    assert seen(bus, reader=0, round=3) == expected


def test_sibling_only_and_read_own_flag() -> None:
    bus = filled_bus(rounds=2, note_lag=1)
    assert seen(bus, 2, 3) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    own = filled_bus(rounds=2, note_lag=1, read_own_notes=True)
    assert seen(own, 2, 3) == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]


def test_window_keeps_newest_notes_snapshot_counts() -> None:
    bus = filled_bus(rounds=3, note_lag=1, note_window=3)
    assert seen(bus, 0, 4) == [(2, 2), (1, 3), (2, 3)]
    assert seen(bus, 1, 2) == [(2, 0), (0, 1), (2, 1)]  # snapshot (0, 0) fell out of the window
    wide = filled_bus(rounds=1, note_lag=1, note_window=3)
    assert seen(wide, 1, 2) == [(2, 0), (0, 1), (2, 1)]


def test_snapshot_visible_at_round_one_with_lag_two() -> None:
    bus = filled_bus(rounds=1, note_lag=2)  # round-1 notes exist but are too young for round 1 and 2
    assert seen(bus, 1, 1) == [(0, 0), (2, 0)]
    assert seen(bus, 1, 2) == [(0, 0), (2, 0)]
    assert seen(bus, 1, 3) == [(0, 0), (2, 0), (0, 1), (2, 1)]


def test_zero_visible_notes_gives_empty_rows() -> None:
    bus = NoteBus(K, D_NOTE, capacity=8, note_lag=1, note_window=4)
    read = bus.read(torch.tensor([0, 2]), 1)
    assert read.indices.tolist() == [] and read.offsets.tolist() == [0, 0, 0] and read.counts.tolist() == [0, 0]
    padded = bus.read_padded(torch.tensor([0, 2]), 1)
    assert padded.mask.shape == (2, 4) and not padded.mask.any()
    bus.publish(torch.tensor([1]), 1, note(1, 1)[None])
    read = bus.read(torch.tensor([1, 0]), 1)  # lag 1: round-1 note invisible at round 1
    assert read.offsets.tolist() == [0, 0, 0]


def test_read_padded_and_expand_exact() -> None:
    bus = filled_bus(rounds=1, note_lag=1, note_window=4)  # rows: 0,1,2 snapshot; 3,4,5 round 1
    read = bus.read(torch.tensor([0, 2]), 2)
    assert read.indices.tolist() == [1, 2, 4, 5, 0, 1, 3, 4] and read.offsets.tolist() == [0, 4, 8]
    assert read.row_ids().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    reader1 = bus.read(torch.tensor([1]), 1)
    assert reader1.indices.tolist() == [0, 2]
    padded = bus.read_padded(torch.tensor([1, 0]), 1)
    assert padded.indices.tolist() == [[0, 2, 0, 0], [1, 2, 0, 0]]
    assert padded.mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    mixed = bus.read(torch.tensor([1, 0]), 1)
    expanded = NoteBus.expand(mixed, 3)
    assert expanded.offsets.tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert expanded.indices.tolist() == [0, 2] * 3 + [1, 2] * 3
    assert expanded.reader_streams.tolist() == [1, 1, 1, 0, 0, 0]


# ---------------------------------------------------------------------- note KV manager
def test_projectors_run_once_per_publish_with_published_rows() -> None:
    projectors = [CountingProjector(seed=0), CountingProjector(seed=1)]
    bus = NoteBus(K, D_NOTE, capacity=16, note_lag=1, note_window=4, projectors=projectors)
    snapshot = torch.stack([note(s, 0) for s in range(K)])
    round1 = torch.stack([note(0, 1), note(2, 1)])
    bus.publish_snapshot(snapshot)
    bus.publish(torch.tensor([0, 2]), 1, round1)  # 5 notes in 2 publishes
    for i in range(100):
        bus.read(torch.arange(K), 1 + i % 4)
        bus.read_padded(torch.tensor([i % K]), 2)
    for proj in projectors:
        assert len(proj.calls) == 2
        assert torch.equal(proj.calls[0], snapshot) and torch.equal(proj.calls[1], round1)
    for slot, proj in enumerate(projectors):
        k_store, v_store = bus.layer_kv(slot)
        assert k_store.shape == (16, 2, 3)
        k_exp, v_exp = proj(torch.cat([snapshot, round1]))
        assert torch.equal(k_store[:5], k_exp) and torch.equal(v_store[:5], v_exp)
        assert bus.layer_kv(slot)[0].data_ptr() == k_store.data_ptr()  # storage itself, no copy


def test_kv_shape_preallocates() -> None:
    bus = NoteBus(K, D_NOTE, 8, 1, 4, projectors=[CountingProjector()], kv_shape=(2, 3))
    ptr = bus.layer_kv(0)[0].data_ptr()
    bus.publish_snapshot(torch.randn(K, D_NOTE))
    assert bus.layer_kv(0)[0].data_ptr() == ptr


def test_restore_to_earlier_round_is_a_count_decrement() -> None:
    bus = filled_bus(rounds=3, note_lag=1, projectors=[CountingProjector()])
    notes_ptr, k_ptr = bus._notes.data_ptr(), bus.layer_kv(0)[0].data_ptr()
    assert (bus.state().count, bus.state().last_round) == (12, 3)
    reference = filled_bus(rounds=1, note_lag=1)
    bus.restore(1)
    assert (bus.state().count, bus.state().last_round) == (6, 1)
    for reader in range(K):
        for r in range(1, 6):
            assert seen(bus, reader, r) == seen(reference, reader, r)
    assert bus._notes.data_ptr() == notes_ptr and bus.layer_kv(0)[0].data_ptr() == k_ptr
    bus.publish(torch.tensor([1]), 2, note(1, 2)[None])  # decoding resumes after the rewind
    assert seen(bus, 0, 3) == [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]
    bus.restore(0)
    assert bus.state().count == 3 and seen(bus, 0, 9) == [(1, 0), (2, 0)]
    bus.restore(-1)
    assert bus.state().count == 0 and bus.state().last_round == -1


def test_capacity_error_leaves_bus_unchanged() -> None:
    proj = CountingProjector()
    bus = NoteBus(K, D_NOTE, capacity=5, note_lag=1, note_window=None, projectors=[proj])
    bus.publish_snapshot(torch.stack([note(s, 0) for s in range(K)]))
    before = (bus.state(), bus._notes.clone(), bus._stream.clone(), bus._round.clone(), bus.layer_kv(0)[0].clone())
    with pytest.raises(NoteBusFullError, match=r"capacity 5.*note_capacity") as info:
        bus.publish(torch.arange(K), 1, torch.ones(K, D_NOTE))
    assert isinstance(info.value, RuntimeError)
    assert bus.state() == before[0] and len(proj.calls) == 1
    for old, new in zip(before[1:], (bus._notes, bus._stream, bus._round, bus.layer_kv(0)[0])):
        assert torch.equal(old, new)
    bus.publish(torch.tensor([0, 1]), 1, torch.ones(2, D_NOTE))  # exactly fills the bus
    assert bus.state().count == 5


def test_publish_validation_errors() -> None:
    bus = filled_bus(rounds=2)
    with pytest.raises(ValueError, match="d_note"):
        bus.publish(torch.tensor([0]), 3, torch.zeros(1, D_NOTE + 1))
    with pytest.raises(ValueError, match="out of range"):
        bus.publish(torch.tensor([K]), 3, torch.zeros(1, D_NOTE))
    with pytest.raises(ValueError, match=r"restore\(0\)"):
        bus.publish(torch.tensor([0]), 1, torch.zeros(1, D_NOTE))
    with pytest.raises(ValueError, match="publish_snapshot"):
        bus.publish(torch.tensor([0]), 0, torch.zeros(1, D_NOTE))
    with pytest.raises(ValueError, match="note_capacity"):
        NoteBus(K, D_NOTE, capacity=0, note_lag=1, note_window=4)
    assert bus.state().count == 9


def test_recorded_reads_never_show_own_or_young_notes() -> None:
    gen = torch.Generator().manual_seed(0)
    for lag in (0, 1, 2):
        log = []
        bus = NoteBus(K, D_NOTE, 128, note_lag=lag, note_window=5, record=True, on_read=log.append)
        bus.publish_snapshot(torch.randn(K, D_NOTE, generator=gen))
        for r in range(1, 9):
            active = torch.arange(K)
            bus.read(active, r)
            committed = active[torch.rand(K, generator=gen) < 0.6]  # blocks that commit this round
            bus.publish(committed, r, torch.randn(committed.numel(), D_NOTE, generator=gen))
        assert len(bus.reads) == 8 and all(a is b for a, b in zip(log, bus.reads, strict=True))
        for record in bus.reads:
            for a, reader in enumerate(record.reader_streams.tolist()):
                notes = record.notes_of(a)
                assert len(notes) <= 5
                assert all(s != reader for s, _ in notes)
                assert all(rnd == 0 or rnd <= record.round - lag for _, rnd in notes)
        assert any(len(r.notes_of(0)) == 5 for r in bus.reads)  # the window was actually reached
