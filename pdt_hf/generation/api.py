"""Public entry points: ``PDTForCausalLM.generate`` and a Transformers ``custom_generate`` callable.

Both validate every argument before any compute (a bad value raises a
``ValueError`` naming it and the fix, with nothing half-done), fill unset
symbols from the sidecar's :class:`~pdt_hf.config.PDTConfig`, build the plan
and the per-stream prompts, and hand over to :class:`MultiStreamDecoder`.

Context length: every position a stream uses must fit the trunk's
``max_position_embeddings``, so ``prefix + longest suffix + max_new_tokens``
is checked before the prefill, and (without a plan) the skeleton pass's own
prompt plus its outline tokens, and a lower bound of the stream prompts, are
checked before the skeleton pass. A sliding window (Mistral, GPT-OSS's sliding
layers) limits which keys a query attends to, not how long the context may be:
the stream cache keeps every token and windows by mask, so the same bound is
the only one.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteriaList

from ..config import PDTConfig
from .decode import MultiStreamDecoder
from .output import MultiStreamOutput
from .plan import (
    check_candidates,
    normalise_plan,
    skeleton_max_new_tokens,
    skeleton_plan,
    skeleton_prompt_ids,
    streams_for_plan,
)
from .prompts import render_ids, split_stream_prompts, stream_message, synthesis_message
from .sampling import SamplingSettings, TokenChooser
from .select import scoring_rows, select_plan
from .settings import DecodeSettings
from .speculate import DraftProposer, make_proposer
from .streamer import MultiStreamStreamer
from .synthesis import DEFAULT_SYNTHESIS_TOKENS

logger = logging.getLogger(__name__)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_owner(trunk: torch.nn.Module, model: torch.nn.Module) -> None:
    """Remember which PDT wrapper's sidecar is attached to ``trunk`` (for ``custom_generate``)."""
    _OWNERS[trunk] = weakref.ref(model)


class PromptTooLongError(ValueError):
    """The prompt plus the tokens to write do not fit the trunk's context."""


def _check_positive(name: str, value: object, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}.")


def _check_non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")


