"""Train PDT sidecars on a frozen trunk through the curriculum of a recipe.

    accelerate launch recipes/train.py --config recipes/configs/smollm2-135m.yaml [key=value ...] [--resume]
    torchrun --nproc_per_node 2 recipes/train.py --config ...      # two CPU processes (gloo)

Build the data set first with ``pdt data build --config <same recipe>``. Outputs go to ``train.output_dir``:
``checkpoints/`` (resumable), ``metrics.csv``, ``tensorboard/``, ``loss_curves.png``, ``sidecar/`` (with the
calibrated tau) and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. recipes/configs/smollm2-135m.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4 curriculum.snc.steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from pdt_hf.training.config import load_recipe
    from pdt_hf.training.trainer import train

    recipe = load_recipe(args.config, args.overrides)
    summary = train(recipe, resume=args.resume)
    return summary


if __name__ == "__main__":
    result = main()
    print(json.dumps({k: result[k] for k in ("world_size", "agreement_threshold") if k in result}))
    sys.exit(0)
