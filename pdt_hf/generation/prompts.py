"""Per-stream prompts through the trunk's chat template, split into a shared prefix and per-stream suffixes.

Every stream's full prompt is rendered on its own (so stream k sees exactly
what ``generate`` on that prompt alone would see); the longest common token
prefix of the K renderings is the shared prefix, prefilled once by the bare
trunk, and the rest of each rendering is that stream's suffix::

    stream 0: [ shared prefix ............ | suffix 0 (plan item 0, assistant header) ]
    stream 1: [ shared prefix ............ | suffix 1 .............................. ]
              ^ prefilled once, no sidecar  ^ per-stream cache, sidecars active

Training uses the same split so a token sees the same context in both.

The synthesis stream's prompt is the same request and plan with a fixed conclusion heading in place of a
plan item (``synthesis_message``); it shares the streams' prefix up to where the item starts and holds no
section text: what it knows of the sections comes only through the notes it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REQUEST_AND_PLAN = "{prompt}\n\nThe answer has these sections: {plan}.\n"
"""How every message of an answer starts: the request and the plan (streams, teachers, synthesis)."""
SECTION_INSTRUCTION = REQUEST_AND_PLAN + 'Write only the section "{item}".'
SYNTHESIS_HEADING = "Conclusion"
"""Heading of the synthesis stream's section (the conclusion that ties the sections together)."""
SYNTHESIS_TASK = "a short synthesis that ties the sections together, in a few sentences"
"""What the synthesis stream is asked to write under its heading."""
SYNTHESIS_INSTRUCTION = REQUEST_AND_PLAN + 'Write only the section "{heading}": {task}.'


def request_and_plan(prompt: str, plan: Sequence[str]) -> str:
    """``REQUEST_AND_PLAN`` filled in: the start every message of this answer shares."""
    return REQUEST_AND_PLAN.format(prompt=prompt.strip(), plan="; ".join(plan))


def stream_message(prompt: str, plan: Sequence[str], item: str) -> str:
    """The user message for one stream: the whole request, the plan, and which section to write."""
    return SECTION_INSTRUCTION.format(prompt=prompt.strip(), plan="; ".join(plan), item=item)


def synthesis_message(prompt: str, plan: Sequence[str]) -> str:
    """The synthesis stream's user message (``SYNTHESIS_INSTRUCTION``): the request, the plan and the
    conclusion heading with what to write under it; no section text."""
    return SYNTHESIS_INSTRUCTION.format(
        prompt=prompt.strip(), plan="; ".join(plan), heading=SYNTHESIS_HEADING, task=SYNTHESIS_TASK
    )


def render_ids(tokenizer: PreTrainedTokenizerBase, message: str) -> list[int]:
    """Token ids of ``message`` as a user turn followed by the assistant header (chat template if any)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(message, add_special_tokens=True)["input_ids"])


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, kept at least one token short of every sequence."""
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def split_stream_prompts(stream_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """``(shared prefix, per-stream suffixes)``; every suffix keeps at least one token."""
    n = common_prefix_length(stream_ids)
    return list(stream_ids[0][:n]), [list(s[n:]) for s in stream_ids]
