"""Does a rollback pay? Measure it per block: the block the decoder kept against the one it would regenerate.

A rollback costs a block of decoding and pays only when the regenerated block is better. For every block of a
real decode (``generation.decode``) this module keeps the original and produces the regeneration, then scores
both under the lag-consistent teacher::

    round r    stream k decodes block r  -> head scores it (score, inputs recorded) -> commit (rollback off)
               siblings commit their blocks of round r; their notes are published at round r
    fork       copy of the stream cache: roll k's block back, restore its block-start logits, decode block r
               again at round r + 1 reading the notes visible then (siblings' round-r notes with lag 1)
    teacher    trunk, sidecars off, reads  lag_context(k, round r + 1) + k's committed tokens before block r
               and scores original and regenerated block after that SAME context (NLL, nats/token)
    gain       NLL(original) - NLL(regenerated)         > 0: the regeneration is better

Design decisions:
- The fork is what the decoder writes after a real rollback of that one block, everything else committed:
  the base trajectory runs with rollback off, and the regeneration reads exactly the notes a rollback would
  make it read (its own round-r note is never visible, ``read_own_notes`` must be off), with the same
  first-token logits and token choice. ``tests/test_rollback_gain.py`` checks the regeneration against a
  decoder that really rolls that block back. The fork decodes on a copy of the stream cache, so the base
  trajectory stays bit-identical to decoding with rollback off; the simple attention path is used.
- The teacher is the trunk reading the text-bus layout (``generation.text_bus``) at the regeneration round:
  the prompt, the plan, the siblings' committed blocks visible at round r + 1 as text, then its own committed
  tokens. Both blocks are scored after the same context, so their NLLs are comparable; a regeneration equal to
  its original has the original's NLL (gain exactly 0) and is not scored again.
- Labels and tau live with the other calibration rules (``training.calibration``): a rollback *pays* when
  ``gain > rollback_cost``, and tau maximises the net benefit within the rollback budget
  (``choose_rollback_threshold``), then passes the same ``rollback_pays`` check as divergence labels do.
- The head's inputs are recorded as it reads them (a pre-hook on ``heads.agreement``), plus two inputs the
  decoder has for free: the mean entropy and mean top-1 probability of the distributions the block's tokens
  were chosen from. The report gives each one's AUC for "rollback pays".
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write
from ..generation.decode import MultiStreamDecoder, StreamState
from ..generation.output import Telemetry
from ..generation.prompts import render_ids, split_stream_prompts, stream_message
from ..generation.sampling import SamplingSettings, TokenChooser
from ..generation.settings import DecodeSettings
from ..generation.text_bus import check_lag, lag_context
from .calibration import gain_decision_report, rollback_labels
from .data.teacher import Teacher

__all__ = [
    "HEAD_INPUTS",
    "ForkingDecoder",
    "RollbackGainRecords",
    "build_decoder",
    "decision_report",
    "measure_rollback_gain",
    "stream_inputs",
    "teacher_context",
]

HEAD_INPUTS = ("block_state", "notes_summary", "coverage", "provisional_note")
"""The agreement head's inputs, in ``AgreementHead.forward`` order."""