def context_limit(trunk_config) -> int | None:
    """Most positions the trunk takes (``max_position_embeddings``), or None if its config names none."""
    limit = getattr(trunk_config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_fits(limit: int | None, prompt_tokens: int, new_tokens: int, what: str, fix: str) -> None:
    """Raise :class:`PromptTooLongError` if ``prompt_tokens + new_tokens`` positions exceed ``limit``."""
    total = prompt_tokens + new_tokens
    if limit is not None and total > limit:
        raise PromptTooLongError(
            f"the prompt is too long for this trunk: {what} needs {prompt_tokens} prompt tokens + {new_tokens} "
            f"new tokens = {total}, which exceeds the trunk's context of {limit} tokens "
            f"(max_position_embeddings); {fix}."
        )


def _stream_fix(limit: int, prompt_tokens: int, new_tokens: int) -> str:
    over = prompt_tokens + new_tokens - limit
    room = limit - prompt_tokens
    lower = f" or lower max_new_tokens (--max-new-tokens) to {room} or less" if room >= 1 else ""
    return f"shorten the prompt (or plan) by at least {over} tokens{lower}"


def multi_stream_generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    prompt: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    num_streams: int | None = None,
    plan: Sequence[str] | str | None = None,
    plan_candidates: int | None = None,
    block_size: int | None = None,
    commit_horizon: int | None = None,
    note_lag: int | None = None,
    note_window: int | None = None,
    agreement_threshold: float | None = None,
    max_retries: int | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    stop_strings: Sequence[str] | str | None = None,
    streamer: MultiStreamStreamer | None = None,
    seed: int | None = None,
    use_notes: bool = True,
    note_ablation: str | None = None,
    rollback: bool = True,
    record_reads: bool = False,
    fast_attention: bool | None = None,
    speculate: str | DraftProposer | None = None,
    num_speculative_tokens: int | None = None,
    draft_model: torch.nn.Module | None = None,
    synthesis: bool = False,
    synthesis_max_new_tokens: int | None = None,
) -> MultiStreamOutput:
    """Write ``num_streams`` sections of one answer in parallel (see DESIGN.md, "Generation").

    The prompt is ``prompt`` or ``input_ids`` ``[1, T]`` decoded with ``tokenizer`` (pass the raw request,
    not a chat-templated one: each stream's prompt goes through the chat template here). ``plan`` is the
    list of section prompts (or ``"a; b; c"``); without it the trunk writes an outline first.
    ``max_new_tokens`` is per stream. Returns a :class:`MultiStreamOutput`.

    Plan and K: with a ``plan`` and no ``num_streams``, K = ``len(plan)``; with both, they must be equal
    (a mismatch is an error naming both; items are never dropped). Without a plan, K = ``num_streams`` or the
    sidecar's ``num_streams`` and the trunk is asked for K sections; a shorter outline is used as it is only
    when ``num_streams`` was not given. K may not exceed the sidecar's ``num_streams`` (one adapter per stream).

    Stream selection (``plan_candidates=M``, ``generation.select``): the plan is a pool of M >= K candidates,
    the caller's ``plan`` of exactly M items or an outline of M items from the skeleton pass; K is
    ``num_streams`` or the sidecar's, and the K best non-redundant candidates (scored by the bare trunk) become
    the streams, in candidate order. ``output.plan`` is the kept plan; telemetry ``selection`` records every
    candidate with its score and why it was kept or dropped.

    Raises :class:`PromptTooLongError` before any compute when the longest stream prompt (shared prefix +
    its suffix) plus ``max_new_tokens``, or the skeleton pass's prompt plus its outline tokens, exceeds the
    trunk's ``max_position_embeddings``. A sliding window does not lower that bound: it limits which keys a
    query reads, and the stream cache keeps every token.

    Speculative decoding (``generation.speculate``): ``speculate="prompt-lookup"`` (n-gram lookup in each
    stream's own prompt and text) or ``"draft"`` (greedy drafts of ``draft_model``, a small model sharing the
    trunk's vocabulary) lets every stream propose up to ``num_speculative_tokens`` tokens (default
    ``DEFAULT_SPECULATIVE_TOKENS``), never past its block's end; all streams verify in one batched forward.
    Greedy output equals the output without drafts; sampling keeps its distribution (point-mass acceptance).

    Synthesis (``synthesis=True``, ``generation.synthesis``): after the K streams finish, one more stream (the
    sidecar's synthesis slot, ``PDTConfig.synthesis``) reads every stream's notes, and none of their text,
    under the prompt and a fixed conclusion heading (``prompts.synthesis_message``), and writes up to
    ``synthesis_max_new_tokens`` (default ``DEFAULT_SYNTHESIS_TOKENS``) tokens; ``output.synthesis`` holds
    them and ``output.answer`` ends with them.
    """
    cfg = model.pdt_config
    if not isinstance(synthesis, bool):
        raise ValueError(f"synthesis must be True or False, got {synthesis!r}.")
    if synthesis and not cfg.synthesis:
        raise ValueError(
            "synthesis=True needs a sidecar with a synthesis slot, and this one has none (pdt_config.json "
            "synthesis: false). Train the curriculum's synthesis stage on it (docs/training.md, `pdt data "
            "synthesis` then recipes/train.py with pdt.synthesis: true), or build an untrained sidecar with "
            "PDTConfig(synthesis=True)."
        )
    if synthesis_max_new_tokens is not None:
        if not synthesis:
            raise ValueError(
                f"synthesis_max_new_tokens={synthesis_max_new_tokens!r} is only used with synthesis=True; add it "
                "or drop synthesis_max_new_tokens."
            )
        _check_positive("synthesis_max_new_tokens", synthesis_max_new_tokens)
    synthesis_tokens = (synthesis_max_new_tokens or DEFAULT_SYNTHESIS_TOKENS) if synthesis else 0
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("multi-stream generate needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...).")
    if prompt is None:
        if input_ids is None:
            raise ValueError("pass the request as prompt='...' or input_ids=tokenizer(prompt).input_ids.")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape [1, T] (one request), got {tuple(input_ids.shape)}.")
        prompt = tokenizer.decode(input_ids[0], skip_special_tokens=True)
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; give the request to answer, e.g. prompt='Explain how tides work.'")
    if num_streams is not None:
        _check_positive("num_streams", num_streams, f"; this sidecar runs 1 to {cfg.num_streams} streams")
    if plan_candidates is not None:
        _check_positive("plan_candidates", plan_candidates, "; the pool size M, at least num_streams (e.g. 2 K)")
    proposer, speculate_name, speculative_tokens = make_proposer(
        speculate, num_speculative_tokens, draft_model, model.trunk
    )
    settings = DecodeSettings.from_config(
        cfg,
        max_new_tokens,
        num_streams=num_streams,
        block_size=block_size,
        commit_horizon=commit_horizon,
        note_lag=note_lag,
        note_window=note_window,
        agreement_threshold=agreement_threshold,
        max_retries=max_retries,
        stop_strings=(stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ()),
        use_notes=use_notes,
        note_ablation=note_ablation,
        rollback=rollback,
        fast_attention=fast_attention,
        speculate=speculate_name,
        num_speculative_tokens=speculative_tokens,
        synthesis_max_new_tokens=synthesis_tokens,
    )
    for name in ("block_size", "commit_horizon", "note_window", "max_new_tokens"):
        _check_positive(name, getattr(settings, name))
    for name in ("note_lag", "max_retries"):
        _check_non_negative(name, getattr(settings, name))
    if settings.block_size > settings.commit_horizon:
        raise ValueError(
            f"block_size ({settings.block_size}) > commit_horizon ({settings.commit_horizon}): a rollback must be "
            "able to remove a whole block; raise commit_horizon or lower block_size."
        )
    if not 0.0 <= settings.agreement_threshold <= 1.0:
        raise ValueError(f"agreement_threshold must lie in [0, 1], got {settings.agreement_threshold}.")
    if note_ablation not in (None, "zero", "shuffle"):
        raise ValueError(f"note_ablation must be None, 'zero' or 'shuffle', got {note_ablation!r}.")
    sampling = SamplingSettings(
        do_sample,
        temperature,
        top_p,
        top_k,
        seed,
        logits_processor or LogitsProcessorList(),
        stopping_criteria or StoppingCriteriaList(),
    )

    limit = context_limit(model.trunk.config)
    if plan is not None:
        plan = normalise_plan(plan)
        if plan_candidates is None:
            settings.num_streams = streams_for_plan(plan, num_streams)
    if plan_candidates is not None:
        check_candidates(plan_candidates, settings.num_streams, plan)
    what = "num_streams=" if num_streams is not None or plan_candidates is not None else "a plan of length "
    settings.num_streams = _streams_within_sidecar(settings.num_streams, cfg.num_streams, what)
    _check_note_capacity(cfg, settings.num_streams, max_new_tokens, settings.block_size)
    selection, source = None, "plan"
    if plan is None:
        source, outline_items = "outline", plan_candidates if plan_candidates is not None else settings.num_streams
        if limit is not None:  # every stream prompt holds the whole request: a lower bound before the outline
            shortest = len(render_ids(tokenizer, stream_message(prompt, [], "")))
            check_fits(limit, shortest, max_new_tokens, "every stream", _stream_fix(limit, shortest, max_new_tokens))
            outline = len(skeleton_prompt_ids(tokenizer, prompt, outline_items))
            check_fits(
                limit,
                outline,
                skeleton_max_new_tokens(outline_items),
                "the outline (skeleton) pass",
                "shorten the prompt, or pass plan=[...] (--plan) to skip the outline pass",
            )
        plan = normalise_plan(
            skeleton_plan(model.trunk, tokenizer, prompt, outline_items, skeleton_max_new_tokens(outline_items))
        )
        logger.info("plan written by the trunk: %s", plan)
        if plan_candidates is None or len(plan) < settings.num_streams:
            settings.num_streams = streams_for_plan(plan, num_streams, written_by_trunk=True)
    if plan_candidates is not None:
        selection = _select(model, tokenizer, prompt, plan, settings.num_streams, limit, source)
        plan = selection.plan

    stream_prompts = [render_ids(tokenizer, stream_message(prompt, plan, item)) for item in plan]
    prefix, suffixes = split_stream_prompts(stream_prompts)
    if not prefix:
        raise ValueError("the stream prompts share no leading token; use a tokenizer with a chat template or BOS.")
    if limit is not None:
        longest = max(range(len(plan)), key=lambda k: len(stream_prompts[k]))
        tokens = len(stream_prompts[longest])
        check_fits(
            limit,
            tokens,
            max_new_tokens,
            f"stream {longest} (shared prefix {len(prefix)} + suffix {len(suffixes[longest])} tokens)",
            _stream_fix(limit, tokens, max_new_tokens),
        )
    synthesis_ids = None
    if synthesis:
        synthesis_ids = render_ids(tokenizer, synthesis_message(prompt, plan))
        check_fits(
            limit,
            len(synthesis_ids),
            synthesis_tokens,
            "the synthesis stream",
            "shorten the prompt (or plan) or lower synthesis_max_new_tokens (--synthesis-max-new-tokens)",
        )
    device = next(model.trunk.parameters()).device
    eos = model.trunk.generation_config.eos_token_id if model.trunk.generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    decoder = MultiStreamDecoder(
        model,
        tokenizer,
        settings,
        TokenChooser(sampling, device),
        streamer,
        eos_ids,
        record_reads=record_reads,
        proposer=proposer,
    )
    output = decoder.run(plan, stream_prompts, prefix, suffixes, synthesis_ids=synthesis_ids)
    output.bus = decoder.bus
    if selection is not None:
        output.telemetry.selection = selection.to_dict()
        output.telemetry.timings["select"] = selection.seconds
    return output


