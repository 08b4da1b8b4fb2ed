"""``pdt bench``: wall clock of serial decoding, batched streams, prompt lookup and PDT on the same prompts.

Design decisions:

- Methods (``K`` streams of ``N`` tokens each, ``N = --max-new-tokens``):

  ===================  ======================================================================================
  ``serial``           HF ``generate``, one prompt (the eval's serial message for the largest K's plan), run
                       once to ``max(K) * N`` tokens; the time to write ``K * N`` tokens is read off the same
                       run for every K (``TokenClock``): what a serial run of that length would have taken
  ``prompt-lookup``    the same with ``prompt_lookup_num_tokens``: speculative decoding whose draft is
                       n-gram lookup in the prompt, so no second model is loaded (an assistant model would
                       need one); greedy, so it writes what serial writes
  ``hf-batch``         HF ``generate`` on the batch of the K stream prompts (left padded), SoT's usual way
  ``pdt-off``          PDT ``generate``, note bus off (``use_notes=False``), rollback on
  ``pdt-on``           PDT ``generate`` as shipped: bus on, rollback on
  ``pdt-no-rollback``  bus on, rollback off: the decoding machinery without the agreement head's rollbacks
  ``pdt-text-bus``     no sidecar: rounds of B tokens (one left-padded HF ``generate`` per round), every
                       stream's context re-prefilled each round with the siblings' text of rounds <= r - Δ
                       (``generation.text_bus``); records the re-prefilled tokens (``prefill_tokens``) and
                       ``rounds``; every forward after the first counts as a step, re-prefills included
  ``pdt-speculate``    ``pdt-no-rollback`` with speculative decoding inside the streams
                       (``speculate="prompt-lookup"``, n = ``--num-speculative-tokens``): the same greedy tokens,
                       fewer forwards; its steps are its decode forwards, verify forwards included
  ===================  ======================================================================================

- Every run records ``forwards`` (PDT: decode forwards, prefills excluded; HF: all forwards) and
  ``tokens_per_forward`` (tokens per stream and decode forward: 1 without drafts; HF: a row's tokens over
  all its forwards, the prefill included, since that one writes the first token) and, for
  ``pdt-speculate``, the draft tokens proposed and accepted (``acceptance_rate``). A round ends when its last
  stream has its block, so with K streams the forwards of a round are those of its slowest stream:
  ``forwards`` is what wall time follows, tokens per stream forward what each stream gains.

- Every method writes exactly its token count: HF calls get ``min_new_tokens = max_new_tokens`` (EOS
  cannot end them), PDT calls suppress every EOS id with ``SuppressTokensLogitsProcessor`` and have no
  stop strings, so each stream stops on length. Rolled-back PDT tokens are decoded on top (aggregate
  tokens/s counts them, useful tokens/s does not).
- A PDT sidecar holds adapters for ``num_streams`` streams. K above that runs on an *untrained* sidecar
  built with ``PDTConfig(num_streams=max(K))`` on the same trunk (its hooks replace the shipped
  sidecar's while it runs): for speed only. An untrained sidecar's agreement head is random, so its rows
  run with ``agreement_threshold=0`` (no rollbacks); the table names the sidecar of each row.
- Runs are interleaved: every repeat runs each (method, K) once per prompt, in an order rotated from
  repeat to repeat, after one warm-up pass of every configuration (few tokens, not recorded).
  Medians and min-max spreads are reported; the machine is named in the output.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

from ..generation.prompts import render_ids, stream_message
from ..generation.speculate import DEFAULT_SPECULATIVE_TOKENS
from ..generation.streamer import MultiStreamStreamer
from .baselines import serial_message
from .prompt_sets import EvalItem
from .timing import ForwardClock, TokenClock, peak_memory

__all__ = ["BENCH_METHODS", "BenchConfig", "run_bench"]

BENCH_METHODS = (
    "serial",
    "prompt-lookup",
    "hf-batch",
    "pdt-off",
    "pdt-on",
    "pdt-no-rollback",
    "pdt-text-bus",
    "pdt-speculate",
)
_SIDECAR_METHODS = ("pdt-off", "pdt-on", "pdt-no-rollback", "pdt-speculate")


@dataclass
class BenchConfig:
    """What ``pdt bench`` runs (CLI flags of the same names)."""

    ks: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 8])
    max_new_tokens: int = 16
    repeats: int = 3
    warmup_tokens: int = 4
    prompt_lookup_num_tokens: int = 10
    num_speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(BENCH_METHODS))

    def __post_init__(self) -> None:
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise ValueError(f"ks={self.ks!r} must be a non-empty list of positive integers, e.g. 1,2,3,4,8.")
        for name in (
            "max_new_tokens",
            "repeats",
            "warmup_tokens",
            "prompt_lookup_num_tokens",
            "num_speculative_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        unknown = [m for m in self.methods if m not in BENCH_METHODS]
        if unknown:
            raise ValueError(f"unknown bench method(s) {unknown}; choose from {list(BENCH_METHODS)}.")
        self.ks = sorted(set(self.ks))


class FirstText(MultiStreamStreamer):
    """Records when the first committed text of any stream reached the streamer (what a user first sees)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def on_text(self, stream: int, text: str, round: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()


def _eos_ids(model) -> list[int]:
    ids = set()
    for eos in (model.trunk.generation_config.eos_token_id, model.tokenizer.eos_token_id):
        ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return sorted(ids)


class Bench:
    """Holds the model(s) and runs one timed call of a (method, K) configuration."""

    def __init__(self, model, sidecar_label: str, config: BenchConfig) -> None:
        from ..config import PDTConfig
        from ..modeling import PDTForCausalLM

        self.model, self.config, self.label = model, config, sidecar_label
        self.device = next(model.trunk.parameters()).device
        self.tok = model.tokenizer
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (_eos_ids(model) or [0])[0]
        self.eos = _eos_ids(model)
        self.wide = None
        if max(config.ks) > model.pdt_config.num_streams and any(m in _SIDECAR_METHODS for m in config.methods):
            torch.manual_seed(config.seed)
            self.wide = PDTForCausalLM(model.trunk, PDTConfig(num_streams=max(config.ks)))
            self.wide.hooks.detach()
            self.wide.tokenizer = model.tokenizer
            self.wide.eval()

    def sidecar_for(self, k: int) -> str:
        return self.label if k <= self.model.pdt_config.num_streams else "untrained (speed only)"

    @contextmanager
    def pdt_model(self, k: int):
        if k <= self.model.pdt_config.num_streams:
            yield self.model
            return
        with self.model.disable_sidecars():
            self.wide.hooks.attach()
            try:
                yield self.wide
            finally:
                self.wide.hooks.detach()

    def _hf(self, prompts: list[list[int]], tokens: int, lookup: bool) -> tuple[dict, TokenClock, float]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        clock = TokenClock()
        extra = {"prompt_lookup_num_tokens": self.config.prompt_lookup_num_tokens} if lookup else {}
        start = time.perf_counter()
        with self.model.disable_sidecars():
            out = self.model.trunk.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=self.pad,
                eos_token_id=self.eos or None,
                streamer=clock,
                **extra,
            )
        written = (out.shape[1] - width) * len(prompts)
        return {"committed": written, "decoded": written, "rollbacks": 0}, clock, start

    def _pdt(
        self, item: EvalItem, k: int, tokens: int, bus: bool, rollback: bool, speculate: bool = False
    ) -> tuple[dict, float]:
        untrained = self.sidecar_for(k) != self.label or self.label == "untrained"
        processors = LogitsProcessorList([SuppressTokensLogitsProcessor(self.eos, device=self.device)])
        view = FirstText()
        start = time.perf_counter()
        with self.pdt_model(k) as model:
            out = model.generate(
                prompt=item.prompt,
                plan=item.plan[:k],
                num_streams=k,
                max_new_tokens=tokens,
                do_sample=False,
                seed=self.config.seed,
                use_notes=bus,
                rollback=rollback,
                logits_processor=processors,
                agreement_threshold=0.0 if untrained else None,
                streamer=view,
                speculate="prompt-lookup" if speculate else None,
                num_speculative_tokens=self.config.num_speculative_tokens if speculate else None,
            )
        t = out.telemetry
        committed = sum(len(s) for s in out.sequences)
        return {
            "committed": committed,
            "decoded": t.decoded_tokens,
            "rollbacks": len(t.rollbacks),
            "first_visible": None if view.first is None else view.first - start,
            "forwards": t.forwards,
            "tokens_per_forward": t.tokens_per_forward,
            "draft_tokens": t.draft_tokens,
            "accepted_draft_tokens": t.accepted_draft_tokens,
            "acceptance_rate": t.acceptance_rate if speculate else None,
        }, start

    def _text_bus(self, item: EvalItem, k: int, tokens: int) -> tuple[dict, float]:
        from ..generation.text_bus import decode_text_bus, hf_generate

        cfg = self.model.pdt_config
        generate = hf_generate(self.model.trunk, self.pad, self.eos, exact=True)
        start = time.perf_counter()
        with self.model.disable_sidecars():
            out = decode_text_bus(
                generate, self.tok, [(item.prompt, item.plan[:k])], cfg.block_size, cfg.note_lag, tokens, self.eos
            )
        committed = sum(len(s) for s in out.sections[0])
        return {
            "committed": committed,
            "decoded": committed,
            "rollbacks": 0,
            "prefill_tokens": out.prefill_tokens,
            "rounds": out.rounds,
        }, start

    @torch.no_grad()
    def run(self, method: str, k: int, item: EvalItem, tokens: int) -> dict[str, Any]:
        """One timed call; ``tokens`` is per stream (serial and prompt lookup write ``max(ks) * tokens``)."""
        total = max(self.config.ks) * tokens
        with peak_memory(self.device) as memory, ForwardClock(self.model.trunk) as fwd:
            if method in ("serial", "prompt-lookup"):
                prompt = render_ids(self.tok, serial_message(item.prompt, item.plan))
                record, clock, start = self._hf([prompt], total, lookup=method == "prompt-lookup")
            elif method == "hf-batch":
                prompts = [render_ids(self.tok, stream_message(item.prompt, item.plan[:k], x)) for x in item.plan[:k]]
                record, clock, start = self._hf(prompts, tokens, lookup=False)
            elif method == "pdt-text-bus":
                record, start = self._text_bus(item, k, tokens)
                clock = None
            elif method in _SIDECAR_METHODS:
                bus, rollback = method != "pdt-off", method not in ("pdt-no-rollback", "pdt-speculate")
                record, start = self._pdt(item, k, tokens, bus, rollback, speculate=method == "pdt-speculate")
                clock = None
            else:
                raise ValueError(f"unknown bench method {method!r}; choose from {list(BENCH_METHODS)}.")
            end = time.perf_counter()
        if method == "pdt-speculate":
            steps, first = fwd.steps(end, "pdt", decode_forwards=record["forwards"])
        else:
            steps, first = fwd.steps(end, "pdt" if method in _SIDECAR_METHODS else "hf")
        if method not in _SIDECAR_METHODS:
            rows = 1 if method in ("serial", "prompt-lookup") else k
            record["forwards"] = len(fwd.events)
            record["tokens_per_forward"] = record["committed"] / rows / len(fwd.events) if fwd.events else None
        record.update(
            method=method,
            k=k,
            wall=end - start,
            steps=[round(s, 6) for s in steps],
            ttft=None if first is None else first - start,
            peak_mib=memory.get("peak_mib"),
            start_mib=memory.get("start_mib"),
            memory_kind=memory.get("kind"),
            sidecar=None,
        )
        if method in _SIDECAR_METHODS:
            record["sidecar"] = self.sidecar_for(k)
        else:
            record["first_visible"] = record["ttft"]
        if clock is not None and method in ("serial", "prompt-lookup"):
            record["time_to"] = {str(kk): clock.time_to(kk * tokens, start) for kk in self.config.ks}
        return record


