"""The multi-stream decode loop: plan, prefill once, rounds of blocks, commit or roll back.

One round (every active stream decodes a block of B tokens, one batched
forward per token)::

    round r:  stream 0  [t t t t t t t t] -> note, coverage, agreement -> commit: publish note (round r)
              stream 1  [t t t t t t t t] -> ... score < tau              -> rollback: cache length -= 8,
              stream 2  [t t t EOS]       -> commit, finished                 retry in round r+1 with the
                 ^ reads sibling notes of round <= r - lag (bus)              notes published in round r

Design decisions:
- The shared prompt prefix is prefilled once by the bare trunk; each stream's
  suffix (its plan item) is prefilled with its sidecar: all streams in one
  right-padded forward whose padding is rolled back (fast path), or streams of
  equal suffix length together (reference). Planner notes from the suffix
  states are snapshot 0.
- A rolled-back block is regenerated in the next round, so it reads the notes
  its siblings committed meanwhile; the first token is resampled from the
  logits saved at the block's start. After R rollbacks the block is accepted
  and flagged. Notes are published only on commit.
- Finished streams leave the batch. Only committed text reaches the streamer.
- The heads run once per judged block, not per token (``compute_heads=False``).
- The per-token work of a block (token choice, note read, the batched forward) lives in ``step.StepRunner``:
  a fast path by default, the reference inside ``step.reference_step()``. The fast path's stream cache uses
  the static layout (no per-step concatenation) unless the cascade attention path serves the steps.
- Telemetry counts committed and decoded tokens and times prefill, decode and total, so a caller gets
  committed tokens/s, decoded tokens/s and the rollback share from ``MultiStreamOutput.telemetry``.
- ``generate(synthesis=True)``: once every stream has finished, ``synthesis.write_synthesis`` runs one more
  stream (the sidecar's synthesis slot) that reads every committed note and no section text, and its
  conclusion is appended to the answer.
- Speculative decoding (``speculate=...``) replaces the one-token step of a block by ``speculate.Speculator``'s
  draft-and-verify step; a block still ends after B tokens (or a stop), so the judging, rollback and publishing
  of blocks are the same with and without drafts.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from ..bus import NoteBus
from ..sidecars.heads.layer import masked_mean
from ..stream_kv import StreamKVCache, stream_attention
from ..stream_kv.masks import sliding_window_of, trunk_step_masks
from ..trunk.architectures import base_model, text_config
from ..trunk.compat import cache_kwargs, output_cache
from .output import MultiStreamOutput, Telemetry
from .prefill import prefill_suffixes_grouped, prefill_suffixes_padded
from .sampling import TokenChooser
from .settings import DecodeSettings
from .speculate import DraftProposer, Speculator
from .step import StepRunner, reference_step_active
from .streamer import MultiStreamStreamer
from .synthesis import write_synthesis


class StreamState:
    """Python-side state of one stream: committed ids, pending block, retries, finish reason."""

    def __init__(self, prompt_ids: list[int]) -> None:
        self.prompt_ids = prompt_ids
        self.committed: list[int] = []
        self.block: list[int] = []
        self.block_hidden: list[torch.Tensor] = []
        self.block_start_logits: torch.Tensor | None = None
        self.stop_reason: str | None = None
        self.finish_reason: str | None = None
        self.retries = 0
        self.emitted_text = ""
        self.coverage = 0.0
        self.notes_read = 0
        self.banned: int | None = None
        """A rejected draft token the next sampled choice excludes (``speculate``), else None."""

    def tokens(self) -> list[int]:
        """Prompt, committed and block ids as one list."""
        return self.prompt_ids + self.committed + self.block

    def history(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.tokens()], device=device)


def _segment_mean(values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean of consecutive segments of ``values`` ``[nnz, d]`` with lengths ``counts`` ``[A]`` -> ``[A, d]``."""
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)  # [nnz]
    out = values.new_zeros(counts.numel(), values.shape[-1]).index_add_(0, rows, values)
    return out / counts.clamp(min=1).unsqueeze(-1).to(values.dtype)