def _select(model, tokenizer, prompt: str, candidates: list[str], k: int, limit: int | None, source: str):
    """Stream selection (``generation.select``), after checking that its scoring rows fit the trunk's context."""
    if limit is not None:
        request, _, items = scoring_rows(tokenizer, prompt, candidates, k)
        check_fits(
            limit,
            len(request),
            max(len(x) for x in items),
            "scoring the plan candidates (outline request + longest candidate)",
            "shorten the prompt or the longest candidate",
        )
    selection = select_plan(model.trunk, tokenizer, prompt, candidates, k, source=source)
    logger.info("stream selection kept %s of %s", selection.plan, candidates)
    return selection


def _check_note_capacity(cfg: PDTConfig, k: int, max_new_tokens: int, block_size: int) -> None:
    needed = cfg.notes_needed(k, max_new_tokens, block_size)
    if needed > cfg.note_capacity:
        raise ValueError(
            f"this generation may publish {needed} notes (num_streams={k} x (1 + notes_per_block="
            f"{cfg.notes_per_block} x ceil(max_new_tokens={max_new_tokens} / block_size={block_size}))) but "
            f"note_capacity is {cfg.note_capacity}; lower max_new_tokens or num_streams, raise block_size, or raise "
            "PDTConfig.note_capacity."
        )