class ForkingDecoder(MultiStreamDecoder):
    """The decode loop with rollback off, every judged block also regenerated once on a copy of the cache.

    ``self.forks`` gets one dict per block: stream, round, start (tokens committed before it), original and
    regenerated ids, score, the head's inputs, token entropy / top-1 probability means, notes visible then.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.rollback:
            raise ValueError("ForkingDecoder runs the base trajectory with rollback off; pass rollback=False.")
        if self.model.pdt_config.read_own_notes:
            raise ValueError(
                "read_own_notes=True: a rolled-back block's note is never published, so the fork (which keeps it) "
                "would let the regeneration read it; measure a sidecar with read_own_notes=False."
            )
        self.forks: list[dict] = []
        self._stats: dict[int, list[tuple[float, float]]] = {}  # id(state) -> per token (entropy, top-1 prob)
        self._judged: tuple | None = None

    def decode_block(self, states, active, round, cache, next_logits) -> None:
        for k in active:
            self._stats[id(states[k])] = []
        super().decode_block(states, active, round, cache, next_logits)

    def decode_step(self, states, rows, round, cache, next_logits) -> None:
        logp = torch.log_softmax(next_logits[rows].float(), dim=-1)  # [A, V], the logits the tokens come from
        entropy = (-(logp.exp() * logp).sum(-1)).tolist()
        top = logp.max(-1).values.exp().tolist()
        for i, k in enumerate(rows):
            self._stats[id(states[k])].append((entropy[i], top[i]))
        super().decode_step(states, rows, round, cache, next_logits)

    def judge(self, states, judged, round, planner_notes):
        seen: dict[str, tuple] = {}
        hook = self.model.sidecar.heads.agreement.register_forward_pre_hook(lambda _m, args: seen.update(args=args))
        try:
            notes, coverage, score = super().judge(states, judged, round, planner_notes)
        finally:
            hook.remove()
        counts = self.bus.read(torch.tensor(judged, device=self.device), round).counts
        inputs = [x.detach().float().cpu() for x in seen["args"]]  # HEAD_INPUTS, each [J, ...]
        self._judged = (list(judged), inputs, score.float().cpu(), counts.tolist())
        return notes, coverage, score

    def run_round(self, states, round, cache, next_logits, planner_notes) -> None:
        self._judged = None
        super().run_round(states, round, cache, next_logits, planner_notes)
        if self._judged is not None:
            self._fork(states, round, cache, next_logits)

    @torch.no_grad()
    def _fork(self, states: list[StreamState], round: int, cache, next_logits: torch.Tensor) -> None:
        """Regenerate every block judged in ``round`` as the decoder would in round + 1 after its rollback."""
        judged, inputs, scores, counts = self._judged
        shadow_cache, shadow_logits = copy.deepcopy(cache), next_logits.clone()
        shadow = [StreamState(st.prompt_ids) for st in states]
        for k in judged:
            n = len(states[k].block)
            shadow_cache.rollback(k, n)  # as _decide does on a rollback
            shadow_logits[k] = states[k].block_start_logits
            shadow[k].committed = states[k].committed[: len(states[k].committed) - n]
        kept, self.telemetry = self.telemetry, Telemetry()  # the fork's steps stay out of the run's telemetry
        try:
            self.decode_block(shadow, judged, round + 1, shadow_cache, shadow_logits)
        finally:
            self.telemetry = kept
        later = self.bus.read(torch.tensor(judged, device=self.device), round + 1).counts.tolist()
        for j, k in enumerate(judged):
            stats = np.array(self._stats.pop(id(states[k])))  # [n, 2]
            self._stats.pop(id(shadow[k]), None)
            self.forks.append(
                {
                    "stream": k,
                    "round": round,
                    "start": len(shadow[k].committed),
                    "original": list(states[k].block),
                    "regenerated": list(shadow[k].block),
                    "score": float(scores[j]),
                    "coverage": float(inputs[2][j]),
                    "entropy": float(stats[:, 0].mean()),
                    "max_prob": float(stats[:, 1].mean()),
                    "notes_visible": counts[j],
                    "notes_visible_regenerated": later[j],
                    "inputs": [x[j] for x in inputs],
                }
            )


def stream_inputs(tokenizer, prompt: str, plan: Sequence[str]) -> tuple[list[list[int]], list[int], list[list[int]]]:
    """``(stream prompts, shared prefix, suffixes)`` exactly as ``multi_stream_generate`` builds them."""
    stream_prompts = [render_ids(tokenizer, stream_message(prompt, plan, item)) for item in plan]
    prefix, suffixes = split_stream_prompts(stream_prompts)
    return stream_prompts, prefix, suffixes


def build_decoder(model, tokenizer, plan: Sequence[str], max_new_tokens: int, decoder_cls=ForkingDecoder, **overrides):
    """A greedy decoder for ``plan`` with the sidecar's settings, rollback off, simple attention path.

    ``overrides`` replace :class:`DecodeSettings` fields (tests build a decoder that really rolls back).
    """
    cfg = model.pdt_config
    if not 1 <= len(plan) <= cfg.num_streams:
        raise ValueError(f"a plan of {len(plan)} items needs 1 to {cfg.num_streams} streams (the sidecar's K).")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer, e.g. 32.")
    settings = DecodeSettings.from_config(
        cfg, max_new_tokens, num_streams=len(plan), rollback=False, fast_attention=False
    )
    settings = dataclasses.replace(settings, **overrides)
    device = next(model.trunk.parameters()).device
    eos = model.trunk.generation_config.eos_token_id if model.trunk.generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return decoder_cls(model, tokenizer, settings, TokenChooser(SamplingSettings(), device), None, eos_ids)


def teacher_context(tokenizer, prompt, plan, sections, stream: int, round: int, lag: int, block_size: int):
    """Teacher ids before block ``round`` of ``stream`` at its regeneration round ``round + 1``.

    The text-bus context (siblings' blocks of rounds <= round + 1 - lag as text) plus the stream's own committed
    tokens before the block (``sections[stream][:(round - 1) B]``).
    """
    context = lag_context(tokenizer, prompt, plan, sections, stream, round + 1, lag, block_size)
    return context + list(sections[stream][: (round - 1) * block_size])


@dataclasses.dataclass
class RollbackGainRecords:
    """Per-block measurements of one prompt set: ``blocks`` (scalars and ids) and the head's ``inputs``."""

    blocks: list[dict]
    inputs: dict[str, torch.Tensor]
    """``HEAD_INPUTS`` -> ``[N, ...]`` rows in block order."""
    settings: dict

    def array(self, name: str) -> np.ndarray:
        return np.array([b[name] for b in self.blocks], dtype=np.float64)

    def save(self, stem: str) -> None:
        """``stem.json`` (settings, blocks) and ``stem.safetensors`` (head inputs), each written atomically."""
        tensors = {k: v.contiguous() for k, v in self.inputs.items()}
        atomic_write(stem + ".safetensors", lambda tmp: save_file(tensors, tmp))
        text = json.dumps({"settings": self.settings, "blocks": self.blocks}, indent=1)

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)

        atomic_write(stem + ".json", write)

    @classmethod
    def load(cls, stem: str) -> RollbackGainRecords:
        with open(stem + ".json", encoding="utf-8") as handle:
            data = json.load(handle)
        return cls(data["blocks"], load_file(stem + ".safetensors"), data["settings"])


