"""Where a decode step's time goes: ``torch.profiler`` regions of one K-stream step, HF batch vs PDT.

``python -m pdt_hf.evaluation.step_profile [--tiny] [--ks 3,8] [--tokens 16] [--threads 1]`` runs one
``pdt bench`` call per (method, K) under ``torch.profiler`` and prints a markdown table of milliseconds per
step by region, then the heaviest aten operators. ``--cpu-repeats N`` instead times N interleaved repeats of
the bench calls in thread CPU time. The tables of docs/benchmarks.md ("Decode step") come from it.

Design decisions:
- Regions are ``record_function`` labels installed by wrapping the callables a step passes through, for the
  duration of the profile only (the library carries no profiling code): the trunk's decoder stack, each
  decoder layer's own ``forward`` (so the sidecar hook, which runs after it, is a region of its own), the
  cache update and attention inside it, the trunk's mask factory, the LM head, and on the PDT side the
  decode loop's per-step work (token choice, bus read, cache step planning).
- Only work after the first one-token forward counts, divided by the number of step forwards, so prompt
  prefills are left out; "outside the forward" is the step's wall time minus the trunk forward (sampling,
  processors, bookkeeping: HF ``generate``'s loop or PDT's decode loop).
- The profiler adds a few microseconds per operator, which inflates regions made of many small operators
  (the sidecar, bookkeeping) more than matmul-heavy ones; the unprofiled step p50 of the same call is shown
  beside it. ``--tiny`` swaps the trunk for a 2-layer, hidden-64 Llama with the same tokenizer, where such
  overheads dominate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..trunk.architectures import base_model, decoder_layers

__all__ = ["profile_step", "step_regions"]

_STEP = "trunk forward (T=1)"


@contextmanager
def _wrapped(owner: object, name: str, label: str) -> Iterator[None]:
    """Replace ``owner.name`` by a wrapper running it inside ``record_function(label)``; restore on exit."""
    had_own = name in vars(owner) if hasattr(owner, "__dict__") else False
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        with record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _step_forward(module: torch.nn.Module) -> Callable[..., object]:
    original = module.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        label = _STEP if ids is not None and ids.shape[-1] == 1 else "trunk forward (prefill)"
        with record_function(label):
            return original(*args, **kwargs)

    return forward


_DECODE_REGIONS = (
    ("pdt_hf.stream_kv.cache", "StreamKVCache", "begin_step", "PDT cache step (positions, mask)"),
    ("pdt_hf.sidecars.model", "PDTSidecar", "layer_delta", "sidecar hooks (adapter + SNC)"),
    ("pdt_hf.sidecars.decode_step", "SidecarDecodeStep", "layer_delta", "sidecar hooks (adapter + SNC)"),
    ("pdt_hf.generation.decode", "MultiStreamDecoder", "_stop_reason", "PDT token choice + stop checks"),
    ("pdt_hf.generation.sampling", "TokenChooser", "choose", "PDT token choice + stop checks"),
    ("pdt_hf.generation.step", "StepRunner", "choose", "PDT token choice + stop checks"),
    ("pdt_hf.bus.note_bus", "NoteBus", "read", "PDT notes (bus read, binding)"),
    ("pdt_hf.generation.step", "StepRunner", "notes", "PDT notes (bus read, binding)"),
)
"""(module, class, method, label) of the decode loop; entries missing from the installed version are skipped,
so the same script profiles an older checkout (the "before" figures of docs/benchmarks.md)."""


@contextmanager
def step_regions(model) -> Iterator[None]:
    """Install the profile regions on a ``PDTForCausalLM``'s trunk and the decode classes for the block."""
    import importlib

    from transformers.cache_utils import DynamicLayer

    from ..stream_kv.cache import StreamKVLayer

    trunk = model.trunk
    modeling = sys.modules[type(decoder_layers(trunk)[0]).__module__]
    stack = base_model(trunk)
    with ExitStack() as regions:
        regions.callback(lambda: vars(stack).pop("forward", None))
        stack.forward = _step_forward(stack)
        for layer in decoder_layers(trunk):
            regions.enter_context(_wrapped(layer, "forward", "decoder layer (trunk)"))
            regions.enter_context(_wrapped(layer.self_attn, "forward", "self-attention"))
        regions.enter_context(_wrapped(trunk.lm_head, "forward", "LM head"))
        if hasattr(stack, "norm"):
            regions.enter_context(_wrapped(stack.norm, "forward", "final norm"))
        if hasattr(modeling, "create_causal_mask"):
            regions.enter_context(_wrapped(modeling, "create_causal_mask", "mask factory (trunk)"))
        for cls in (DynamicLayer, StreamKVLayer):
            regions.enter_context(_wrapped(cls, "update", "KV cache update"))
        for module, owner, name, label in _DECODE_REGIONS:
            try:
                cls = getattr(importlib.import_module(module), owner)
            except (ImportError, AttributeError):
                continue
            if hasattr(cls, name):
                regions.enter_context(_wrapped(cls, name, label))
        yield


