"""Recipe configuration: trunk, sidecar hyperparameters, data, loop, curriculum and calibration in one file.

``load_recipe(path, overrides)`` reads a YAML file from ``recipes/configs/``, applies ``key=value`` overrides
and returns a validated :class:`RecipeConfig`; every section is a dataclass with a help string per field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import PDTConfig
from .configuration import ConfigError, apply_overrides, build_dataclass, load_yaml
from .curriculum import SYNTHESIS_LOSSES, StageConfig, validate_curriculum
from .data.config import SPLITS, DataConfig

__all__ = ["CalibrationConfig", "LoopConfig", "ModelConfig", "RecipeConfig", "load_recipe", "recipe_from_dict"]

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The frozen trunk."""

    name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path of the trunk; None: the embedded SmolLM2-135M."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the trunk."})
    dtype: str = field(default="float32", metadata={"help": "Trunk dtype: auto, float32, bfloat16, float16."})
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "Load the trunk in 4-bit NF4 (bitsandbytes, CPU or CUDA; `pip install pdt-hf[bnb]`), computing "
            "in model.dtype (auto: bfloat16 on CUDA, float32 on CPU); one copy per rank."
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute trunk activations in backward."})
    reuse_prefix_kv: str | bool = field(
        default="auto",
        metadata={
            "help": "Run the shared prompt prefix once per example and reuse its KV in the stream rows; "
            "auto: on unless gradient checkpointing or sliding-window layers make it inexact."
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the trunk's own modeling code."})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype {self.dtype!r} is unknown; use one of {DTYPES}.")
        if self.reuse_prefix_kv not in ("auto", True, False):
            raise ValueError(f"model.reuse_prefix_kv must be auto, true or false, got {self.reuse_prefix_kv!r}.")
        if self.reuse_prefix_kv is True and self.gradient_checkpointing:
            raise ValueError(
                "model.reuse_prefix_kv=true cannot be combined with gradient_checkpointing (checkpointed layers drop "
                "past_key_values); set reuse_prefix_kv: auto."
            )


@dataclass
class LoopConfig:
    """The optimisation loop (the ``train`` section)."""

    output_dir: str = field(default="outputs/train", metadata={"help": "Checkpoints, metrics and the final sidecar."})
    seed: int = field(default=0, metadata={"help": "Seeds the sidecar init, data order and every RNG."})
    batch_size: int = field(
        default=4, metadata={"help": "Examples (prompts, K rows each) per optimizer step, all ranks."}
    )
    micro_batch_size: int = field(default=1, metadata={"help": "Examples per forward on one rank (accumulation)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    save_every: int = field(default=50, metadata={"help": "Write a resumable checkpoint every this many steps."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Most recent checkpoints kept on disk."})
    sibling_notes: str = field(
        default="student",
        metadata={
            "help": "Notes siblings publish in training: 'student' (notes head on the student's sibling "
            "blocks, from a no-grad pass, as in decoding) or 'teacher' (the projected teacher targets)."
        },
    )
    ablation: str = field(
        default="shuffle",
        metadata={"help": "Notes for the usage contrast: 'shuffle' (another example's notes) or 'drop' (none)."},
    )
    usage_margin: float = field(
        default=0.05, metadata={"help": "Hinge margin (nats/token): KD with true notes should beat ablated by this."}
    )
    agreement_divergence: float = field(
        default=1.0,
        metadata={
            "help": "A block whose mean KL to the teacher's top-k distribution exceeds this (nats/token) "
            "is labelled 'disagree' for the agreement head."
        },
    )
    sidecar_dtype: str = field(default="float32", metadata={"help": "Dtype of the trainable sidecar weights."})
    tensorboard: bool = field(default=True, metadata={"help": "Also write TensorBoard event files."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    run_stages: list[str] | None = field(default=None, metadata={"help": "Run only these stages (by name)."})
    init_sidecar: str | None = field(
        default=None,
        metadata={
            "help": "Start from this trained sidecar directory instead of a fresh one (its pdt_config.json must "
            "match the pdt section's shapes); a sidecar saved without a synthesis slot loads into pdt.synthesis: "
            "true with a fresh slot, so run_stages: [synthesis] trains only that slot."
        },
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size", "save_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {value!r}.")
        if self.sibling_notes not in ("student", "teacher"):
            raise ValueError(f"train.sibling_notes {self.sibling_notes!r}; use 'student' or 'teacher'.")
        if self.ablation not in ("shuffle", "drop"):
            raise ValueError(f"train.ablation {self.ablation!r}; use 'shuffle' or 'drop'.")
        if self.sidecar_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train.sidecar_dtype {self.sidecar_dtype!r}; use float32 or bfloat16.")
        if self.agreement_divergence <= 0:
            raise ValueError(f"train.agreement_divergence must be > 0 nats/token, got {self.agreement_divergence!r}.")


@dataclass
class CalibrationConfig:
    """Choosing tau (``agreement_threshold``) and the final validation report."""

    split: str = field(default="validation", metadata={"help": "Split tau is chosen on."})
    report_splits: list[str] = field(
        default_factory=lambda: ["validation", "test"], metadata={"help": "Splits evaluated after training."}
    )
    max_examples: int | None = field(default=None, metadata={"help": "Cap on examples per evaluated split."})
    objective: str = field(
        default="f1",
        metadata={
            "help": "How tau is chosen: 'f1' (best F1 of the rollback decision on divergent blocks) or "
            "'youden' (best recall minus false-rollback rate)."
        },
    )
    min_precision_gain: float = field(
        default=0.1,
        metadata={
            "help": "Keep the chosen tau only if the lower 95% bound of the rollback decision's precision beats "
            "the divergent base rate by this much; otherwise write tau = 0 (rollback off)."
        },
    )
    rollback_cost: float = field(
        default=0.05,
        metadata={
            "help": "Price of one rollback in nats/token of teacher NLL (`pdt calibrate-rollback`): a rollback "
            "pays when the regenerated block's NLL is lower than the original's by more than this."
        },
    )
    max_rollback_share: float = field(
        default=0.25,
        metadata={"help": "Rollback budget: the most blocks, as a share of all blocks, that tau may roll back."},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_precision_gain <= 1.0:
            raise ValueError(f"calibration.min_precision_gain must be in [0, 1], got {self.min_precision_gain!r}.")
        if not 0.0 <= self.rollback_cost < float("inf"):
            raise ValueError(
                f"calibration.rollback_cost must be a finite number >= 0 nats/token, got {self.rollback_cost!r}; "
                "e.g. 0.05."
            )
        if not 0.0 < self.max_rollback_share <= 1.0:
            raise ValueError(
                f"calibration.max_rollback_share must be in (0, 1], got {self.max_rollback_share!r}; e.g. 0.25."
            )
        for split in [self.split, *self.report_splits]:
            if split not in SPLITS:
                raise ValueError(f"calibration split {split!r} is unknown; splits are {list(SPLITS)}.")
        if self.objective not in ("f1", "youden"):
            raise ValueError(f"calibration.objective {self.objective!r}; use 'f1' or 'youden'.")
        if self.max_examples is not None and (not isinstance(self.max_examples, int) or self.max_examples < 1):
            raise ValueError(f"calibration.max_examples must be None or >= 1, got {self.max_examples!r}.")


@dataclass
class RecipeConfig:
    """A whole recipe file."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The frozen trunk."})
    pdt: PDTConfig = field(default_factory=PDTConfig, metadata={"help": "Sidecar hyperparameters (pdt_config.json)."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Distillation data."})
    train: LoopConfig = field(default_factory=LoopConfig, metadata={"help": "Optimisation loop."})
    curriculum: list[StageConfig] = field(default_factory=list, metadata={"help": "Stages, in order."})
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig, metadata={"help": "tau and report."})

    def __post_init__(self) -> None:
        validate_curriculum(self.curriculum, self.train.run_stages)
        for stage in self.curriculum:
            uses = "synthesis" in stage.trainable or any(loss in SYNTHESIS_LOSSES for loss in stage.losses)
            if uses and not self.pdt.synthesis:
                raise ConfigError(
                    f"stage {stage.name!r} trains the synthesis stream, but the sidecar has no synthesis slot; set "
                    "pdt.synthesis: true (and build its data with `pdt data synthesis --config <recipe.yaml>`)."
                )

    @property
    def stages(self) -> list[StageConfig]:
        """Stages this run executes (``train.run_stages`` applied)."""
        return validate_curriculum(self.curriculum, self.train.run_stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_key(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (not paths, logging, cadence)."""
        data = self.to_dict()
        for key in ("output_dir", "save_every", "keep_checkpoints", "tensorboard", "progress"):
            data["train"].pop(key)
        data.pop("calibration")
        data["data"].pop("build")
        data["data"].pop("synthesis")
        data["data"]["path"] = os.path.abspath(self.data.path)
        return data


def _pdt_config(data: Any) -> PDTConfig:
    if isinstance(data, PDTConfig):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"section 'pdt' must be a mapping, got {type(data).__name__}.")
    try:
        return PDTConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"pdt: {err}") from None


def recipe_from_dict(data: dict[str, Any]) -> RecipeConfig:
    """Validate a recipe mapping (sections as in ``recipes/configs/*.yaml``)."""
    known = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in the recipe; sections are {sorted(known)}.")
    stages_raw = data.get("curriculum") or []
    if not isinstance(stages_raw, list):
        raise ConfigError("curriculum must be a YAML list of stages, each with name, trainable, losses and steps.")
    stages = []
    for i, raw in enumerate(stages_raw):
        where = f"curriculum[{i}]" + (f" ({raw.get('name')!r})" if isinstance(raw, dict) else "")
        if isinstance(raw, dict):
            missing = [k for k in ("name", "trainable", "losses", "steps") if k not in raw]
            if missing:
                raise ConfigError(f"{where} is missing {missing}; a stage needs name, trainable, losses and steps.")
        stages.append(build_dataclass(StageConfig, raw, where))
    try:
        return RecipeConfig(
            model=build_dataclass(ModelConfig, data.get("model"), "model"),
            pdt=_pdt_config(data.get("pdt")),
            data=build_dataclass(DataConfig, data.get("data"), "data"),
            train=build_dataclass(LoopConfig, data.get("train"), "train"),
            curriculum=stages,
            calibration=build_dataclass(CalibrationConfig, data.get("calibration"), "calibration"),
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> RecipeConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides and validate."""
    return recipe_from_dict(apply_overrides(load_yaml(path), list(overrides or [])))