def _streams_within_sidecar(k: int, sidecar_streams: int, what: str) -> int:
    if k > sidecar_streams:
        raise ValueError(
            f"{what}{k} needs {k} streams but this sidecar has adapters for {sidecar_streams} streams "
            f"(PDTConfig.num_streams); use at most {sidecar_streams} streams (plan items) or a sidecar trained "
            "with more."
        )
    return k


def custom_generate(
    model,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config,
    num_streams: int | None = None,
    plan: Sequence[str] | str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    streamer: MultiStreamStreamer | None = None,
    plan_candidates: int | None = None,
    speculate: str | None = None,
    num_speculative_tokens: int | None = None,
    draft_model: torch.nn.Module | None = None,
    synthesis: bool = False,
    synthesis_max_new_tokens: int | None = None,
    **model_kwargs: object,
) -> MultiStreamOutput:
    """``trunk.generate(**inputs, custom_generate=custom_generate, num_streams=3, plan=[...], tokenizer=tok)``.

    Works on a plain trunk whose sidecars were attached with ``PDTForCausalLM`` (the wrapper is looked up).
    Sampling settings and processors come from the prepared ``generation_config``/``logits_processor``;
    ``generation_config.prompt_lookup_num_tokens`` turns on ``speculate="prompt-lookup"`` with that n.
    """
    owner = _OWNERS.get(model)
    pdt = owner() if owner is not None else None
    if pdt is None or not pdt.hooks.attached:
        raise ValueError("custom_generate needs PDT sidecars attached: PDTForCausalLM.from_pretrained(trunk, ...).")
    return multi_stream_generate(
        pdt,
        input_ids,
        tokenizer=tokenizer,
        num_streams=num_streams,
        plan=plan,
        plan_candidates=plan_candidates,
        max_new_tokens=generation_config.max_new_tokens or 128,
        do_sample=bool(generation_config.do_sample),
        logits_processor=logits_processor,
        streamer=streamer,
        seed=model_kwargs.get("seed"),
        stop_strings=generation_config.stop_strings,
        synthesis=synthesis,
        synthesis_max_new_tokens=synthesis_max_new_tokens,
        **_speculative_kwargs(generation_config, speculate, num_speculative_tokens, draft_model),
    )


def _speculative_kwargs(generation_config, speculate, num_speculative_tokens, draft_model) -> dict:
    """``custom_generate``'s speculative arguments, with HF's ``prompt_lookup_num_tokens`` as prompt lookup."""
    lookup = getattr(generation_config, "prompt_lookup_num_tokens", None)
    if speculate is None and lookup is not None:
        speculate = "prompt-lookup"
        num_speculative_tokens = num_speculative_tokens if num_speculative_tokens is not None else lookup
    return {"speculate": speculate, "num_speculative_tokens": num_speculative_tokens, "draft_model": draft_model}
