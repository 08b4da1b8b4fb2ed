"""Training curriculum: teacher-distilled data, losses, staged training under accelerate, tau calibration.

Layout, in the order data flows: ``data/`` (prompts -> teacher plans and serial sections -> Parquet shards),
``rounds``/``batch``/``notes`` (index arithmetic and padded batches), ``losses`` and ``objective`` (what one
step computes), ``curriculum`` (stages as data), ``trainer``/``checkpointing``/``metrics`` (the loop),
``calibration`` (tau on the validation split). ``recipes/train.py`` is the entry point.
"""

from .config import RecipeConfig, load_recipe
from .curriculum import StageConfig

__all__ = ["RecipeConfig", "StageConfig", "load_recipe"]
