"""``pdt generate``: a live terminal view with one panel per stream, then the answer and a summary line.

Every argument is checked before the trunk loads (a load takes seconds):
flag values, the plan against ``--streams``, the sidecar directory and the
``--json`` destination; what needs the trunk (prompt length against its
context, K against the sidecar) is checked by ``generate`` before any compute.
Bad input ends in one message naming the value and the fix (``pdt_hf.cli``
prints it), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from importlib import resources

from rich.columns import Columns
from rich.console import Console
from rich.live import Live
from rich.panel import Panel

from .prompts import SYNTHESIS_HEADING
from .speculate import DEFAULT_SPECULATIVE_TOKENS
from .streamer import MultiStreamStreamer
from .synthesis import DEFAULT_SYNTHESIS_TOKENS

SHIPPED_SIDECAR = "sidecar-smollm2-135m"


def shipped_sidecar() -> str | None:
    """Directory of the sidecar trained for the embedded SmolLM2, if this install ships one."""
    path = resources.files("pdt_hf") / "resources" / SHIPPED_SIDECAR
    return str(path) if (path / "sidecar.safetensors").is_file() and (path / "pdt_config.json").is_file() else None


class LivePanels(MultiStreamStreamer):
    """Renders committed text per stream in side-by-side panels; rollbacks show as a counter.

    Without a plan (the trunk writes the outline inside ``generate``) panels appear as streams commit text.
    """

    def __init__(self, plan: list[str] | None, live: Live) -> None:
        self.plan, self.live = plan, live
        self.texts: dict[int, str] = {k: "" for k in range(len(plan or []))}
        self.rollbacks: dict[int, int] = {}

    def render(self) -> Columns | str:
        if not self.texts:
            return "writing the outline…"
        panels = [
            Panel(
                self.texts.get(k) or "…",
                title=f"[{k}] {self._title(k)}",
                subtitle=f"rollbacks: {self.rollbacks.get(k, 0)}",
                width=40,
            )
            for k in range(max(self.texts) + 1)
        ]
        return Columns(panels)

    def _title(self, k: int) -> str:
        if self.plan and k < len(self.plan):
            return self.plan[k]
        return SYNTHESIS_HEADING if self.plan and k == len(self.plan) else "section"

    def on_text(self, stream: int, text: str, round: int) -> None:
        self.texts[stream] = self.texts.get(stream, "") + text
        self.live.update(self.render())

    def on_rollback(self, stream: int, tokens: int, round: int) -> None:
        self.rollbacks[stream] = self.rollbacks.get(stream, 0) + 1
        self.texts.setdefault(stream, "")
        self.live.update(self.render())


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (0 for greedy), got {text!r}")
    return value


def check_sidecar_dir(path: str) -> None:
    """A ``--sidecar`` directory must exist and hold ``pdt_config.json`` and ``sidecar.safetensors``."""
    from ..checkpoint import WEIGHTS_NAME
    from ..config import CONFIG_NAME

    fix = "pass a directory written by PDTForCausalLM.save_pretrained, or omit --sidecar"
    if not os.path.isdir(path):
        what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(f"--sidecar {path!r} {what} ({os.path.abspath(path)}); {fix}.")
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise FileNotFoundError(
            f"--sidecar {path!r} is not a complete sidecar directory: it lacks {', '.join(missing)} "
            f"(it holds {sorted(os.listdir(path))[:8]}); {fix}."
        )


def check_json_path(path: str) -> None:
    """``--json`` must name a file whose folder exists and is writable, or can be created."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(
            f"--json {path!r} is a directory; give a file name, e.g. {os.path.join(path, 'out.json')}."
        )
    folder = os.path.dirname(target)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(
            f"--json {path!r} cannot be written: {folder} is a file, not a folder; pick another path."
        )
    if not os.access(folder, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise PermissionError(
            f"--json {path!r} cannot be written: no write permission in {folder}; pick another path."
        )


def check_arguments(args: argparse.Namespace) -> list[str] | None:
    """Everything checkable before the trunk loads; returns the normalised plan (None: the trunk outlines)."""
    from .plan import check_candidates, normalise_plan, streams_for_plan

    if not args.prompt.strip():
        raise ValueError(
            'the prompt is empty; give the request to answer, e.g. pdt generate "Explain how tides work."'
        )
    plan = None
    if args.plan is not None:
        plan = normalise_plan(args.plan)
        if args.candidates is None:
            streams_for_plan(plan, args.streams, streams_name="--streams", plan_name="--plan")
    if args.candidates is not None:
        check_candidates(
            args.candidates,
            args.streams,
            plan,
            candidates_name="--candidates",
            streams_name="--streams",
            plan_name="--plan",
        )
    if args.sidecar is not None:
        check_sidecar_dir(args.sidecar)
    if args.json is not None:
        check_json_path(args.json)
    check_speculative_flags(args)
    check_synthesis_flags(args)
    return plan


def check_synthesis_flags(args: argparse.Namespace, sidecar: str | None = None) -> None:
    """``--synthesis-max-new-tokens`` needs ``--synthesis``; ``--synthesis`` needs a sidecar with the slot.

    ``sidecar`` is the directory that will load (``--sidecar`` or the shipped one); None checks only the flags.
    """
    if not args.synthesis and args.synthesis_max_new_tokens is not None:
        raise ValueError(
            f"--synthesis-max-new-tokens {args.synthesis_max_new_tokens} is only used by the synthesis stream: add "
            "--synthesis or drop it."
        )
    if args.synthesis and sidecar is not None:
        from ..config import PDTConfig

        if not PDTConfig.from_pretrained(sidecar).synthesis:
            raise ValueError(
                f"--synthesis needs a sidecar with a synthesis slot, and {sidecar} has none (its pdt_config.json "
                "has synthesis: false). Train the synthesis stage for it (docs/training.md: `pdt data synthesis`, "
                "then recipes/train.py with pdt.synthesis: true and a synthesis stage) and pass --sidecar DIR, or "
                "drop --synthesis."
            )


def check_speculative_flags(args: argparse.Namespace) -> None:
    """``--num-speculative-tokens`` and ``--draft-model`` need the ``--speculate`` mode that uses them."""
    if args.speculate is None and args.num_speculative_tokens is not None:
        raise ValueError(
            f"--num-speculative-tokens {args.num_speculative_tokens} needs speculative decoding on: add "
            "--speculate prompt-lookup (or --speculate draft --draft-model ID)."
        )
    if args.speculate == "draft" and args.draft_model is None:
        raise ValueError(
            "--speculate draft needs --draft-model ID_OR_PATH (a small model sharing the trunk's vocabulary); "
            "or use --speculate prompt-lookup, which needs none."
        )
    if args.draft_model is not None and args.speculate != "draft":
        raise ValueError(f"--draft-model {args.draft_model!r} is only used with --speculate draft; add it or drop it.")


def rollback_mode(tau: float) -> str:
    """The line ``pdt generate`` prints about rollback: on with the sidecar's tau, or off (tau = 0)."""
    if tau <= 0.0:
        return (
            "rollback off (agreement_threshold = 0: calibration found the agreement head's rollbacks do not pay "
            "on this trunk); every block commits"
        )
    return f"rollback on: a block whose agreement score is below tau = {tau:.3f} is regenerated"


def run_generate(args: argparse.Namespace) -> int:
    try:
        return _run_generate(args)
    except KeyboardInterrupt:
        Console().print("[yellow]Interrupted before generation started; nothing was committed.[/yellow]")
        return 130


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from ..config import PDTConfig
    from ..modeling import PDTForCausalLM

    plan = check_arguments(args)
    console = Console()
    sidecar = args.sidecar
    if sidecar is None and args.model is None:
        sidecar = shipped_sidecar()
    if sidecar is not None and args.sidecar is None:
        console.print(f"using the trained sidecar shipped for the embedded SmolLM2 ({sidecar})")
    if sidecar is None:
        console.print(
            "[yellow]No trained sidecar given: the sidecar is untrained (identity), so the streams are "
            "plain parallel decoding with no learned coordination.[/yellow]"
        )
    check_synthesis_flags(args, sidecar)
    start = time.perf_counter()
    fresh = PDTConfig(synthesis=True) if args.synthesis and sidecar is None else None
    model = PDTForCausalLM.from_pretrained(args.model, sidecar=sidecar, config=fresh)
    model.eval()
    console.print(
        f"loaded {model.pdt_config.base_model_name_or_path} in {time.perf_counter() - start:.1f}s; "
        f"sidecar {model.sidecar_budget()['sidecar']:,} parameters "
        f"({100 * model.sidecar_budget()['share']:.2f}% of the trunk)"
    )
    console.print(rollback_mode(model.pdt_config.agreement_threshold))
    draft_model = None
    if args.draft_model is not None:
        from ..trunk.loading import load_trunk

        draft_model = load_trunk(args.draft_model)[0].to(model.trunk.device).eval()
    if args.speculate is not None:
        n = args.num_speculative_tokens or DEFAULT_SPECULATIVE_TOKENS
        console.print(f"speculative decoding: {args.speculate}, up to {n} draft tokens per stream and forward")
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        view = LivePanels(plan if args.candidates is None else None, live)  # selected titles are known later
        live.update(view.render())
        try:
            output = model.generate(
                prompt=args.prompt,
                plan=plan,
                num_streams=args.streams,
                plan_candidates=args.candidates,
                block_size=args.block_size,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature or 1.0,
                seed=args.seed,
                streamer=view,
                speculate=args.speculate,
                num_speculative_tokens=args.num_speculative_tokens,
                draft_model=draft_model,
                synthesis=args.synthesis,
                synthesis_max_new_tokens=args.synthesis_max_new_tokens,
            )
        except (ValueError, OSError):
            live.transient = True  # refused before any text: clear the empty panels, leave only the message
            raise
    t, plan = output.telemetry, output.plan
    if args.plan is None:
        console.print(f"plan written by the trunk ({len(plan)} sections): {'; '.join(plan)}")
    if t.selection is not None:
        dropped = [f"{c['item']} ({c['reason']})" for c in t.selection["candidates"] if not c["kept"]]
        console.print(
            f"selected {len(plan)} of {t.selection['num_candidates']} candidates: {'; '.join(plan)}; "
            f"dropped: {'; '.join(dropped) or 'none'}"
        )
    if t.interrupted:
        console.print("[yellow]Interrupted: showing what was committed so far.[/yellow]")
    console.rule("answer")
    for item, text in zip(plan, output.texts):
        console.print(f"[bold]{item}[/bold]\n{text}\n")
    if output.synthesis is not None:
        console.print(
            f"[bold]{SYNTHESIS_HEADING} (synthesis stream, read the notes only)[/bold]\n{output.synthesis}\n"
        )
    console.print(f"{t.summary()}, {len(plan)} streams")
    if args.json:
        record = {
            "prompt": args.prompt,
            "plan": plan,
            "texts": output.texts,
            "answer": output.answer,
            "sequences": output.sequences,
            "finish_reasons": output.finish_reasons,
            "synthesis": output.synthesis,
            "synthesis_ids": output.synthesis_ids,
            "telemetry": t.to_dict(),
        }
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2)
        except OSError as err:
            raise OSError(
                f"--json {args.json!r} could not be written ({err}); the answer above was not saved."
            ) from err
    torch.set_grad_enabled(True)
    return 130 if t.interrupted else 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="write K sections of one answer in parallel",
        description="Write K sections of one answer in parallel. Plan and streams: with --plan, K is the number "
        "of plan items (--streams, if given, must equal it; items are never dropped). Without --plan, the trunk "
        "first writes an outline of --streams sections (default: the sidecar's num_streams). The longest stream "
        "prompt (request + plan) plus --max-new-tokens must fit the trunk's context (max_position_embeddings).",
    )
    p.add_argument("prompt", help="the request to answer")
    p.add_argument(
        "--streams",
        type=positive_int,
        default=None,
        help="K, number of parallel streams, 1 to the sidecar's num_streams (default: one per --plan item; "
        "without --plan, the sidecar's num_streams). With --plan it must equal the number of items.",
    )
    p.add_argument(
        "--plan",
        default=None,
        help='section prompts separated by ";", one stream each, no empty items (default: the trunk writes an '
        "outline of --streams sections first)",
    )
    p.add_argument(
        "--candidates",
        type=positive_int,
        default=None,
        help="M, stream selection: score M >= K candidate sections (--plan of M items, or an outline of M by the "
        "trunk) and decode the K best non-redundant ones (default: no selection)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="trunk: a local model directory or a Hugging Face Hub id (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--sidecar", default=None, help="sidecar directory (default: the shipped one for SmolLM2)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=96,
        help="tokens per stream; prompt + plan + these must fit the trunk's context",
    )
    p.add_argument(
        "--block-size", type=positive_int, default=None, help="B, tokens per block (default: the sidecar's)"
    )
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 for greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--speculate",
        choices=["prompt-lookup", "draft"],
        default=None,
        help="speculative decoding inside the streams: each stream drafts tokens (prompt-lookup: n-gram lookup in "
        "its own prompt and text; draft: --draft-model) and all streams verify them in one forward; greedy "
        "output is unchanged (default: off)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=positive_int,
        default=None,
        help="n, most draft tokens per stream and forward, never past the block's end "
        f"(default: {DEFAULT_SPECULATIVE_TOKENS})",
    )
    p.add_argument(
        "--draft-model", default=None, help="with --speculate draft: a small model sharing the trunk's vocabulary"
    )
    p.add_argument(
        "--synthesis",
        action="store_true",
        help="after the sections, one more stream reads every stream's notes (no section text) and writes a "
        "conclusion that ties them together, appended to the answer; needs a sidecar trained with the synthesis "
        "stage (default: off)",
    )
    p.add_argument(
        "--synthesis-max-new-tokens",
        type=positive_int,
        default=None,
        help=f"with --synthesis: most tokens of the conclusion (default: {DEFAULT_SYNTHESIS_TOKENS})",
    )
    p.add_argument("--json", default=None, help="also write the output and telemetry to this JSON file")
    p.set_defaults(func=run_generate)
