"""Speculative decoding inside PDT streams: every stream drafts up to n tokens, all streams verify in one forward.

One step of a block with drafts (A = 3 streams, n = 3, B = 8; t = the token chosen from the last logits, d = a
draft token, . = padding)::

    stream 0  block [x x]          forward [t d d d]   d d accepted, d rejected: keeps t d d, rolls back 1
    stream 1  block [x x x x x x]  forward [t d . .]   room for 1 draft before the block ends; keeps t d, rolls back 2
    stream 2  block [x x x]        forward [t . . .]   no draft found: keeps t, rolls back 3 (the padding)
              one batched forward [A, T = 1 + longest draft]; the logits at position j verify the token at j + 1

Design decisions:
- The token in front of the drafts is chosen exactly as the non-speculative step chooses it (same processors,
  same generator). A draft token is checked against the processed logits of the position before it, with the
  stream's history up to it. Greedy: accepted iff it is the token the non-speculative step would pick there, so
  the output is the same, token for token (up to the float tolerance between a T-token forward and T one-token
  forwards). Sampling: the point-mass rule of ``sampling.accept_draft``; the residual draw is the next step's
  token choice from the logits of the same position, with the rejected token banned (``residual_scores``).
- A draft never crosses a block boundary: with the chosen token in the block, a stream proposes at most
  min(n, B - len(block), tokens left to ``max_new_tokens``). Notes are read once per round, so every token of a
  verify forward reads what the one-token step at its position would read (``StepRunner.chunk_notes``); the
  heads see the hidden state of every kept token, as without drafts.
- Stop criteria (EOS, stop strings, ``stopping_criteria``, length) run per accepted token, in order; a stop ends
  the stream's acceptance and the drafts after it are rolled back. Drafts may hold EOS (unlike HF's prompt
  lookup, which cuts them there): its stop check handles it.
- Rejected drafts and padding leave the stream cache by ``StreamKVCache.rollback(k, T - kept)``, the O(1) length
  decrement of block rollbacks (T <= B <= L, so always within the commit horizon); their K/V stay masked.
- A step in which no stream found a draft is the ordinary one-token step (fast sidecar delta, cascade attention).
- Proposers. ``PromptLookup``: HF's ``prompt_lookup_num_tokens`` on the stream's own history (its prompt,
  committed text and block): the longest suffix n-gram of at most ``max_matching_ngram_size`` = 2 tokens, its
  earliest earlier occurrence, the tokens that followed it. ``DraftModel``: a small causal LM sharing the trunk's
  vocabulary, greedy, one ``DynamicCache`` per stream cropped to what it shares with the stream's history (block
  rollbacks and rejected drafts cost no re-prefill). Both drafts are point masses, so one acceptance rule serves.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from transformers import DynamicCache

from ..trunk.compat import cache_kwargs, output_cache
from .sampling import accept_draft

__all__ = [
    "DEFAULT_SPECULATIVE_TOKENS",
    "SPECULATE_METHODS",
    "DraftModel",
    "DraftProposer",
    "PromptLookup",
    "Speculator",
    "make_proposer",
    "prompt_lookup",
]

SPECULATE_METHODS = ("prompt-lookup", "draft")
DEFAULT_SPECULATIVE_TOKENS = 2
"""n when ``speculate`` is given without ``num_speculative_tokens`` (docs/benchmarks.md: what paid on CPU)."""


class DraftProposer(Protocol):
    """Proposes the next tokens of one stream from its history (prompt, committed text and block, as a list)."""

    def propose(self, stream: int, history: list[int], max_tokens: int) -> list[int]: ...


def prompt_lookup(history: list[int], max_tokens: int, max_matching_ngram_size: int = 2) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the earliest earlier occurrence of the history's last n-gram.

    Longest n-gram first (``max_matching_ngram_size`` down to 1), as ``transformers``'
    ``PromptLookupCandidateGenerator``; ``[]`` when nothing matches. History ``[5, 6, 7, 5, 6]``: the 2-gram
    ``5 6`` occurs at 0, followed by ``7 5 6`` -> ``[7, 5]`` for ``max_tokens = 2``.
    """
    length = len(history)
    for size in range(min(max_matching_ngram_size, length - 1), 0, -1):
        tail = history[-size:]
        start, stop = 0, length - size  # a window starting before ``stop`` is followed by at least one token
        while True:
            try:
                i = history.index(tail[0], start, stop)
            except ValueError:
                break
            if history[i : i + size] == tail:
                return history[i + size : i + size + max_tokens]
            start = i + 1
    return []


