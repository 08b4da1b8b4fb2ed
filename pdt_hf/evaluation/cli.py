"""``pdt eval`` and ``pdt bench``: argument parsing and the files they write.

``pdt eval --out DIR`` writes ``eval.json`` (everything, per prompt and per block), ``eval.md`` (tables),
``eval_metrics.png`` and ``eval_calibration.png``. ``pdt bench --out DIR`` writes ``bench.json`` (settings,
machine, raw runs and the summary rows), ``bench.md`` and ``bench.png``. Both print the markdown when done.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import time
from typing import Any

__all__ = ["add_eval_parsers", "run_bench_command", "run_eval_command"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers, e.g. 1,2,3,4,8."
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers, e.g. 1,2,3,4,8.")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces ``args`` (flags that differ from their defaults)."""
    parser: argparse.ArgumentParser = args._parser
    words = ["pdt", args.command]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        else:
            words += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(words)


def _header(kind: str, args: argparse.Namespace, machine: dict[str, Any], sidecar: str, model_name: str) -> str:
    gpu = machine["gpu"] or "none"
    return (
        f"# pdt {kind}\n\n"
        f"- command: `{_command(args)}`\n"
        f"- trunk: {model_name}; sidecar: {sidecar}\n"
        f"- machine: {machine['cpu_count']}-core CPU ({machine['cpu']}), GPU: {gpu}; torch {machine['torch']}, "
        f"transformers {machine['transformers']}, {machine['torch_threads']} torch threads\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}\n"
    )


def _set_threads(threads: str) -> int:
    """Apply ``--threads`` and return the thread count used.

    ``auto`` keeps torch's default unless the 1-minute load average is at least 0.5 (another job is running),
    then uses 1 thread: on the 2-core machine of docs/benchmarks.md, two torch threads sharing the cores with a
    training job took 51 s for a 32-token ``generate`` that one thread wrote in 1.9 s.
    """
    import torch

    if threads == "auto":
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= 0.5
        count = 1 if busy else torch.get_num_threads()
    else:
        try:
            count = int(threads)
        except ValueError:
            count = 0
        if count < 1:
            raise SystemExit(f"--threads {threads!r} must be 'auto' or a positive integer (1 when cores are shared).")
    torch.set_num_threads(count)
    return count


def _restores_threads(command):
    """``--threads`` holds for one command: the process's torch thread count is restored afterwards.

    The commands also run in-process (tests, notebooks); a thread count left behind changes the float results
    of whatever runs next (a data build resumed in the same process was not byte-identical to its first run).
    """

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        import torch

        previous = torch.get_num_threads()
        try:
            return command(args)
        finally:
            torch.set_num_threads(previous)

    return run


def _agreement_threshold(text: str | None) -> float | None:
    """``--agreement-threshold``: None keeps the sidecar's calibrated tau; else a number in [0, 1]."""
    if text is None:
        return None
    try:
        tau = float(text)
    except ValueError:
        tau = float("nan")
    if not 0.0 <= tau <= 1.0:  # also rejects nan
        raise SystemExit(
            f"--agreement-threshold {text!r} must be a number in [0, 1] (0: rollback off, e.g. 0.883 for the old "
            "calibrated head); leave it out to use the sidecar's own tau."
        )
    return tau


