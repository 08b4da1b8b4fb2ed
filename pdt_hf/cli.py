"""The ``pdt`` command (``budget``, ``generate``, ``data``, ``eval``, ``bench``, ``calibrate-rollback``); each
subcommand lives with the code it drives.

Bad input surfaces as a ``ValueError`` or ``OSError`` whose message names the
value and the fix; :func:`main` prints that message (and the first line of a
chained cause) to stderr and exits 2, as argparse does for bad flags, instead
of a traceback. ``PDT_TRACEBACK=1`` re-raises for a full traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _budget(args: argparse.Namespace) -> int:
    from .budget import meta_budget, print_budget
    from .modeling import PDTForCausalLM, parameter_budget

    rows = {}
    for name in args.trunk_size or []:
        rows[name] = meta_budget(name)
    if args.model is not None or not rows:
        model = PDTForCausalLM.from_pretrained(args.model)
        rows[args.model or "embedded SmolLM2-135M-Instruct"] = parameter_budget(model.sidecar, model.trunk)
    print_budget(rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdt", description="Parallel Decoder Transformer sidecars for HF causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    budget = sub.add_parser("budget", help="print the sidecar's parameter count and its share of the trunk")
    budget.add_argument("--model", default=None, help="trunk id or path (default: the embedded SmolLM2)")
    budget.add_argument(
        "--trunk-size",
        action="append",
        choices=["smollm2-135m", "qwen2.5-7b"],
        help="also count on a trunk of this published size, built on the meta device (repeatable)",
    )
    budget.set_defaults(func=_budget)

    from .evaluation.cli import add_eval_parsers
    from .generation.cli import add_generate_parser
    from .training.cli import add_data_parser
    from .training.rollback_cli import add_calibrate_rollback_parser

    add_generate_parser(sub)
    add_data_parser(sub)
    add_eval_parsers(sub)
    add_calibrate_rollback_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        if os.environ.get("PDT_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"pdt {args.command}: error: {err}", file=sys.stderr)
        cause = err.__cause__
        if cause is not None and str(cause).strip():
            print(f"  caused by {type(cause).__name__}: {str(cause).strip().splitlines()[0]}", file=sys.stderr)
        print("  (set PDT_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
