"""The teacher: batched plan and section writing with HF ``generate``, then teacher-forced scoring.

Design decisions:
- Prompts are batched with left padding (``generate`` needs the last real token at the right edge); every
  output is cut after its first end-of-turn token, which is kept so the student learns to stop.
- Targets come from one teacher-forced forward over ``[context | section]`` (not from ``generate``'s scores):
  its last hidden states give the pooled block states (note targets) and the section state (planner target),
  and the LM head is applied only at the positions that predict section tokens, where the top-k log-probs are
  kept as KD targets.
- Sibling dependence: the same section is scored again with the student's own context (no earlier sections);
  the per-token KL between the two teacher distributions over the full teacher's top-k buckets says how much
  the section depends on sibling content. It weights the note-usage loss.
- ``token_nlls`` scores given sections after given contexts the same way (one forward, LM head only where a
  section token is predicted); ``training.rollback_gain`` compares a block with its regeneration with it.
- Per-round contexts (the lag-consistent teacher, ``generation.text_bus``): block r of a section is scored in
  the context it was written in. Consecutive blocks with the same context share one forward over
  ``[context | section[:end]]`` (``_round_hidden``), so a context that never changes costs one forward, as in
  ``score``; each section position then carries the hidden state that predicts it and the one it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...trunk.architectures import trunk_logits
from ..losses import topk_bucket_kl
from ..rounds import num_blocks, state_positions

__all__ = ["SectionScore", "Teacher", "pad_left", "round_segments"]


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> ``(input_ids [N, T], attention_mask [N, T])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


def round_segments(contexts: list[list[int]], section_len: int, block_size: int) -> list[tuple[int, int, int]]:
    """Group the blocks of one section by context: ``[(context index, start, end)]`` token spans.

    ``contexts[r - 1]`` is block r's context; consecutive blocks with equal contexts form one span (one forward).
    E.g. contexts ``[a, a, b]``, S = 10, B = 4 -> ``[(0, 0, 8), (2, 8, 10)]``.
    """
    blocks = -(-section_len // block_size)
    if len(contexts) != blocks:
        raise ValueError(
            f"a section of {section_len} tokens has {blocks} blocks of {block_size}, got {len(contexts)} contexts."
        )
    spans: list[tuple[int, int, int]] = []
    for r in range(blocks):
        start, end = r * block_size, min((r + 1) * block_size, section_len)
        if spans and contexts[spans[-1][0]] == contexts[r]:
            spans[-1] = (spans[-1][0], spans[-1][1], end)
        else:
            spans.append((r, start, end))
    return spans


@dataclass
class SectionScore:
    """Teacher targets of one section of S tokens (nb blocks, d = teacher width, k = top-k)."""

    topk_ids: list[list[int]]  # [S][k]
    topk_logprobs: list[list[float]]  # [S][k]
    block_states: list[list[float]]  # [nb][d], zeros where a block has no state position
    section_state: list[float]  # [d]


class Teacher:
    """A causal LM plus tokenizer that writes and scores sections."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the teacher tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
        self.pad_id = int(pad)
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self.eos_ids = sorted(int(e) for e in eos if e is not None)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        *,
        do_sample: bool,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        seed: int,
    ) -> list[list[int]]:
        """Continue each token list; returns the new tokens of each, cut after the first eos (kept)."""
        ids, mask = pad_left(prompts, self.pad_id)
        torch.manual_seed(seed)
        sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            repetition_penalty=repetition_penalty,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            **sampling,
        )
        results = []
        for row in out[:, ids.shape[1] :].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row))
            results.append(row[:cut])
        return results

    def _forward(self, contexts: list[list[int]], sections: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Last hidden states ``[N, T, d]`` of left-padded ``context + section`` rows and each row's pad offset."""
        rows = [c + s for c, s in zip(contexts, sections)]
        ids, mask = pad_left(rows, self.pad_id)
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return hidden, [ids.shape[1] - len(r) for r in rows]

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[P, d]`` hidden states -> ``[P, V]`` fp32 log-probs."""
        return torch.log_softmax(trunk_logits(self.model, hidden).float(), dim=-1)

    @torch.no_grad()
    def token_nlls(
        self, contexts: list[list[int]], sections: list[list[int]], batch_rows: int = 8
    ) -> list[torch.Tensor]:
        """Per-token NLL ``[S]`` (nats, fp32) of each section read after its context, ``batch_rows`` rows a forward.

        The LM head runs only at the S positions that predict section tokens.
        """
        out = []
        for first in range(0, len(contexts), batch_rows):
            ctxs, secs = contexts[first : first + batch_rows], sections[first : first + batch_rows]
            hidden, offsets = self._forward(ctxs, secs)
            for h, offset, ctx, sec in zip(hidden, offsets, ctxs, secs):
                start = offset + len(ctx)
                logp = self._logprobs(h[start - 1 : start - 1 + len(sec)])  # [S, V]
                ids = torch.tensor(sec, device=logp.device)[:, None]  # [S, 1]
                out.append(-logp.gather(-1, ids)[:, 0].cpu())
        return out

    @torch.no_grad()
    def score(
        self, contexts: list[list[int]], sections: list[list[int]], top_k: int, block_size: int
    ) -> list[SectionScore]:
        """Teacher-forced targets for each ``(context, section)`` pair."""
        hidden, offsets = self._forward(contexts, sections)
        scores = []
        for i, (ctx, sec) in enumerate(zip(contexts, sections)):
            start = offsets[i] + len(ctx)
            pred = hidden[i, start - 1 : start - 1 + len(sec)]  # [S, d] positions predicting x_0 .. x_{S-1}
            top = self._logprobs(pred).topk(top_k, dim=-1)
            states = torch.zeros(num_blocks(len(sec), block_size), hidden.shape[-1])
            every = []
            for r, group in enumerate(state_positions(len(sec), block_size)):
                if group:
                    idx = torch.tensor(group, device=hidden.device) + start
                    states[r] = hidden[i, idx].float().mean(0).cpu()
                    every.extend(group)
            section_state = (
                hidden[i, torch.tensor(every, device=hidden.device) + start].float().mean(0).cpu()
                if every
                else torch.zeros(hidden.shape[-1])
            )
            scores.append(
                SectionScore(
                    topk_ids=top.indices.tolist(),
                    topk_logprobs=top.values.tolist(),
                    block_states=states.tolist(),
                    section_state=section_state.tolist(),
                )
            )
        return scores

    @torch.no_grad()
    def dependence(
        self, contexts: list[list[int]], sections: list[list[int]], targets: list[SectionScore]
    ) -> list[list[float]]:
        """Per-token KL ``[S]`` from the targets' distribution to the teacher's under ``contexts`` (no siblings)."""
        hidden, offsets = self._forward(contexts, sections)
        out = []
        for i, (ctx, sec) in enumerate(zip(contexts, sections)):
            start = offsets[i] + len(ctx)
            logp = self._logprobs(hidden[i, start - 1 : start - 1 + len(sec)])  # [S, V]
            ids = torch.tensor(targets[i].topk_ids, device=logp.device)
            teacher = torch.tensor(targets[i].topk_logprobs, device=logp.device)
            out.append(topk_bucket_kl(teacher, logp.gather(-1, ids)).clamp(min=0).tolist())
        return out

    @torch.no_grad()
    def _round_hidden(
        self, contexts: list[list[list[int]]], sections: list[list[int]], block_size: int, batch_rows: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per section ``(predicting [S, d], fed [S, d])`` hidden states, block r read in ``contexts[i][r-1]``.

        ``predicting[j]`` is the state at the position before token j (its next-token distribution), ``fed[j]``
        the state at token j itself (block states pool these).
        """
        jobs = []  # (section index, context, start, end)
        for i, (ctxs, sec) in enumerate(zip(contexts, sections)):
            jobs += [(i, ctxs[c], a, b) for c, a, b in round_segments(ctxs, len(sec), block_size)]
        width = self.model.config.hidden_size
        out = [(torch.zeros(len(s), width), torch.zeros(len(s), width)) for s in sections]
        for first in range(0, len(jobs), batch_rows):
            chunk = jobs[first : first + batch_rows]
            hidden, offsets = self._forward([c for _, c, _, _ in chunk], [sections[i][:b] for i, _, _, b in chunk])
            for (i, ctx, a, b), h, off in zip(chunk, hidden, offsets):
                start = off + len(ctx)
                out[i][0][a:b] = h[start - 1 + a : start - 1 + b].float().cpu()  # [b - a, d]
                out[i][1][a:b] = h[start + a : start + b].float().cpu()
        return out

    @torch.no_grad()
    def round_logprobs(
        self, contexts: list[list[list[int]]], sections: list[list[int]], block_size: int, batch_rows: int = 16
    ) -> list[torch.Tensor]:
        """Full next-token log-probs ``[S, V]`` (fp32) of each section token, block r read in its own context."""
        return [
            self._logprobs(pred.to(self.device)).cpu()
            for pred, _ in self._round_hidden(contexts, sections, block_size, batch_rows)
        ]

    @torch.no_grad()
    def score_rounds(
        self,
        contexts: list[list[list[int]]],
        sections: list[list[int]],
        top_k: int,
        block_size: int,
        batch_rows: int = 16,
    ) -> list[SectionScore]:
        """Like :meth:`score`, but block r of section i is scored in its own context ``contexts[i][r - 1]``."""
        scores = []
        for pred, fed in self._round_hidden(contexts, sections, block_size, batch_rows):
            top = self._logprobs(pred.to(self.device)).topk(top_k, dim=-1)
            groups = state_positions(pred.shape[0], block_size)
            states = [fed[g].mean(0) if g else torch.zeros(fed.shape[-1]) for g in groups]
            section_state = fed.mean(0) if pred.shape[0] else torch.zeros(fed.shape[-1])
            scores.append(
                SectionScore(
                    topk_ids=top.indices.tolist(),
                    topk_logprobs=top.values.tolist(),
                    block_states=[s.tolist() for s in states],
                    section_state=section_state.tolist(),
                )
            )
        return scores