@_restores_threads
def run_eval_command(args: argparse.Namespace) -> int:
    """``pdt eval``: run every method, score, write JSON + markdown + PNGs under ``--out``."""
    from ..config import PDTConfig
    from .embeddings import load_sentence_encoder
    from .evaluate import evaluate
    from .prompt_sets import load_eval_items
    from .report import eval_markdown, plot_calibration, plot_eval, write_json
    from .runtime import load_model, machine_info

    label_nll: float | str = args.label_nll
    if label_nll != "auto":
        try:
            label_nll = float(label_nll)
        except ValueError:
            raise SystemExit(
                f"--label-nll {args.label_nll!r} must be 'auto' or a number of nats/token, e.g. 2.5."
            ) from None
    tau = _agreement_threshold(args.agreement_threshold)
    _set_threads(args.threads)
    items = load_eval_items(args.prompts, args.streams, args.limit)
    synthesis = "pdt-synthesis" in args.methods
    if synthesis and args.sidecar is not None:
        from ..generation.cli import check_sidecar_dir

        check_sidecar_dir(args.sidecar)
        if not PDTConfig.from_pretrained(args.sidecar).synthesis:
            raise ValueError(
                f"--methods pdt-synthesis needs a sidecar with a synthesis slot, and {args.sidecar} has none (its "
                "pdt_config.json has synthesis: false); train the synthesis stage for it (docs/training.md) or drop "
                "pdt-synthesis from --methods."
            )
    model, sidecar = load_model(
        args.model, args.sidecar, args.seed, args.dtype, num_streams=args.streams, synthesis=synthesis
    )
    if tau is not None:
        model.pdt_config.agreement_threshold = tau  # this run only; the sidecar folder is not touched
    encoder = load_sentence_encoder(args.encoder)
    result = evaluate(
        model,
        items,
        args.max_new_tokens,
        encoder,
        methods=args.methods,
        label_nll=label_nll,
        seed=args.seed,
        progress=not args.no_progress,
    )
    machine = machine_info()
    name = model.pdt_config.base_model_name_or_path or args.model
    result.update(command=_command(args), machine=machine, sidecar=sidecar, model=name)
    os.makedirs(args.out, exist_ok=True)
    header = _header("eval", args, machine, sidecar, name)
    settings = result["settings"]
    header += (
        f"- {settings['num_prompts']} prompts, K = {settings['num_streams']} streams x "
        f"{settings['max_new_tokens']} tokens (serial: K sections of N tokens, one after another), greedy, "
        f"seed {args.seed}\n\n"
    )
    write_json(result, os.path.join(args.out, "eval.json"))
    markdown = eval_markdown(result, header)
    with open(os.path.join(args.out, "eval.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    title = f"{name} + sidecar {sidecar}: {settings['num_prompts']} prompts, K={settings['num_streams']}"
    plot_eval(result, os.path.join(args.out, "eval_metrics.png"), title)
    plot_calibration(result, os.path.join(args.out, "eval_calibration.png"), title)
    print(markdown)
    print(f"wrote {args.out}/eval.json, eval.md, eval_metrics.png, eval_calibration.png")
    return 0


@_restores_threads
def run_bench_command(args: argparse.Namespace) -> int:
    """``pdt bench``: time every method, write JSON + markdown + PNG under ``--out``."""
    from .bench import BenchConfig, run_bench
    from .bench_report import bench_markdown, plot_bench, summarize_bench
    from .prompt_sets import load_eval_items
    from .report import write_json
    from .runtime import load_model, machine_info

    config = BenchConfig(
        ks=args.ks,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        warmup_tokens=args.warmup_tokens,
        prompt_lookup_num_tokens=args.prompt_lookup_num_tokens,
        num_speculative_tokens=args.num_speculative_tokens,
        seed=args.seed,
        methods=args.methods,
    )
    _set_threads(args.threads)
    items = load_eval_items(args.prompts, max(config.ks), args.num_prompts)
    model, sidecar = load_model(args.model, args.sidecar, args.seed, args.dtype)
    raw = run_bench(model, sidecar, items, config, progress=not args.no_progress)
    rows = summarize_bench(raw)
    machine = machine_info()
    name = model.pdt_config.base_model_name_or_path or args.model
    header = _header("bench", args, machine, sidecar, name)
    header += (
        f"- {len(items)} prompts x {config.repeats} repeats, interleaved, after warm-up; K streams x "
        f"{config.max_new_tokens} tokens each, EOS suppressed; medians [min–max over runs]\n\n"
    )
    raw.update(rows=rows, machine=machine, command=_command(args), model=name)
    os.makedirs(args.out, exist_ok=True)
    write_json(raw, os.path.join(args.out, "bench.json"))
    markdown = bench_markdown(rows, header)
    with open(os.path.join(args.out, "bench.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    plot_bench(
        rows,
        os.path.join(args.out, "bench.png"),
        f"{name}, {machine['cpu_count']}-core {machine['device'].upper()}, N={config.max_new_tokens}/stream",
    )
    print(markdown)
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts",
        default=None,
        help="prompt file (.txt one a line, .jsonl with 'prompt' and optional 'plan') or a data set "
        "folder (its test split); default: the test split of the shipped prompts",
    )
    p.add_argument("--model", default=None, help="trunk id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sidecar", default=None, help="sidecar folder (default: the shipped one for SmolLM2, if any)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="trunk dtype")
    p.add_argument("--seed", type=int, default=0, help="seeds an untrained sidecar, sampling and the bootstrap")
    p.add_argument(
        "--threads",
        default="auto",
        help="torch intra-op threads, or 'auto': torch's default on an idle machine, 1 when the load "
        "average shows other jobs on the cores (oversubscribed threads stall each other)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_eval_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pdt eval`` and ``pdt bench``."""
    from ..generation.speculate import DEFAULT_SPECULATIVE_TOKENS
    from .baselines import DEFAULT_EVAL_METHODS, EVAL_METHODS
    from .bench import BENCH_METHODS

    p = subparsers.add_parser("eval", help="compare serial, Skeleton-of-Thought, PDT and its ablations on prompts")
    _common(p)
    p.add_argument("--limit", type=int, default=10, help="number of prompts (the first ones of the set)")
    p.add_argument("--streams", type=int, default=3, help="K, sections per answer (one stream each)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="N, tokens per stream (serial: per section)")
    p.add_argument(
        "--methods",
        type=_name_list,
        default=list(DEFAULT_EVAL_METHODS),
        help=f"comma-separated subset of {','.join(EVAL_METHODS)} (default: all but pdt-synthesis, which needs a "
        "sidecar with a synthesis slot and adds the conclusion comparison)",
    )
    p.add_argument(
        "--label-nll",
        default="auto",
        help="agreement label threshold, nats/token, or 'auto' (90th percentile of serial blocks)",
    )
    p.add_argument(
        "--agreement-threshold",
        default=None,
        help="tau for this run, overriding the sidecar's pdt_config.json (0: rollback off); measures what "
        "rollback does to quality, pdt against pdt-no-rollback, when the calibrated tau is 0",
    )
    p.add_argument("--encoder", default=None, help="sentence-transformers model (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--out", default="outputs/eval", help="output folder")
    p.set_defaults(func=run_eval_command, _parser=p)

    b = subparsers.add_parser("bench", help="wall clock of serial, batched, prompt-lookup and PDT decoding")
    _common(b)
    b.add_argument("--num-prompts", type=int, default=2, help="prompts timed (each repeat runs all of them)")
    b.add_argument("--ks", type=_int_list, default=[1, 2, 3, 4, 8], help="stream counts K, comma-separated")
    b.add_argument("--max-new-tokens", type=int, default=16, help="N, tokens per stream (serial: K x N)")
    b.add_argument("--repeats", type=int, default=3, help="timed repeats of every configuration")
    b.add_argument("--warmup-tokens", type=int, default=4, help="tokens per stream of the untimed warm-up pass")
    b.add_argument("--prompt-lookup-num-tokens", type=int, default=10, help="draft length of prompt lookup")
    b.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=DEFAULT_SPECULATIVE_TOKENS,
        help="n, draft tokens per stream and forward of pdt-speculate (prompt lookup inside the streams)",
    )
    b.add_argument(
        "--methods",
        type=_name_list,
        default=list(BENCH_METHODS),
        help=f"comma-separated subset of {','.join(BENCH_METHODS)}",
    )
    b.add_argument("--out", default="outputs/bench", help="output folder")
    b.set_defaults(func=run_bench_command, _parser=b)