def _configs(config: BenchConfig) -> list[tuple[str, int]]:
    out = []
    for method in config.methods:
        if method in ("serial", "prompt-lookup"):
            out.append((method, max(config.ks)))
        else:
            out += [(method, k) for k in config.ks]
    return out


def run_bench(model, sidecar_label: str, items: list[EvalItem], config: BenchConfig, progress: bool = True) -> dict:
    """Warm up, then interleave every configuration over ``repeats`` x ``items``; returns raw runs + settings."""
    if not items:
        raise ValueError("pdt bench needs at least one prompt; check --prompts / --num-prompts.")
    short = [k for k in config.ks if k > len(items[0].plan)]
    if short:
        raise ValueError(f"K={short} exceeds the plans' {len(items[0].plan)} items; load prompts with max(ks) items.")
    bench = Bench(model, sidecar_label, config)
    configs = _configs(config)
    total = len(configs) * (1 + config.repeats * len(items))
    bar = tqdm(total=total, desc="pdt bench", unit="run", disable=not progress)
    for method, k in configs:
        bar.set_postfix_str(f"warm-up {method} K={k}")
        bench.run(method, k, items[0], config.warmup_tokens)
        bar.update()
    runs = []
    for repeat in range(config.repeats):
        for p, item in enumerate(items):
            shift = (repeat * len(items) + p) % len(configs)
            for method, k in configs[shift:] + configs[:shift]:
                bar.set_postfix_str(f"repeat {repeat + 1} prompt {p + 1} {method} K={k}")
                record = bench.run(method, k, item, config.max_new_tokens)
                record.update(repeat=repeat, prompt=p)
                runs.append(record)
                bar.update()
    bar.close()
    return {
        "settings": asdict(config),
        "runs": runs,
        "prompts": [asdict(item) for item in items],
        "sidecar": sidecar_label,
        "sidecar_num_streams": model.pdt_config.num_streams,
    }
