"""Bus probe: a synthetic task whose answer only a sibling's note can carry, trained and decoded for real.

Task (K = 2 streams, block size B, lag Δ, N single-token items, N >= 20), example B = 4, Δ = 1::

    stream 0 section   [item] f f f                      block 1 holds the item (its note is published at round 1)
    stream 1 section   f f f f | = [item]                 the answer is the 2nd token of block 1 + Δ
                                 ^ fed in round 1 + Δ: reads sibling notes of rounds <= 1, i.e. stream 0's block 1

``f`` are filler tokens and ``=`` a cue, all drawn independently of the item, and neither stream prompt
depends on the item. Stream 1's answer is predicted at the cue, which is computed in round 1 + Δ
(``rounds.section_query_rounds``), so the only path from the item to the answer is stream 0's block-1 note on
the bus: without it stream 1's choice is independent of the item and exact match is 1/N in expectation.

Design decisions:
- Only the answer is free. Decoding (:mod:`.probe_decode`) forces every other section token through
  ``generate(logits_processor=...)``, so the answer's context is the training context and exact match measures
  one greedy choice; everything else is the real decoder (prefix once, rounds, notes head at the block
  boundary, publish at commit, lagged bus visibility, ``note_ablation``).
- Controls. ``zero`` publishes zero notes (SNC delta exactly 0). ``shuffle`` permutes the notes of one round
  across streams; with K = 2 stream 1 then reads its *own* block-1 note, which encodes only its own
  item-independent fillers, so it is a true control. A third, teacher-forced control hands each reader another
  example's writer notes (``donor_shift``): the answer must follow the donor's item.
- Training touches only the notes head and SNC, with the curriculum's batch layout (``batch.collate``),
  visibility rule (``notes.row_notes``) and trunk passes (``PDTObjective.run_rows``). One step: a *writer pass*
  in which round-1 positions read the planner notes (exact for round 1), block notes = notes head on its block
  states, then a *reader pass* with planner + block notes (exact for round 1 + Δ) and cross-entropy on the
  answer token only. ``note_grad=True`` keeps the graph through the writer's notes (the reader's loss trains
  the notes head end to end); ``False`` detaches them, as the curriculum's no-grad ``student`` note pass does.
- The answer is a choice among the N items (``answer_among_items``): cross-entropy over the items' logits, and
  decoding restricts that one position to them. With a whole-vocabulary loss the reader first learns "the answer
  is some item", a shift shared by every example; SNC then adds that shift at every position that reads a note,
  the writer's block included, whose states (hence notes) become alike: on SmolLM2 the spread of the
  rms-normalised notes fell from 24.9 to 0.004 in 80 steps and the probe stayed at chance. The item choice is
  exactly what only the bus can inform.
- Prompts are prefilled once. Prompt positions read no note and the trained families cannot change them, so
  each distinct stream prompt (prefix by the bare trunk, suffix with the sidecar, as ``generate`` prefills) is
  run once and its KV and planner note are reused; the passes with gradients run over the sections only.
- Held-out examples are fresh draws (no example shared with training) with the items balanced, so a constant
  answer scores at most 1/N; intervals are Wilson score 95%.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from ..generation.prompts import render_ids, split_stream_prompts, stream_message
from ..sidecars.context import DenseNotes
from ..trunk.architectures import base_model
from ..trunk.compat import cache_kwargs
from .batch import TrainBatch, collate
from .config import LoopConfig
from .curriculum import param_groups, set_trainable
from .data.schema import NoteProjection
from .loading import has_sliding_layers
from .objective import PDTObjective, PrefixKV, block_states
from .rounds import NO_NOTES_ROUND

__all__ = [
    "ProbeConfig",
    "ProbeExample",
    "ProbeRunner",
    "ProbeTask",
    "PromptKV",
    "note_rows",
    "probe_loss",
    "section_view",
    "train_probe",
]

WRITER, READER = 0, 1


def _letters(start: str) -> list[str]:
    return [chr(ord(start) + i) for i in range(26)]


@dataclass
class ProbeConfig:
    """The probe task and its training run (defaults fit a character-level tokenizer)."""

    items: list[str] = field(
        default_factory=lambda: _letters("A"), metadata={"help": "N >= 20 items; each must be one token."}
    )
    fillers: list[str] = field(
        default_factory=lambda: _letters("a"), metadata={"help": "Filler tokens (one token each, no item)."}
    )
    cue: str = field(default="=", metadata={"help": "Token before stream 1's answer (one token)."})
    request: str = field(
        default="Relay the letter.", metadata={"help": "Shared request; a {nonce} in it becomes a random number."}
    )
    plan: list[str] = field(default_factory=lambda: ["say", "echo"], metadata={"help": "The two plan items."})
    train_examples: int = field(default=512, metadata={"help": "Training examples (fresh fillers and nonces)."})
    eval_examples: int = field(default=104, metadata={"help": "Held-out examples; items balanced."})
    steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})
    lr: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate (notes head and SNC)."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warmup steps, then cosine decay to 10%."})
    note_grad: bool = field(
        default=True, metadata={"help": "Backpropagate the reader's loss into the writer's note (end to end)."}
    )
    answer_among_items: bool = field(
        default=True,
        metadata={
            "help": "Score stream 1's answer as a choice among the N items (loss over their logits; decoding "
            "restricts that one position to them), not over the whole vocabulary: see docs/training.md."
        },
    )
    gate_lr_scale: float = field(default=1.0, metadata={"help": "SNC gates' learning rate, as a multiple of lr."})
    seed: int = field(default=0, metadata={"help": "Seeds the examples and the batch order (and the sidecar init)."})

    def __post_init__(self) -> None:
        if len(set(self.items)) != len(self.items):
            raise ValueError(f"probe items must be distinct, got {self.items!r}.")
        if len(self.items) < 20:
            raise ValueError(f"the probe needs >= 20 distinct items (chance <= 5%), got {len(self.items)}.")
        if set(self.items) & set(self.fillers) or self.cue in self.items:
            raise ValueError("probe items must differ from the fillers and the cue, or the answer leaks.")
        if len(self.plan) != 2:
            raise ValueError(f"the probe has K = 2 streams; give two plan items, got {self.plan!r}.")
        for name in ("train_examples", "eval_examples", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"probe.{name} must be a positive integer, got {value!r}.")


@dataclass
class ProbeExample:
    """One example: the request, the item index, and per-stream token lists.

    ``forced[k]`` is what decoding forces on stream k (the section minus the answer); ``sections[k]`` is the
    training section (stream 1's ends with the answer).
    """

    request: str
    item: int
    forced: list[list[int]]
    sections: list[list[int]]


class ProbeTask:
    """Builds seeded probe examples for a tokenizer, a block size and a lag."""

    def __init__(self, config: ProbeConfig, tokenizer: PreTrainedTokenizerBase, block_size: int, lag: int) -> None:
        if lag < 1:
            raise ValueError(
                f"the probe needs note_lag >= 1 (got {lag}): a note is published when its block commits, so no "
                "round can read a note of its own round."
            )
        self.config, self.tokenizer, self.block_size, self.lag = config, tokenizer, block_size, lag
        self.item_ids = [self._one_token(t, "item") for t in config.items]
        self.filler_ids = [self._one_token(t, "filler") for t in config.fillers]
        self.cue_id = self._one_token(config.cue, "cue")
        self.answer_index = lag * block_size + 1
        """Index of the answer in stream 1's section: the 2nd token of block 1 + Δ, predicted in that round."""

    def _one_token(self, text: str, what: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"probe {what} {text!r} is {len(ids)} tokens {ids} for this tokenizer; use one-token ones."
            )
        return ids[0]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.item_ids)

    def example(self, rng: random.Random, item: int) -> ProbeExample:
        b, fill = self.block_size, self.filler_ids
        writer = [self.item_ids[item]] + [rng.choice(fill) for _ in range(b - 1)]
        reader = [rng.choice(fill) for _ in range(self.lag * b)] + [self.cue_id]
        request = self.config.request.format(nonce=rng.randrange(1000, 10000))
        return ProbeExample(request, item, [writer, reader], [writer, reader + [self.item_ids[item]]])

    def split(self, count: int, seed: int, balanced: bool = False, exclude: set | None = None) -> list[ProbeExample]:
        """``count`` examples; ``balanced`` cycles a shuffled item order; ``exclude`` drops seen examples."""
        rng, n = random.Random(seed), len(self.item_ids)
        out: list[ProbeExample] = []
        order: list[int] = []
        while len(out) < count:
            if balanced and not order:
                order = rng.sample(range(n), n)
            ex = self.example(rng, order.pop() if balanced else rng.randrange(n))
            if exclude is None or self.key(ex) not in exclude:
                out.append(ex)
        return out

    @staticmethod
    def key(ex: ProbeExample) -> tuple:
        return (ex.request, tuple(map(tuple, ex.sections)))

    def stream_prompts(self, ex: ProbeExample) -> list[list[int]]:
        """Both streams' prompt ids, exactly as multi-stream ``generate`` renders them."""
        plan = self.config.plan
        return [render_ids(self.tokenizer, stream_message(ex.request, plan, item)) for item in plan]

    def batch(self, examples: list[ProbeExample], d_note: int, pad_id: int) -> TrainBatch:
        """The curriculum's padded batch, with the loss on stream 1's answer token only."""
        rows = []
        for i, ex in enumerate(examples):
            prefix, suffixes = split_stream_prompts(self.stream_prompts(ex))
            blocks = [-(-len(s) // self.block_size) for s in ex.sections]
            rows.append(
                {
                    "prompt_id": i,
                    "prefix_ids": prefix,
                    "suffix_ids": suffixes,
                    "section_ids": ex.sections,
                    # Unused by the probe's loss; present because the layout carries them.
                    "kd_ids": [[[0]] * len(s) for s in ex.sections],
                    "kd_logprobs": [[[0.0]] * len(s) for s in ex.sections],
                    "sibling_dependence": [[0.0] * len(s) for s in ex.sections],
                    "note_targets": [[[0.0]] * nb for nb in blocks],
                    "coverage": [[[0.0, 0.0]] * nb for nb in blocks],
                    "section_targets": [[0.0], [0.0]],
                }
            )
        dummy = NoteProjection(torch.zeros(1), torch.zeros(1, d_note), torch.ones(()))
        batch = collate(rows, dummy, 2, self.block_size, pad_id)
        keep = torch.zeros_like(batch.section_mask)
        keep[batch.stream_ids == READER, self.answer_index] = True
        labels = batch.labels.masked_fill(~keep, -100)
        return replace(batch, labels=labels, section_mask=keep)


def probe_loss(
    objective: PDTObjective,
    batch: TrainBatch,
    prompts: PromptKV,
    note_grad: bool,
    donor_shift: int = 0,
    among: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Writer pass, reader pass, cross-entropy of stream 1's answer -> (loss, answer ids ``[E]``, item ids ``[E]``).

    ``batch`` is a :func:`section_view` (rows hold only their sections) and ``prompts`` the rows' prompt KV
    and planner notes. ``donor_shift`` = s hands example e the writer notes of example ``(e - s) % E`` and
    scores the answer against that donor's item (s = 0: its own). ``among`` ``[N]`` (the item ids) makes the
    answer a choice among the items (cross-entropy over their logits only) instead of the whole vocabulary.
    """
    model, heads = objective.model, objective.sidecar.heads
    n, r = len(batch.stream_ids), batch.num_blocks
    every = torch.arange(n, device=batch.stream_ids.device)
    writers, readers = every[batch.stream_ids == WRITER], every[batch.stream_ids == READER]  # [E] each
    own_kv = replace(batch, example_index=every)  # run_rows indexes the prompt KV by row
    blocks = prompts.planner.new_zeros(n, r, prompts.planner.shape[-1])  # [N, R, d_note]
    with torch.set_grad_enabled(note_grad and torch.is_grad_enabled()):
        first = objective.build_notes(batch, prompts.planner, blocks, torch.zeros_like(batch.block_has_state))
        hidden = objective.run_rows(own_kv, writers, note_rows(first, writers), prompts.kv)  # [E, L, d]
        states = block_states(hidden, batch.query_round[writers], r)  # [E, R, d]
        written = heads.notes(states.flatten(0, 1).unsqueeze(1)).view(len(writers), r, -1)  # [E, R, d_note]
    blocks = blocks.index_put((writers,), written.roll(donor_shift, dims=0))
    notes = objective.build_notes(batch, prompts.planner, blocks, batch.block_has_state)
    hidden = objective.run_rows(own_kv, readers, note_rows(notes, readers), prompts.kv)  # [E, L, d]
    pos = batch.pred_pos[readers].clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    labels = batch.labels[readers].roll(donor_shift, dims=0)  # [E, L], -100 except the answer
    answer = labels != -100  # [E, L], one true per row
    logits = model.trunk.get_output_embeddings()(hidden.gather(1, pos)[answer]).float()  # [E, V]
    target = labels[answer]  # [E]
    if among is not None:  # the answer's choice among the N items: logits [E, N], targets item indices
        logits = logits[:, among]
        target = (target.unsqueeze(1) == among).float().argmax(1)
    loss = torch.nn.functional.cross_entropy(logits, target)
    chosen = logits.argmax(-1)
    return loss, (among[chosen] if among is not None else chosen), labels[answer]


@dataclass
class PromptKV:
    """Per row: its whole prompt's KV (prefix by the bare trunk, suffix with the sidecar, as decoding prefills
    it) as a left-padded :class:`PrefixKV` over rows, and its planner note ``[N, d_note]``."""

    kv: PrefixKV
    planner: torch.Tensor


def section_view(batch: TrainBatch) -> TrainBatch:
    """The batch with each row's stream part cut to its section (the suffix moves into the prompt KV).

    Suffix positions read no note and the trainable families (notes head, SNC) cannot change them, so their
    keys/values are computed once per prompt. ``pred_pos`` of ``x_0`` becomes -1 (it is never scored).
    """
    n, width = batch.labels.shape
    cols = batch.suffix_len.unsqueeze(1) + torch.arange(width, device=batch.labels.device)  # [N, L]
    inside = torch.arange(width, device=cols.device) < (batch.stream_len - batch.suffix_len).unsqueeze(1)
    cols = cols.clamp(max=batch.stream_input.shape[1] - 1)
    rounds = batch.query_round.gather(1, cols).masked_fill(~inside, NO_NOTES_ROUND)  # [N, L]
    return replace(
        batch,
        stream_input=batch.stream_input.gather(1, cols),
        stream_len=batch.stream_len - batch.suffix_len,
        suffix_len=torch.zeros_like(batch.suffix_len),
        query_round=rounds,
        pred_pos=batch.pred_pos - batch.suffix_len.unsqueeze(1),
    )


def note_rows(notes: DenseNotes, rows: torch.Tensor) -> DenseNotes:
    """The rows ``rows`` of dense notes (every per-row field indexed)."""
    return replace(
        notes,
        notes=notes.notes[rows],
        note_round=notes.note_round[rows],
        note_valid=notes.note_valid[rows],
        query_round=notes.query_round[rows],
    )


def _lr_factor(step: int, cfg: ProbeConfig) -> float:
    """Linear warmup, then cosine from 1 to 0.1 (the curriculum's schedule)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 1.0)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


class ProbeRunner:
    """Probe batches through the curriculum's trunk passes, each distinct row prompt prefilled once."""

    def __init__(self, model, tokenizer, task: ProbeTask, max_cached: int = 4096) -> None:
        self.model, self.task, self.d_note, self.max_cached = model, task, model.pdt_config.d_note, max_cached
        self.among_items = task.config.answer_among_items
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        if has_sliding_layers(model.trunk.config):
            raise ValueError(
                f"the bus probe left-pads prompt caches, which is inexact for {model.trunk.config.model_type}'s "
                "sliding-window layers; run it on a trunk with full attention (e.g. the embedded SmolLM2)."
            )
        self.objective = PDTObjective(model, LoopConfig(), reuse_prefix=True, pad_id=self.pad_id)
        self._prompts: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}

    @torch.no_grad()
    def _prefill(self, prefix: list[int], suffix: list[int], stream: int):
        """Per-layer K/V ``[H, P, D]`` of ``prefix + suffix`` and the planner note, as ``generate`` prefills."""
        key = (tuple(prefix), tuple(suffix), stream)
        if key not in self._prompts:
            model, device = self.model, self.model.trunk.get_input_embeddings().weight.device
            cache = DynamicCache()
            model.sidecar.context = None
            ids = torch.tensor([prefix], device=device)
            base_model(model.trunk)(input_ids=ids, use_cache=True, **cache_kwargs(cache))
            streams = torch.tensor([stream], device=device)
            out = model(input_ids=torch.tensor([suffix], device=device), stream_ids=streams, cache=cache,
                        use_cache=True, compute_heads=False)  # fmt: skip
            planner = model.sidecar.heads.planner(out.hidden_states, None, streams)[0]
            if len(self._prompts) >= self.max_cached:
                self._prompts.clear()
            self._prompts[key] = ([x.keys[0] for x in cache.layers], [x.values[0] for x in cache.layers], planner)
        return self._prompts[key]

    def prompts(self, batch: TrainBatch) -> PromptKV:
        rows = [
            self._prefill(batch.prefix_ids[e], batch.stream_input[n, :m].tolist(), k)
            for n, (e, k, m) in enumerate(zip(batch.example_index.tolist(), batch.stream_ids.tolist(),
                                              batch.suffix_len.tolist()))
        ]  # fmt: skip
        lengths = torch.tensor([r[0][0].shape[1] for r in rows])
        width = int(lengths.max())
        keys = [torch.stack([_left_pad(r[0][i], width) for r in rows]) for i in range(len(rows[0][0]))]
        values = [torch.stack([_left_pad(r[1][i], width) for r in rows]) for i in range(len(rows[0][1]))]
        mask = (torch.arange(width) >= (width - lengths).unsqueeze(1)).long()  # [N, P]
        device = batch.stream_ids.device
        kv = PrefixKV(keys, values, mask.to(device), lengths.to(device))
        return PromptKV(kv, torch.stack([r[2] for r in rows]))

    def __call__(self, examples: list[ProbeExample], note_grad: bool, donor_shift: int = 0):
        batch = self.task.batch(examples, self.d_note, self.pad_id)
        among = torch.tensor(self.task.item_ids, device=batch.labels.device) if self.among_items else None
        return probe_loss(self.objective, section_view(batch), self.prompts(batch), note_grad, donor_shift, among)


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """``[H, P, D]`` -> ``[H, width, D]`` with zeros in front."""
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[1], 0))


def train_probe(model, tokenizer, task: ProbeTask, examples: list[ProbeExample], progress: bool = False) -> dict:
    """Train the notes head and SNC on ``examples``; returns per-step loss, accuracy, largest gate, wall time."""
    from tqdm.auto import tqdm

    cfg, run = task.config, ProbeRunner(model, tokenizer, task)
    params = set_trainable(model.sidecar, ["heads.notes", "snc"])
    groups = param_groups(model.sidecar, params, cfg.lr, cfg.gate_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    rng = random.Random(cfg.seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "gate": []}
    start = time.perf_counter()
    model.trunk.eval()
    bar = tqdm(range(cfg.steps), desc="bus probe", disable=not progress)
    for _ in bar:
        loss, answers, items = run(rng.sample(examples, min(cfg.batch_size, len(examples))), cfg.note_grad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        history["loss"].append(loss.item())
        history["accuracy"].append((answers == items).float().mean().item())
        history["gate"].append(max(abs(math.tanh(s.gate.item())) for s in model.sidecar.snc_layers))
        recent = history["accuracy"][-20:]
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc20=f"{sum(recent) / len(recent):.2f}")
    model.sidecar.requires_grad_(False)
    history["seconds"] = time.perf_counter() - start
    return history