@torch.no_grad()
def measure_rollback_gain(
    model, tokenizer, requests: Sequence[tuple[str, Sequence[str]]], max_new_tokens: int, progress: bool = False
) -> RollbackGainRecords:
    """Fork every block of a greedy decode of each ``(prompt, plan)`` and score both blocks under the teacher."""
    from tqdm.auto import tqdm

    cfg = model.pdt_config
    lag, block_size = check_lag(cfg.note_lag), cfg.block_size
    teacher = Teacher(model.trunk, tokenizer)
    blocks: list[dict] = []
    inputs: list[list[torch.Tensor]] = []
    for index, (prompt, plan) in enumerate(tqdm(requests, desc="rollback gain", disable=not progress)):
        plan = list(plan)
        decoder = build_decoder(model, tokenizer, plan, max_new_tokens)
        out = decoder.run(plan, *stream_inputs(tokenizer, prompt, plan))
        sections = out.sequences
        contexts = []
        for fork in decoder.forks:
            k, r, start = fork["stream"], fork["round"], fork["start"]
            if start != (r - 1) * block_size or sections[k][start : start + len(fork["original"])] != fork["original"]:
                raise RuntimeError(f"stream {k} round {r}: the kept block is not block {r} of the section.")
            contexts.append(teacher_context(tokenizer, prompt, plan, sections, k, r, lag, block_size))
        # An unchanged regeneration has the original's NLL: only changed ones are scored again.
        changed = [i for i, f in enumerate(decoder.forks) if f["regenerated"] != f["original"]]
        rows = [f["original"] for f in decoder.forks] + [decoder.forks[i]["regenerated"] for i in changed]
        with model.disable_sidecars():
            nll = [float(x.mean()) for x in teacher.token_nlls(contexts + [contexts[i] for i in changed], rows)]
        regenerated = dict(zip(changed, nll[len(contexts) :]))
        for i, fork in enumerate(decoder.forks):
            inputs.append(fork.pop("inputs"))
            record = {
                "prompt_index": index,
                **fork,
                "nll_original": nll[i],
                "nll_regenerated": regenerated.get(i, nll[i]),
            }
            record["gain"] = record["nll_original"] - record["nll_regenerated"]
            record["same"] = fork["original"] == fork["regenerated"]
            record["teacher_context_tokens"] = len(contexts[i])
            blocks.append(record)
    stacked = {name: torch.stack([row[j] for row in inputs]) for j, name in enumerate(HEAD_INPUTS)} if inputs else {}
    settings = {
        "num_prompts": len(requests),
        "max_new_tokens": max_new_tokens,
        "block_size": block_size,
        "note_lag": lag,
        "prompts": [[p, list(plan)] for p, plan in requests],
    }
    return RollbackGainRecords(blocks, stacked, settings)


def _auc(values: np.ndarray, positive: np.ndarray) -> float | None:
    """P(value of a positive > value of a negative), ties counting half; None without both classes."""
    pos, neg = values[positive], values[~positive]
    if not pos.size or not neg.size:
        return None
    diff = pos[:, None] - neg[None, :]  # [P, N]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def decision_report(records: RollbackGainRecords, tau: float, cost: float) -> dict[str, object]:
    """:func:`~pdt_hf.training.calibration.gain_decision_report` on these blocks, plus the share of unchanged
    regenerations and the AUC of each candidate head input for "rollback pays" (``1 - score``, entropy,
    ``1 - max_prob``: higher means roll back)."""
    scores, gains = records.array("score"), records.array("gain")
    pays = rollback_labels(gains, cost)
    return {
        "prompts": len({b["prompt_index"] for b in records.blocks}),
        **gain_decision_report(scores, gains, tau, cost),
        "same_share": float(np.mean([b["same"] for b in records.blocks])),
        "auc_pays": {
            "1 - score": _auc(1.0 - scores, pays),
            "entropy": _auc(records.array("entropy"), pays),
            "1 - max_prob": _auc(1.0 - records.array("max_prob"), pays),
        },
    }
