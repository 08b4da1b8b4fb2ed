"""``pdt generate``: a live terminal view with one panel per stream, then the answer and a summary line."""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources

from rich.columns import Columns
from rich.console import Console
from rich.live import Live
from rich.panel import Panel

from .streamer import MultiStreamStreamer

SHIPPED_SIDECAR = "sidecar-smollm2-135m"


def shipped_sidecar() -> str | None:
    """Directory of the sidecar trained for the embedded SmolLM2, if this install ships one."""
    path = resources.files("pdt_hf") / "resources" / SHIPPED_SIDECAR
    return str(path) if (path / "sidecar.safetensors").is_file() and (path / "pdt_config.json").is_file() else None


class LivePanels(MultiStreamStreamer):
    """Renders committed text per stream in side-by-side panels; rollbacks show as a counter."""

    def __init__(self, plan: list[str], live: Live) -> None:
        self.plan, self.live = plan, live
        self.texts = ["" for _ in plan]
        self.rollbacks = [0 for _ in plan]

    def render(self) -> Columns:
        panels = [
            Panel(text or "…", title=f"[{k}] {item}", subtitle=f"rollbacks: {self.rollbacks[k]}", width=40)
            for k, (item, text) in enumerate(zip(self.plan, self.texts))
        ]
        return Columns(panels)

    def on_text(self, stream: int, text: str, round: int) -> None:
        self.texts[stream] += text
        self.live.update(self.render())

    def on_rollback(self, stream: int, tokens: int, round: int) -> None:
        self.rollbacks[stream] += 1
        self.live.update(self.render())


def run_generate(args: argparse.Namespace) -> int:
    try:
        return _run_generate(args)
    except KeyboardInterrupt:
        Console().print("[yellow]Interrupted before generation started; nothing was committed.[/yellow]")
        return 130


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from ..modeling import PDTForCausalLM
    from .plan import normalise_plan, skeleton_plan

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
    start = time.perf_counter()
    model = PDTForCausalLM.from_pretrained(args.model, sidecar=sidecar)
    model.eval()
    console.print(
        f"loaded {model.pdt_config.base_model_name_or_path} in {time.perf_counter() - start:.1f}s; "
        f"sidecar {model.sidecar_budget()['sidecar']:,} parameters "
        f"({100 * model.sidecar_budget()['share']:.2f}% of the trunk)"
    )
    k = args.streams or model.pdt_config.num_streams
    if args.plan:
        plan = normalise_plan(args.plan)
    else:
        plan = skeleton_plan(model.trunk, model.tokenizer, args.prompt, k)
    k = min(k, len(plan)) if not args.streams else k
    plan = plan[:k] if len(plan) >= k else plan
    with Live(console=console, refresh_per_second=8, transient=False) as live:
        view = LivePanels(plan, live)
        live.update(view.render())
        output = model.generate(
            prompt=args.prompt,
            plan=plan,
            num_streams=k,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature or 1.0,
            seed=args.seed,
            streamer=view,
        )
    t = output.telemetry
    if t.interrupted:
        console.print("[yellow]Interrupted: showing what was committed so far.[/yellow]")
    console.rule("answer")
    for item, text in zip(plan, output.texts):
        console.print(f"[bold]{item}[/bold]\n{text}\n")
    tokens = sum(len(s) for s in output.sequences)
    seconds = t.timings.get("total", 0.0)
    console.print(
        f"{tokens} tokens in {seconds:.1f}s ({tokens / max(seconds, 1e-9):.1f} tokens/s), "
        f"{len(t.rollbacks)} rollbacks ({t.rolled_back_tokens} tokens), {k} streams"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "prompt": args.prompt,
                    "plan": plan,
                    "texts": output.texts,
                    "answer": output.answer,
                    "sequences": output.sequences,
                    "finish_reasons": output.finish_reasons,
                    "telemetry": t.to_dict(),
                },
                handle,
                indent=2,
            )
    torch.set_grad_enabled(True)
    return 130 if t.interrupted else 0


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="write K sections of one answer in parallel")
    p.add_argument("prompt", help="the request to answer")
    p.add_argument("--streams", type=int, default=None, help="K, number of parallel streams (default: the sidecar's)")
    p.add_argument("--plan", default=None, help='section prompts separated by ";" (default: the trunk outlines)')
    p.add_argument("--model", default=None, help="trunk id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sidecar", default=None, help="sidecar directory (default: the shipped one for SmolLM2)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="tokens per stream")
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the output and telemetry to this JSON file")
    p.set_defaults(func=run_generate)