def _region_table(prof, wall_steps: list[float]) -> tuple[dict[str, float], list[tuple[str, float]], int]:
    events = prof.events()
    starts = sorted(e.time_range.start for e in events if e.name == _STEP)
    if not starts:
        return {}, [], 0
    first = starts[0]
    per: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    ends: dict[str, float] = defaultdict(float)  # a region nested in one of the same label counts once
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.time_range.start < first:
            continue
        if e.name.startswith("aten::"):
            ops[e.name] += e.self_cpu_time_total
        elif e.time_range.start >= ends[e.name]:
            per[e.name] += e.time_range.elapsed_us()
            ends[e.name] = e.time_range.end
    n = len(starts)
    table = {name: us / n / 1000 for name, us in per.items()}
    top = sorted(((name, us / n / 1000) for name, us in ops.items()), key=lambda x: -x[1])[:12]
    return table, top, n


def profile_step(bench, method: str, k: int, item, tokens: int) -> dict:
    """One profiled ``Bench.run`` plus an unprofiled one: per-step region ms, top aten ops, step p50s."""
    plain = bench.run(method, k, item, tokens)
    with step_regions(bench.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        profiled = bench.run(method, k, item, tokens)
        wall = time.perf_counter() - start
    table, top, n = _region_table(prof, profiled["steps"])
    step_ms = statistics.median(profiled["steps"]) * 1000 if profiled["steps"] else float("nan")
    table["step (profiled, p50)"] = step_ms
    table["outside the trunk forward"] = sum(profiled["steps"]) * 1000 / max(1, n) - table.get(_STEP, 0.0)
    return {
        "method": method,
        "k": k,
        "steps": n,
        "wall": wall,
        "plain_step_p50_ms": statistics.median(plain["steps"]) * 1000,
        "regions": table,
        "top_ops": top,
    }


_ORDER = (
    ("step (unprofiled, p50)", None),
    ("step (profiled, p50)", None),
    (_STEP, None),
    ("decoder layer (trunk)", "  "),
    ("self-attention", "    "),
    ("KV cache update", "      "),
    ("sidecar hooks (adapter + SNC)", "  "),
    ("mask factory (trunk)", "  "),
    ("final norm", "  "),
    ("outside the trunk forward", None),
    ("LM head", "  "),
    ("PDT token choice + stop checks", "  "),
    ("PDT notes (bus read, binding)", "  "),
    ("PDT cache step (positions, mask)", "  "),
)


def markdown(results: list[dict]) -> str:
    """Regions as rows, (method, K) as columns, ms per step."""
    head = "| ms per step | " + " | ".join(f"{r['method']} K={r['k']}" for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for name, indent in _ORDER:
        cells = []
        for r in results:
            value = r["plain_step_p50_ms"] if name == "step (unprofiled, p50)" else r["regions"].get(name)
            cells.append("–" if value is None else f"{value:.2f}")
        if any(c != "–" for c in cells):
            label = name if indent is None else "&nbsp;" * len(indent) * 2 + "of which " + name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    for r in results:
        ops = ", ".join(f"{name.removeprefix('aten::')} {ms:.2f}" for name, ms in r["top_ops"][:8])
        out += f"\n- {r['method']} K={r['k']} top aten ops (self ms/step): {ops}"
    return out + "\n"


def _tiny_model():
    import transformers

    from ..config import PDTConfig
    from ..modeling import PDTForCausalLM
    from ..trunk.loading import load_tokenizer

    tok = load_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    trunk = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    trunk.generation_config.eos_token_id = tok.eos_token_id
    trunk.generation_config.pad_token_id = tok.pad_token_id
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=3))
    model.tokenizer = tok
    return model.eval(), "untrained"


