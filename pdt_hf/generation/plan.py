"""Plans: the caller's section list, or an outline the trunk writes in a skeleton pass.

The outline parser accepts numbered (``1.``, ``1)``, ``(1)``, ``Step 1:``) and
bulleted (``-``, ``*``, ``•``) lines, strips markdown emphasis and trailing
punctuation, drops duplicates (case-insensitive), and keeps at most K items.
If no such line exists it falls back to non-empty lines; nothing usable is a
:class:`PlanError` that shows what the trunk wrote.

Plan length and K (:func:`streams_for_plan`), one rule for the API and the CLI:
a plan the caller gives sets K = its length when ``num_streams`` is not given;
when both are given they must agree, so no item is ever dropped and no stream
runs without an item. A skeleton pass asks for K items; an outline with fewer
is accepted (K = its length) only when the caller left ``num_streams`` unset.

With ``plan_candidates=M`` (stream selection, ``generation.select``) the plan is a pool of M >= K candidates
(:func:`check_candidates`): the caller's list must hold exactly M items, and K comes from ``num_streams`` (or
the sidecar), not from the list; without a list the skeleton pass is asked for M items, and an outline of
fewer than M but at least K is selected from as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .prompts import render_ids

SKELETON_INSTRUCTION = (
    "{prompt}\n\nBefore answering, write a short outline of exactly {k} section titles for the answer, "
    "one per line, numbered 1 to {k}. Write only the titles."
)

SKELETON_MAX_NEW_TOKENS = 96
"""Tokens the trunk may write for the outline in the skeleton pass."""


def skeleton_max_new_tokens(num_items: int) -> int:
    """Outline budget for ``num_items`` titles: :data:`SKELETON_MAX_NEW_TOKENS`, or 16 a title beyond six."""
    return max(SKELETON_MAX_NEW_TOKENS, 16 * num_items)


_ITEM = re.compile(r"^\s*(?:(?:step|section|part)\s*\d+\s*[:.)-]|\(?\d+[.)\]:]|[-*•+])\s*(?P<text>.+?)\s*$", re.I)


class PlanError(ValueError):
    """No usable plan could be made."""


def _clean(text: str) -> str:
    text = re.sub(r"[*_`#]+", "", text).strip()
    text = re.sub(r"\s+", " ", text)
    return text.rstrip(" .:;,-")


def parse_plan(text: str, max_items: int) -> list[str]:
    """Outline text -> at most ``max_items`` distinct section titles."""
    lines = [line.strip().lstrip("#>").strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    items = [m.group("text") for line in lines if (m := _ITEM.match(line))]
    if not items:
        items = lines
    plan: list[str] = []
    seen: set[str] = set()
    for item in items:
        item = _clean(item)
        key = item.lower()
        if len(item) < 2 or key in seen:
            continue
        seen.add(key)
        plan.append(item)
        if len(plan) == max_items:
            break
    if not plan:
        raise PlanError(f"could not read a plan from the outline {text!r}; pass plan=[...] explicitly.")
    return plan


def normalise_plan(plan: Sequence[str] | str) -> list[str]:
    """Accept a list or a ``"a; b; c"`` string; strip items; reject empty ones."""
    if isinstance(plan, str):
        plan = [p for p in plan.split(";")]
    items = [str(p).strip() for p in plan]
    if not items or any(not p for p in items):
        raise PlanError(f"plan {list(plan)!r} has an empty item; give one non-empty section prompt per stream.")
    return items


def streams_for_plan(
    plan: Sequence[str],
    num_streams: int | None,
    *,
    written_by_trunk: bool = False,
    streams_name: str = "num_streams",
    plan_name: str = "plan",
) -> int:
    """K for ``plan``: ``len(plan)`` when ``num_streams`` is None, else ``num_streams`` if it equals it.

    A mismatch is a :class:`PlanError` naming both values (``streams_name``/``plan_name`` let the CLI
    name its flags); ``written_by_trunk`` words the fix for an outline from the skeleton pass.
    """
    if num_streams is None or num_streams == len(plan):
        return len(plan)
    if written_by_trunk:
        fix = f"pass {plan_name} with {num_streams} items yourself, or leave {streams_name} unset"
        source = " in the trunk's outline"
    else:
        fix = f"give one {plan_name} item per stream, or leave {streams_name} unset to run one stream per item"
        source = ""
    if num_streams > len(plan):
        raise PlanError(
            f"{streams_name}={num_streams} is above the plan length ({len(plan)} items{source}: {list(plan)}); {fix}."
        )
    raise PlanError(
        f"{streams_name}={num_streams} is below the plan length ({len(plan)} items{source}: {list(plan)}): "
        f"the last {len(plan) - num_streams} items would be dropped; {fix}."
    )


def check_candidates(
    plan_candidates: int,
    num_streams: int | None,
    plan: Sequence[str] | None,
    *,
    candidates_name: str = "plan_candidates",
    streams_name: str = "num_streams",
    plan_name: str = "plan",
) -> None:
    """Refuse a candidate pool that cannot give K streams: M < K, or a ``plan`` whose length is not M.

    ``num_streams`` None skips the K check (the CLI before the sidecar's K is known). :class:`PlanError` names
    the values and the fix; the ``*_name`` arguments let the CLI name its flags.
    """
    if num_streams is not None and plan_candidates < num_streams:
        raise PlanError(
            f"{candidates_name}={plan_candidates} is below {streams_name}={num_streams}: selection keeps K of M "
            f"candidates, so M must be at least K; raise {candidates_name} (e.g. {2 * num_streams}) or lower "
            f"{streams_name}."
        )
    if plan is not None and len(plan) != plan_candidates:
        raise PlanError(
            f"{plan_name} has {len(plan)} items but {candidates_name}={plan_candidates}: with selection the "
            f"{plan_name} is the pool of candidates; give {plan_candidates} items, or set {candidates_name}="
            f"{len(plan)}."
        )


def skeleton_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, num_streams: int) -> list[int]:
    """Token ids the skeleton pass feeds the trunk (chat template applied)."""
    return render_ids(tokenizer, SKELETON_INSTRUCTION.format(prompt=prompt.strip(), k=num_streams))


@torch.no_grad()
def skeleton_plan(
    trunk: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    num_streams: int,
    max_new_tokens: int = SKELETON_MAX_NEW_TOKENS,
) -> list[str]:
    """Ask the trunk for an outline of ``num_streams`` sections and parse it."""
    ids = skeleton_prompt_ids(tokenizer, prompt, num_streams)
    device = next(trunk.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    out = trunk.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    return parse_plan(text, num_streams)