class MultiStreamDecoder:
    """Runs one multi-stream generation for a :class:`~pdt_hf.modeling.PDTForCausalLM`."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: DecodeSettings,
        chooser: TokenChooser,
        streamer: MultiStreamStreamer | None = None,
        eos_token_ids: set[int] | None = None,
        record_reads: bool = False,
        proposer: DraftProposer | None = None,
    ) -> None:
        self.model, self.tokenizer, self.settings, self.chooser = model, tokenizer, settings, chooser
        self.streamer = streamer
        self.eos = eos_token_ids or set()
        self.record_reads = record_reads
        self.device = next(model.trunk.parameters()).device
        self.fast_step = not reference_step_active()
        self.telemetry = Telemetry(step_path="fast" if self.fast_step else "reference")
        self.bus: NoteBus | None = None
        self.steps: StepRunner | None = None
        self.speculator = None
        if proposer is not None:
            self.speculator = Speculator(self, proposer, settings.num_speculative_tokens, trunk_step_masks)
            self.telemetry.speculate = settings.speculate
            self.telemetry.num_speculative_tokens = settings.num_speculative_tokens

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def prefill(
        self, prefix: list[int], suffixes: list[list[int]]
    ) -> tuple[StreamKVCache, torch.Tensor, torch.Tensor]:
        """Prefix once (bare trunk), then suffixes with sidecars. Returns (cache, next logits [K, V], planner notes)."""
        s, model, k = self.settings, self.model, len(suffixes)
        model.sidecar.context = None
        # A config-less DynamicCache keeps every prefix token in every layer (sliding layers are windowed by mask).
        prefix_out = base_model(model.trunk)(
            input_ids=torch.tensor([prefix], device=self.device), use_cache=True, **cache_kwargs(DynamicCache())
        )
        # + n: a verify forward pads every stream to the longest draft, and the padding is rolled back after it.
        capacity = max(len(x) for x in suffixes) + s.max_new_tokens + 1 + s.num_speculative_tokens
        static = self.fast_step and not self.fast_attention()
        cache = StreamKVCache.from_prefix(
            output_cache(prefix_out), k, capacity, commit_horizon=s.commit_horizon, static=static
        )
        lengths = [len(x) for x in suffixes]
        if self.fast_step and min(lengths) >= 1 and max(lengths) - min(lengths) <= s.commit_horizon:
            logits, notes = prefill_suffixes_padded(self.model, cache, suffixes, self.device)
        else:
            logits, notes = prefill_suffixes_grouped(self.model, cache, suffixes, self.device)
        return cache, logits, notes

    def fast_attention(self) -> bool:
        """Whether single-token steps take the cascade attention path (``DecodeSettings.fast_attention``)."""
        if self.settings.fast_attention is not None:
            return self.settings.fast_attention
        config = self.model.trunk.config
        return (
            self.device.type == "cuda"
            and sliding_window_of(config) is None
            and getattr(text_config(config), "attn_logit_softcapping", None) is None
        )

    def make_bus(self, planner_notes: torch.Tensor) -> NoteBus:
        s, cfg, sidecar = self.settings, self.model.pdt_config, self.model.sidecar
        k = planner_notes.shape[0]
        needed = cfg.notes_needed(k, s.max_new_tokens, s.block_size)
        if needed > cfg.note_capacity:
            raise ValueError(
                f"this generation may publish {needed} notes but note_capacity is {cfg.note_capacity}; raise "
                "PDTConfig.note_capacity or lower max_new_tokens / num_streams."
            )
        snc = sidecar.snc_layers
        bus = NoteBus(
            num_streams=k,
            d_note=cfg.d_note,
            capacity=needed,
            note_lag=s.note_lag,
            note_window=s.note_window,
            read_own_notes=cfg.read_own_notes,
            projectors=[layer.project_notes for layer in snc],
            kv_shape=(snc[0].num_heads, snc[0].head_dim),
            device=self.device,
            dtype=planner_notes.dtype,
            record=self.record_reads,
        )
        bus.publish_snapshot(self._ablate(planner_notes))
        return bus

    def _ablate(self, notes: torch.Tensor) -> torch.Tensor:
        if self.settings.note_ablation == "zero":
            return torch.zeros_like(notes)
        if self.settings.note_ablation == "shuffle" and notes.shape[0] > 1:
            return notes.roll(1, dims=0)
        return notes

    # ------------------------------------------------------------------ per-token and per-block work
    def _stop_reason(self, state: StreamState, token: int, scores: torch.Tensor) -> str | None:
        if token in self.eos:
            return "eos"
        if self.settings.stop_strings and self.tokenizer is not None:
            tail = self.tokenizer.decode((state.committed + state.block)[-64:])
            if any(stop in tail for stop in self.settings.stop_strings):
                return "stop_string"
        if self.chooser.settings.stopping_criteria and self.chooser.should_stop(state.history(self.device), scores):
            return "stopping_criteria"
        if len(state.committed) + len(state.block) >= self.settings.max_new_tokens:
            return "length"
        return None

    @torch.no_grad()
    def decode_block(
        self, states: list[StreamState], active: list[int], round: int, cache: StreamKVCache, next_logits: torch.Tensor
    ) -> None:
        """Every stream in ``active`` decodes up to B tokens; one batched forward per token (or per draft).

        A stream steps while it has no stop reason and fewer than B block tokens.
        """
        b = self.settings.block_size
        for k in active:
            states[k].block, states[k].block_hidden, states[k].stop_reason = [], [], None
            states[k].block_start_logits = next_logits[k].clone()
            states[k].banned = None
        self.steps.start_block()
        with self.steps.hooks():
            while True:
                rows = [k for k in active if states[k].stop_reason is None and len(states[k].block) < b]
                if not rows:
                    break
                if self.speculator is not None:
                    self.speculator.step(states, rows, round, cache, next_logits)
                else:
                    self.decode_step(states, rows, round, cache, next_logits)

    def decode_step(
        self, states: list[StreamState], rows: list[int], round: int, cache: StreamKVCache, next_logits: torch.Tensor
    ) -> None:
        """Choose one token per stream in ``rows``, run them in one batched forward, keep logits and hidden states."""
        tokens, scores = self.steps.choose(rows, next_logits, lambda k: states[k].history(self.device))
        for i, k in enumerate(rows):
            states[k].block.append(tokens[i])
            states[k].stop_reason = self._stop_reason(states[k], tokens[i], scores[i])
        notes, counts = self.steps.notes(self.bus, rows, round)
        for i, k in enumerate(rows):
            states[k].notes_read += counts[i]
        start = time.perf_counter()
        out = self.steps.forward(rows, tokens, notes, cache, trunk_step_masks)
        self.telemetry.timings.setdefault("steps", []).append(time.perf_counter() - start)
        self.telemetry.timings.setdefault("first_token", time.perf_counter() - self._t0)
        if rows == list(range(len(rows))):
            next_logits[: len(rows)] = out.logits[:, -1]
        else:
            next_logits[rows] = out.logits[:, -1].to(next_logits.dtype)
        hidden = out.hidden_states[:, -1]  # [A, d]
        for i, k in enumerate(rows):
            states[k].block_hidden.append(hidden[i])
        self.telemetry.decoded_tokens += len(rows)
        self.telemetry.forwards += 1
        self.telemetry.stream_forwards += len(rows)

    @torch.no_grad()
    def judge(
        self, states: list[StreamState], judged: list[int], round: int, planner_notes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Published notes ``[J, M, d_note]``, own-item coverage and agreement score ``[J]`` of ``judged``'s blocks."""
        heads = self.model.sidecar.heads
        hidden = pad_sequence([torch.stack(states[k].block_hidden) for k in judged], batch_first=True)  # [J, n, d]
        lengths = torch.tensor([len(states[k].block_hidden) for k in judged], device=self.device)
        mask = torch.arange(hidden.shape[1], device=self.device)[None] < lengths[:, None]  # [J, n]
        notes = heads.notes.publish(hidden, mask)  # [J, M, d_note]
        block_note = notes.mean(1)  # [J, d_note], what heads.notes(hidden, mask) gives
        plan = planner_notes.unsqueeze(0).expand(len(judged), -1, -1)  # [J, K, d_note]
        streams = torch.tensor(judged, device=self.device)
        coverage = heads.coverage(block_note, plan).sigmoid()[torch.arange(len(judged)), streams]  # [J]
        read = self.bus.read(streams, round)
        summary = _segment_mean(self.bus.notes[read.indices], read.counts)  # [J, d_note]
        score = heads.agreement(masked_mean(hidden, mask), summary, coverage, block_note).sigmoid()  # [J]
        return notes, coverage, score

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        plan: list[str],
        stream_prompts: list[list[int]],
        prefix: list[int],
        suffixes: list[list[int]],
        synthesis_ids: list[int] | None = None,
    ) -> MultiStreamOutput:
        """Decode the streams; with ``synthesis_ids`` (the synthesis stream's prompt) then write the conclusion."""
        s = self.settings
        self._t0 = time.perf_counter()
        states = [StreamState(ids) for ids in stream_prompts]
        cache, next_logits, planner_notes = self.prefill(prefix, suffixes)
        self.telemetry.timings["prefill"] = time.perf_counter() - self._t0
        self.bus = self.make_bus(planner_notes)
        self.steps = StepRunner(self.model, self.chooser, s.use_notes, fast=self.fast_step)
        fast = self.fast_attention()
        round, synthesis = 0, None
        try:
            with stream_attention(self.model.trunk, cache) if fast else nullcontext():
                while any(st.finish_reason is None for st in states):
                    round += 1
                    self.run_round(states, round, cache, next_logits, planner_notes)
            if synthesis_ids is not None:
                synthesis = write_synthesis(self, cache, prefix, synthesis_ids, s.synthesis_max_new_tokens)
                if self.streamer is not None and synthesis.text:  # as stream K, once, after every section
                    self.streamer.on_text(len(states), synthesis.text, round + 1)
        except KeyboardInterrupt:
            self.telemetry.interrupted = True
        finally:
            self.model.sidecar.context = None
            if self.streamer is not None:
                self.streamer.on_end()
        self.telemetry.timings["total"] = time.perf_counter() - self._t0
        self.telemetry.timings["decode"] = self.telemetry.timings["total"] - self.telemetry.timings["prefill"]
        self.telemetry.committed_tokens = sum(len(st.committed) for st in states)
        self.telemetry.coverage = [st.coverage for st in states]
        self.telemetry.notes_read = [st.notes_read for st in states]
        texts = [
            self.tokenizer.decode(st.committed, skip_special_tokens=True).strip() if self.tokenizer else ""
            for st in states
        ]
        if synthesis is not None:
            self.telemetry.synthesis_tokens = len(synthesis.ids)
            self.telemetry.synthesis_notes_read = synthesis.notes_read
            self.telemetry.timings["synthesis"] = synthesis.seconds
        return MultiStreamOutput(
            sequences=[st.committed for st in states],
            texts=texts,
            answer="\n\n".join(t for t in [*texts, synthesis.text if synthesis else ""] if t),
            plan=plan,
            finish_reasons=[st.finish_reason or "interrupted" for st in states],
            telemetry=self.telemetry,
            synthesis_ids=synthesis.ids if synthesis is not None else None,
            synthesis=synthesis.text if synthesis is not None else None,
            synthesis_finish_reason=synthesis.finish_reason if synthesis is not None else None,
        )

    def run_round(
        self,
        states: list[StreamState],
        round: int,
        cache: StreamKVCache,
        next_logits: torch.Tensor,
        planner_notes: torch.Tensor,
    ) -> None:
        """Decode one block per active stream, judge the blocks, publish the notes of committed ones."""
        active = [k for k, st in enumerate(states) if st.finish_reason is None]
        self.decode_block(states, active, round, cache, next_logits)
        judged = [k for k in active if states[k].block]
        notes, coverage, score = self.judge(states, judged, round, planner_notes)
        publish = []
        for j, k in enumerate(judged):
            publish += self._decide(
                states[k], k, round, cache, next_logits, float(score[j]), float(coverage[j]), notes[j]
            )
        if publish:
            ids, vectors = zip(*publish)
            vectors = self._ablate(torch.stack(vectors))  # [P, M, d_note]; a shuffle swaps whole blocks
            ids = torch.tensor(ids, device=self.device).repeat_interleave(vectors.shape[1])
            self.bus.publish(ids, round, vectors.flatten(0, 1))

    def _decide(
        self,
        state: StreamState,
        k: int,
        round: int,
        cache: StreamKVCache,
        next_logits: torch.Tensor,
        score: float,
        coverage: float,
        note: torch.Tensor,  # [M, d_note]
    ) -> list[tuple[int, torch.Tensor]]:
        s, n = self.settings, len(state.block)
        passed = score >= s.agreement_threshold or not s.rollback
        event = {
            "stream": k,
            "round": round,
            "tokens": n,
            "score": score,
            "coverage": coverage,
            "retry": state.retries,
            "committed": True,
            "flagged": False,
        }
        if not passed and state.retries < s.max_retries:
            cache.rollback(k, n)
            next_logits[k] = state.block_start_logits
            state.retries += 1
            event["committed"] = False
            self.telemetry.commits.append(event)
            self.telemetry.rollbacks.append({"stream": k, "round": round, "tokens": n, "retry": state.retries})
            self.telemetry.rolled_back_tokens += n
            if self.streamer is not None:
                self.streamer.on_rollback(k, n, round)
            return []
        event["flagged"] = not passed
        self.telemetry.commits.append(event)
        state.committed += state.block
        state.retries = 0
        state.coverage = max(state.coverage, coverage)
        if state.stop_reason is not None:
            state.finish_reason = state.stop_reason
        if self.streamer is not None and self.tokenizer is not None:
            text = self.tokenizer.decode(state.committed, skip_special_tokens=True)
            if len(text) > len(state.emitted_text):
                self.streamer.on_text(k, text[len(state.emitted_text) :], round)
                self.telemetry.timings.setdefault("first_commit", time.perf_counter() - self._t0)
                state.emitted_text = text
        return [(k, note)]
