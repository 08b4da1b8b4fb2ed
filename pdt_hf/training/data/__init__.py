"""The distillation data set: prompt sources, the teacher, the builder and the on-disk schema."""

from .config import DataBuildConfig, DataConfig
from .schema import SCHEMA_VERSION, DatasetMismatchError

__all__ = ["SCHEMA_VERSION", "DataBuildConfig", "DataConfig", "DatasetMismatchError"]
