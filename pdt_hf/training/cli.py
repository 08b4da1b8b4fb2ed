"""``pdt data build --config recipe.yaml [key=value ...]``: build the distillation data set of a recipe.

``pdt data ceiling --config recipe.yaml``: the three-teacher measurement (``data/ceiling.py``).

``pdt data synthesis --config recipe.yaml``: add the teacher's conclusions, the synthesis stage's targets
(``data/synthesis.py``)."""

from __future__ import annotations

import argparse

__all__ = ["add_data_parser"]


def _build(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .data.builder import build_dataset

    recipe = load_recipe(args.config, args.overrides)
    path = build_dataset(recipe, progress=not args.no_progress)
    print(f"data set ready in {path}")
    return 0


def _synthesis(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .data.synthesis import build_synthesis

    recipe = load_recipe(args.config, args.overrides)
    path = build_synthesis(recipe, progress=not args.no_progress)
    print(f"conclusions ready in {path}/synthesis")
    return 0


def _ceiling(args: argparse.Namespace) -> int:
    from .data.ceiling import run_ceiling_command

    return run_ceiling_command(args)


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pdt data`` (``build``, ``synthesis``, ``ceiling``) on the ``pdt`` command's subparsers."""
    data = subparsers.add_parser("data", help="build the teacher-distillation data set for training")
    sub = data.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser(
        "build",
        help="teacher writes plans and serial sections; store per-stream targets in resumable Parquet shards",
        description="Reads the model, pdt and data sections of a recipe (recipes/configs/*.yaml). Rerunning "
        "after an interruption skips the shards already written.",
    )
    build.add_argument("--config", required=True, help="recipe YAML file, e.g. recipes/configs/smollm2-135m.yaml")
    build.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.build.max_prompts.train=32")
    build.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    build.set_defaults(func=_build)
    synthesis = sub.add_parser(
        "synthesis",
        help="teacher writes each prompt's conclusion after all its sections: the synthesis stage's targets",
        description="For every row of a data set built by `pdt data build`, the serial teacher writes the "
        "conclusion after the prompt, the plan and all sections' text (greedy tokens and top-k KD targets), into "
        "resumable side shards under <data.path>/synthesis/ (the base shards are not touched). Rerunning after an "
        "interruption skips the shards already written.",
    )
    synthesis.add_argument("--config", required=True, help="recipe YAML file, e.g. recipes/configs/smollm2-135m.yaml")
    synthesis.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.synthesis.max_new_tokens=32")
    synthesis.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    synthesis.set_defaults(func=_synthesis)
    ceiling = sub.add_parser(
        "ceiling",
        help="five teachers on the same sections: the reachable gain of notes and its parts",
        description="Writes the split's sections with the recipe's teacher (and again with sampling) and reports "
        "KL(lag||isolated), KL(lag||donor), KL(lag||resampled), KL(serial||isolated) and KL(serial||lag) per "
        "section index, per round and by copying, with the parts' shares of the reachable gain (JSON, markdown, "
        "PNG). The split needs at least two prompts (the donor is the next one).",
    )
    ceiling.add_argument("--config", required=True, help="recipe YAML file, e.g. recipes/configs/smollm2-135m.yaml")
    ceiling.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.build.max_prompts.validation=32")
    ceiling.add_argument("--split", default="validation", choices=["train", "validation", "test"], help="prompt split")
    ceiling.add_argument("--writer", default="serial", choices=["serial", "lag"], help="which teacher writes sections")
    ceiling.add_argument("--limit", type=int, default=None, help="first N prompts of the split (default: all)")
    ceiling.add_argument("--out", default=None, help="output folder (default outputs/ceiling/<recipe name>)")
    ceiling.add_argument(
        "--encoder",
        default=None,
        help="sentence-transformers model comparing sibling texts (default: embedded MiniLM)",
    )
    ceiling.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ceiling.set_defaults(func=_ceiling)
    return data


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m pdt_hf.training.cli data build ...``), same as ``pdt data build``."""
    parser = argparse.ArgumentParser(prog="pdt")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