def main(argv: list[str] | None = None) -> int:
    from .bench import Bench, BenchConfig
    from .prompt_sets import load_eval_items
    from .runtime import load_model, machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer hidden-64 Llama instead of the embedded SmolLM2")
    p.add_argument("--ks", default="3,8", help="stream counts")
    p.add_argument("--tokens", type=int, default=16, help="tokens per stream")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--methods", default="hf-batch,pdt-no-rollback", help="bench methods to profile")
    p.add_argument("--repeats", type=int, default=3, help="profiled runs per (method, K); medians are shown")
    p.add_argument(
        "--cpu-repeats",
        type=int,
        default=0,
        help="instead of profiling: time N interleaved repeats over 2 prompts in thread CPU time (a shared machine)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(x) for x in args.ks.split(",")]
    methods = args.methods.split(",")
    model, label = _tiny_model() if args.tiny else load_model(None, None)
    items = load_eval_items(None, max(ks), 1)
    bench = Bench(model, label, BenchConfig(ks=ks, methods=methods, max_new_tokens=args.tokens))
    for method in methods:  # warm-up
        for k in ks:
            bench.run(method, k, items[0], 4)
    info = machine_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, {args.threads} thread(s), load {load:.2f}\n"
    )
    if args.cpu_repeats:
        items = load_eval_items(None, max(ks), 2)
        print(cpu_time_markdown(cpu_time_steps(bench, methods, ks, items, args.tokens, args.cpu_repeats)))
        return 0
    runs: dict[tuple[str, int], list[dict]] = {(m, k): [] for k in ks for m in methods}
    for _ in range(args.repeats):  # interleaved, so drifting load spreads over every column
        for method, k in runs:
            runs[(method, k)].append(profile_step(bench, method, k, items[0], args.tokens))
    print(markdown([merge_runs(r) for r in runs.values()]))
    return 0


def merge_runs(results: list[dict]) -> dict:
    """Medians over repeated ``profile_step`` results of one (method, K): every region, the step p50, the ops."""
    regions = {name for r in results for name in r["regions"]}
    ops = {name for r in results for name, _ in r["top_ops"]}
    return {
        **results[0],
        "plain_step_p50_ms": statistics.median(r["plain_step_p50_ms"] for r in results),
        "regions": {n: statistics.median(r["regions"].get(n, 0.0) for r in results) for n in regions},
        "top_ops": sorted(
            ((n, statistics.median(dict(r["top_ops"]).get(n, 0.0) for r in results)) for n in ops), key=lambda x: -x[1]
        )[:12],
        "repeats": len(results),
    }


@contextmanager
def _thread_clock() -> Iterator[None]:
    """Inside the block ``time.perf_counter`` (which the bench clocks read) is this thread's CPU time."""
    wall = time.perf_counter
    time.perf_counter = time.thread_time
    try:
        yield
    finally:
        time.perf_counter = wall


def cpu_time_steps(bench, methods: list[str], ks: list[int], items, tokens: int, repeats: int) -> dict:
    """Step lists in thread CPU seconds per (method, K), runs interleaved and their order alternated per repeat.

    On a shared machine wall time also counts the seconds another job held the core; CPU time of the decoding
    thread (one torch thread) does not, so method ratios stay readable when the load average is high.
    """
    steps: dict[tuple[str, int], list[float]] = {(m, k): [] for m in methods for k in ks}
    with _thread_clock():
        for repeat in range(repeats):
            for item in items:
                for k in ks:
                    for method in methods if repeat % 2 == 0 else methods[::-1]:
                        steps[(method, k)] += bench.run(method, k, item, tokens)["steps"]
    return steps


def cpu_time_markdown(steps: dict) -> str:
    ks = sorted({k for _, k in steps})
    methods = list(dict.fromkeys(m for m, _ in steps))
    lines = [
        "| K | " + " | ".join(f"{m} step p50 ms (CPU)" for m in methods) + " | ratio |",
        "|---|" + "---:|" * (len(methods) + 1),
    ]
    for k in ks:
        p50 = [statistics.median(steps[(m, k)]) * 1000 for m in methods]
        lines.append(f"| {k} | " + " | ".join(f"{x:.1f}" for x in p50) + f" | {p50[-1] / p50[0]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
