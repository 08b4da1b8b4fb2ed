"""Public entry points: ``PDTForCausalLM.generate`` and a Transformers ``custom_generate`` callable.

Both validate every argument before any compute (a bad value raises a
``ValueError`` naming it and the fix, with nothing half-done), fill unset
symbols from the sidecar's :class:`~pdt_hf.config.PDTConfig`, build the plan
and the per-stream prompts, and hand over to :class:`MultiStreamDecoder`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList, PreTrainedTokenizerBase, StoppingCriteriaList

from .decode import DecodeSettings, MultiStreamDecoder
from .output import MultiStreamOutput
from .plan import normalise_plan, skeleton_plan
from .prompts import render_ids, split_stream_prompts, stream_message
from .sampling import SamplingSettings, TokenChooser
from .streamer import MultiStreamStreamer

logger = logging.getLogger(__name__)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_owner(trunk: torch.nn.Module, model: torch.nn.Module) -> None:
    """Remember which PDT wrapper's sidecar is attached to ``trunk`` (for ``custom_generate``)."""
    _OWNERS[trunk] = weakref.ref(model)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def multi_stream_generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    prompt: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    num_streams: int | None = None,
    plan: Sequence[str] | str | None = None,
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
) -> MultiStreamOutput:
    """Write ``num_streams`` sections of one answer in parallel (see DESIGN.md, "Generation").

    The prompt is ``prompt`` or ``input_ids`` ``[1, T]`` decoded with ``tokenizer`` (pass the raw request,
    not a chat-templated one: each stream's prompt goes through the chat template here). ``plan`` is the
    list of section prompts (or ``"a; b; c"``); without it the trunk writes an outline first.
    ``max_new_tokens`` is per stream. Returns a :class:`MultiStreamOutput`.
    """
    cfg = model.pdt_config
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
    settings = DecodeSettings(
        num_streams=num_streams if num_streams is not None else (cfg.num_streams if plan is None else 0),
        block_size=block_size if block_size is not None else cfg.block_size,
        commit_horizon=commit_horizon if commit_horizon is not None else cfg.commit_horizon,
        note_lag=note_lag if note_lag is not None else cfg.note_lag,
        note_window=note_window if note_window is not None else cfg.note_window,
        agreement_threshold=agreement_threshold if agreement_threshold is not None else cfg.agreement_threshold,
        max_retries=max_retries if max_retries is not None else cfg.max_retries,
        max_new_tokens=max_new_tokens,
        stop_strings=(stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ()),
        use_notes=use_notes,
        note_ablation=note_ablation,
        rollback=rollback,
        fast_attention=fast_attention,
    )
    if num_streams is not None:
        _check_positive("num_streams", num_streams)
    for name in ("block_size", "commit_horizon", "note_window", "max_new_tokens"):
        _check_positive(name, getattr(settings, name))
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

    if plan is None:
        plan = skeleton_plan(model.trunk, tokenizer, prompt, settings.num_streams)
        logger.info("plan written by the trunk: %s", plan)
    plan = normalise_plan(plan)
    if num_streams is None:
        settings.num_streams = min(len(plan), cfg.num_streams) if plan else cfg.num_streams
    if settings.num_streams > len(plan):
        raise ValueError(
            f"num_streams={settings.num_streams} is above the plan length ({len(plan)} items: {plan}); give one "
            "plan item per stream or lower num_streams."
        )
    if settings.num_streams > cfg.num_streams:
        raise ValueError(
            f"num_streams={settings.num_streams} but this sidecar has adapters for {cfg.num_streams} streams "
            "(PDTConfig.num_streams); lower num_streams or train a sidecar with more streams."
        )
    if settings.num_streams < len(plan):
        logger.warning("plan has %d items; writing the first %d (num_streams).", len(plan), settings.num_streams)
        plan = plan[: settings.num_streams]

    stream_prompts = [render_ids(tokenizer, stream_message(prompt, plan, item)) for item in plan]
    prefix, suffixes = split_stream_prompts(stream_prompts)
    if not prefix:
        raise ValueError("the stream prompts share no leading token; use a tokenizer with a chat template or BOS.")
    limit = getattr(model.trunk.config, "max_position_embeddings", None)
    longest = max(len(p) for p in stream_prompts) + max_new_tokens + 1
    if limit is not None and longest > limit:
        raise ValueError(
            f"prompt ({max(len(p) for p in stream_prompts)} tokens with the plan) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the trunk's context of {limit} tokens; shorten the prompt or lower max_new_tokens."
        )
    device = next(model.trunk.parameters()).device
    eos = model.trunk.generation_config.eos_token_id if model.trunk.generation_config is not None else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    decoder = MultiStreamDecoder(
        model, tokenizer, settings, TokenChooser(sampling, device), streamer, eos_ids, record_reads=record_reads
    )
    output = decoder.run(plan, stream_prompts, prefix, suffixes)
    output.bus = decoder.bus
    return output


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
    **model_kwargs: object,
) -> MultiStreamOutput:
    """``trunk.generate(**inputs, custom_generate=custom_generate, num_streams=3, plan=[...], tokenizer=tok)``.

    Works on a plain trunk whose sidecars were attached with ``PDTForCausalLM`` (the wrapper is looked up).
    Sampling settings and processors come from the prepared ``generation_config``/``logits_processor``.
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
        max_new_tokens=generation_config.max_new_tokens or 128,
        do_sample=bool(generation_config.do_sample),
        logits_processor=logits_processor,
        streamer=streamer,
        seed=model_kwargs.get("seed"),
        stop_strings=generation_config.stop_strings,
    )
