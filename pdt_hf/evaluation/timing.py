"""Clocks for ``pdt bench``: one definition of a decode step for every method, token arrival times, peak memory.

Design decisions:

- A *step* is one forward of the trunk's decoder stack (``base_model(trunk)``), timed by forward hooks
  that every method passes through: HF ``generate`` calls it inside ``LlamaForCausalLM.forward``, PDT
  calls it directly. A step's time is the gap between the start of its forward and the start of the next
  one (the last: to the end of the call), so it includes the LM head, sampling, logits processors and,
  for PDT, the heads and commit bookkeeping of a block boundary: what a user waits per step::

      call start   prefill fwd        step fwd 1       step fwd 2        step fwd n       call end
          |---------[=======]-----------[====]-----------[====]--- ... ----[====]-----------|
                                        ^ t_1 --------->^ t_2 ------------>    ^ t_n ------>^

- Which forwards are steps: for HF ``generate`` every forward after the first (the first is the prompt
  prefill; with prompt lookup the later ones verify several tokens); for PDT the forwards of one token per
  stream (the shared-prefix and per-stream suffix prefills read more), or, with speculative decoding, whose
  verify forwards read several tokens too, the last ``decode_forwards`` forwards (the count PDT's telemetry
  reports; the prefills come first).
- *Time to first token* is the start of the first step forward (its input is the first new token), for
  every method. ``TokenClock`` is an HF streamer that records when each batch of new tokens arrived, so a
  long serial run also gives the time it took to write any shorter count of tokens.
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On Linux
  CPUs the kernel's high-water mark of the resident set (``VmHWM``) is reset by writing ``5`` to
  ``/proc/self/clear_refs`` and read from ``/proc/self/status`` afterwards: exact, and free while timing.
  Elsewhere ``resource.getrusage`` gives the process-lifetime peak, marked as not reset.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..trunk.architectures import base_model

__all__ = ["ForwardClock", "TokenClock", "peak_memory"]


class ForwardClock:
    """Forward hooks on the trunk's decoder stack recording ``(start, end, query length)`` of every forward."""

    def __init__(self, trunk: torch.nn.Module) -> None:
        self.module = base_model(trunk)
        self.events: list[list[float]] = []
        self._handles: list[Any] = []

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.events.append([time.perf_counter(), float("nan"), float(ids.shape[1]) if ids is not None else 0.0])

    def _post(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.events:
            self.events[-1][1] = time.perf_counter()

    def __enter__(self) -> ForwardClock:
        self.events = []
        self._handles = [
            self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.module.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def steps(
        self, call_end: float, kind: str, decode_forwards: int | None = None
    ) -> tuple[list[float], float | None]:
        """``(step seconds, start of the first step)`` for ``kind`` ``"hf"`` or ``"pdt"`` (see module docstring).

        ``decode_forwards`` (PDT only): the steps are the last that many forwards, whatever their length.
        """
        if kind not in ("hf", "pdt"):
            raise ValueError(f"kind={kind!r} must be 'hf' or 'pdt'.")
        if decode_forwards is not None:
            if kind != "pdt" or not 0 <= decode_forwards <= len(self.events):
                raise ValueError(
                    f"decode_forwards={decode_forwards} needs kind='pdt' and at most the {len(self.events)} "
                    "forwards recorded."
                )
            starts = [e[0] for e in self.events[len(self.events) - decode_forwards :]]
        elif kind == "hf":
            starts = [e[0] for e in self.events[1:]]
        else:
            starts = [e[0] for e in self.events if e[2] == 1.0]
        if not starts:
            return [], None
        bounds = starts + [call_end]
        return [b - a for a, b in zip(bounds, bounds[1:])], starts[0]


class TokenClock(BaseStreamer):
    """HF streamer recording ``(time, new tokens)`` per ``put``; the first ``put`` (the prompt) is skipped."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.arrivals.append((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass

    def time_to(self, tokens: int, start: float) -> float | None:
        """Seconds from ``start`` until ``tokens`` new tokens existed (single-row runs; None if never reached)."""
        total = 0
        for when, count in self.arrivals:
            total += count
            if total >= tokens:
                return when - start
        return None


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict filled on exit with ``peak_mib``, ``start_mib`` and ``kind`` (``cuda``, ``rss-hwm``, ``rss-lifetime``)."""
    result: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result["start_mib"] = torch.cuda.memory_allocated(device) / 2**20
        yield result
        torch.cuda.synchronize(device)
        result.update(peak_mib=torch.cuda.max_memory_allocated(device) / 2**20, kind="cuda")
        return
    reset = False
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        reset = True
    except OSError:
        pass
    rss = _read_status_kib("VmRSS")
    result["start_mib"] = rss / 1024 if rss is not None else None
    yield result
    hwm = _read_status_kib("VmHWM") if reset else None
    if hwm is not None:
        result.update(peak_mib=hwm / 1024, kind="rss-hwm")
    else:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        result.update(peak_mib=peak, kind="rss-lifetime")