class PromptLookup:
    """``prompt_lookup`` on each stream's own history."""

    def __init__(self, max_matching_ngram_size: int = 2) -> None:
        self.max_matching_ngram_size = max_matching_ngram_size

    def propose(self, stream: int, history: list[int], max_tokens: int) -> list[int]:
        return prompt_lookup(history, max_tokens, self.max_matching_ngram_size)


class DraftModel:
    """Greedy drafts from a small causal LM sharing the trunk's vocabulary; one cache per stream.

    Args:
        model: the draft ``PreTrainedModel`` (a separate model, not the trunk: the sidecar hooks sit on the trunk).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.caches: dict[int, DynamicCache] = {}
        self.seen: dict[int, list[int]] = {}  # the tokens each stream's cache holds

    def _logits(self, stream: int, ids: list[int]) -> torch.Tensor:
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device), use_cache=True, **cache_kwargs(self.caches[stream])
        )
        self.caches[stream] = output_cache(out)
        self.seen[stream] += ids
        return out.logits[0, -1]  # [V]

    @torch.no_grad()
    def propose(self, stream: int, history: list[int], max_tokens: int) -> list[int]:
        seen = self.seen.setdefault(stream, [])
        common = 0
        for a, b in zip(seen, history):
            if a != b:
                break
            common += 1
        common = min(common, len(history) - 1)  # feed at least one token to get next-token logits
        if stream not in self.caches or common == 0:
            self.caches[stream], self.seen[stream], common = DynamicCache(), [], 0
        elif common < len(seen):
            self.caches[stream].crop(common - len(seen))  # negative: drop that many (every supported release)
            del seen[common:]
        logits = self._logits(stream, history[common:])
        draft: list[int] = []
        while len(draft) < max_tokens:
            draft.append(int(logits.argmax()))
            if len(draft) < max_tokens:
                logits = self._logits(stream, draft[-1:])
        return draft


def make_proposer(
    speculate: str | DraftProposer | None, num_speculative_tokens: int | None, draft_model, trunk
) -> tuple[DraftProposer | None, str | None, int]:
    """Validate ``generate``'s speculative arguments; returns (proposer or None, its name, n).

    Raises ValueError naming the value and the fix, before any compute.
    """
    if speculate is None:
        if num_speculative_tokens is not None:
            raise ValueError(
                f"num_speculative_tokens={num_speculative_tokens!r} needs speculative decoding on: pass "
                "speculate='prompt-lookup' (or 'draft' with draft_model=...)."
            )
        if draft_model is not None:
            raise ValueError("draft_model is only used with speculate='draft'; pass speculate='draft' too.")
        return None, None, 0
    n = DEFAULT_SPECULATIVE_TOKENS if num_speculative_tokens is None else num_speculative_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"num_speculative_tokens must be a positive integer (draft tokens per stream and forward), got {n!r}; "
            f"use e.g. {DEFAULT_SPECULATIVE_TOKENS}, or speculate=None to decode without drafts."
        )
    if not isinstance(speculate, str):
        if not callable(getattr(speculate, "propose", None)):
            raise ValueError(
                f"speculate={speculate!r} is neither one of {list(SPECULATE_METHODS)} nor an object with a "
                "propose(stream, history, max_tokens) method."
            )
        return speculate, type(speculate).__name__, n
    if speculate not in SPECULATE_METHODS:
        raise ValueError(
            f"unknown speculate={speculate!r}; use 'prompt-lookup' (n-gram lookup in each stream's own prompt and "
            "text, no second model) or 'draft' (with draft_model=a small model sharing the trunk's vocabulary)."
        )
    if speculate == "prompt-lookup":
        if draft_model is not None:
            raise ValueError("draft_model is only used with speculate='draft'; drop it or pass speculate='draft'.")
        return PromptLookup(), speculate, n
    if draft_model is None:
        raise ValueError(
            "speculate='draft' needs draft_model=a small causal LM sharing the trunk's vocabulary, e.g. "
            "AutoModelForCausalLM.from_pretrained(...); or use speculate='prompt-lookup', which needs none."
        )
    if draft_model is trunk:
        raise ValueError(
            "draft_model is the trunk itself, whose layers carry the sidecar hooks; load a separate (smaller) "
            "model sharing its vocabulary as the draft."
        )
    vocab = _vocab_size(draft_model), _vocab_size(trunk)
    if None not in vocab and vocab[0] != vocab[1]:
        raise ValueError(
            f"draft_model has a vocabulary of {vocab[0]} tokens but the trunk has {vocab[1]}; a draft model must "
            "share the trunk's tokenizer and vocabulary (e.g. a smaller model of the same family)."
        )
    return DraftModel(draft_model), speculate, n


def _vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "vocab_size", None)


class Speculator:
    """Runs the speculative steps of a :class:`~pdt_hf.generation.decode.MultiStreamDecoder`'s blocks.

    Args:
        decoder: the decoder (its settings, chooser, step runner, bus, stop checks and telemetry are used).
        proposer: where drafts come from.
        num_tokens: n, the most draft tokens per stream and forward.
        step_masks: adapts the stream cache's step kwargs to the trunk (``stream_kv.masks.trunk_step_masks``).
    """

    def __init__(self, decoder, proposer: DraftProposer, num_tokens: int, step_masks) -> None:
        self.decoder, self.proposer, self.num_tokens, self.step_masks = decoder, proposer, num_tokens, step_masks

    def _room(self, state) -> int:
        """Draft tokens this stream may propose after its newest token (block boundary, token budget, n)."""
        s = self.decoder.settings
        if state.stop_reason is not None:
            return 0
        left = s.max_new_tokens - len(state.committed) - len(state.block)
        return max(0, min(self.num_tokens, s.block_size - len(state.block), left))

    def step(self, states, rows: list[int], round: int, cache, next_logits: torch.Tensor) -> None:
        """Choose, draft, verify in one batched forward and keep each row's accepted prefix (module docstring)."""
        d = self.decoder
        steps, tel, device = d.steps, d.telemetry, d.device
        banned = [states[k].banned for k in rows]
        tokens, scores = steps.choose(rows, next_logits, lambda k: states[k].history(device), banned)
        drafts: list[list[int]] = []
        for i, k in enumerate(rows):
            state = states[k]
            state.banned = None
            state.block.append(tokens[i])
            state.stop_reason = d._stop_reason(state, tokens[i], scores[i])
            room = self._room(state)
            drafts.append(self.proposer.propose(k, state.tokens(), room)[:room] if room else [])
        tel.draft_tokens += sum(len(x) for x in drafts)
        notes, counts = steps.notes(d.bus, rows, round)
        width = 1 + max(len(x) for x in drafts)
        start = time.perf_counter()
        if width == 1:
            out = steps.forward(rows, tokens, notes, cache, self.step_masks)
        else:
            ids = [[t, *x] + [(x or [t])[-1]] * (width - 1 - len(x)) for t, x in zip(tokens, drafts)]
            ids = torch.tensor(ids, device=device)  # [A, T], right-padded (the padding is rolled back)
            out = steps.forward_chunk(rows, ids, steps.chunk_notes(d.bus, width), cache, self.step_masks)
        tel.timings.setdefault("steps", []).append(time.perf_counter() - start)
        tel.timings.setdefault("first_token", time.perf_counter() - d._t0)
        tel.forwards += 1
        tel.stream_forwards += len(rows)
        logits, hidden = out.logits, out.hidden_states  # [A, T, V], [A, T, d]
        targets = None
        if width > 1 and steps.batched_choice:
            a, t, v = logits[:, :-1].shape
            targets = steps.process(logits[:, :-1].reshape(a * t, v)).view(a, t, v)  # [A, T-1, V], every position
        for i, k in enumerate(rows):
            state, accepted = states[k], 0
            for j, token in enumerate(drafts[i]):
                if state.stop_reason is not None:
                    break
                target = (
                    targets[i, j : j + 1]
                    if targets is not None
                    else d.chooser.scores(state.history(device), logits[i, j])
                )  # [1, V], the processed scores the non-speculative step would choose from here
                if not self._accept(target[0], token):
                    if d.chooser.settings.do_sample:
                        state.banned = token  # the next choice draws from the residual at this position
                    break
                state.block.append(token)
                state.stop_reason = d._stop_reason(state, token, target)
                accepted += 1
            kept = 1 + accepted
            state.block_hidden.extend(hidden[i, :kept].unbind(0))
            next_logits[k] = logits[i, kept - 1]
            state.notes_read += counts[i] * kept
            if width > kept:
                cache.rollback(k, width - kept)
            tel.accepted_draft_tokens += accepted
            tel.decoded_tokens += kept

    def _accept(self, scores: torch.Tensor, token: int) -> bool:
        """Greedy: ``token`` is the first maximum of ``scores`` [V]; sampling: ``accept_draft`` with a fresh draw."""
        chooser = self.decoder.chooser
        if not chooser.settings.do_sample:
            return int(scores.argmax()) == token
        uniform = torch.rand((), generator=chooser.generator, device=chooser.generator.device)
        return accept_draft(torch.softmax(scores, dim=-1), token, uniform)
