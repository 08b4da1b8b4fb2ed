"""The training curriculum as data: a YAML list of stages, each naming trainable sidecar families, losses, steps.

Design decisions:
- A stage trains only its families; every other sidecar parameter has ``requires_grad=False`` while it runs.
  At each stage boundary the trainer rebuilds the optimizer and the accelerate (DDP) wrapping, so DDP only ever
  sees parameters that receive a gradient and needs no ``find_unused_parameters``.
- Which loss can reach which family is a table (:data:`LOSS_REACH`). A stage is rejected before any compute if a
  trainable family is reached by none of its losses (DDP would hang or error on it) or a weighted loss reaches
  no trainable family (it would train nothing).
- Default stages follow DESIGN.md: 0 planner + notes heads, 1 stream adapters, 2 SNC + speculation head,
  3 coverage + agreement heads. An optional ``synthesis`` stage (family ``synthesis``, the adapters' slot
  ``num_streams``; losses ``synthesis_lm``/``synthesis_kd``) trains the synthesis stream on the teacher's
  conclusion while it reads every stream's notes; its losses take a stage of their own (their rows are another
  forward than the section rows') and need ``notes_visible``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .configuration import ConfigError

__all__ = [
    "FAMILIES",
    "LOSSES",
    "LOSS_REACH",
    "SYNTHESIS_LOSSES",
    "StageConfig",
    "default_curriculum",
    "expand_families",
    "param_groups",
    "set_trainable",
    "validate_curriculum",
]

HEADS = ("notes", "planner", "coverage", "agreement", "speculation")
FAMILIES = ("adapters", "snc", *(f"heads.{h}" for h in HEADS), "synthesis")
SYNTHESIS_LOSSES = ("synthesis_lm", "synthesis_kd")
"""Losses of the synthesis stream's rows (the teacher's conclusion, every stream's notes visible)."""
LOSSES = ("lm", "kd", "notes", "planner", "speculation", "usage", "coverage", "agreement", *SYNTHESIS_LOSSES)

LOSS_REACH: dict[str, tuple[str, ...]] = {
    "lm": ("adapters", "snc"),
    "kd": ("adapters", "snc"),
    "notes": ("heads.notes", "adapters", "snc"),
    "planner": ("heads.planner", "adapters"),
    "speculation": ("heads.speculation",),
    "usage": ("snc", "adapters"),
    "coverage": ("heads.coverage",),
    "agreement": ("heads.agreement",),
    "synthesis_lm": ("synthesis", "snc"),
    "synthesis_kd": ("synthesis", "snc"),
}
"""Families a loss's gradient can reach (SNC only when the stage shows notes)."""

NOTE_GRAD_LOSSES = ("lm", "kd", "usage", *SYNTHESIS_LOSSES)
"""Losses of the rows that read notes: with a stage's ``note_grad`` they also reach the notes and planner heads."""


def expand_families(names: list[str]) -> list[str]:
    """``heads`` -> its five heads; unknown names raise naming the known ones."""
    out: list[str] = []
    for name in names:
        if name == "heads":
            out.extend(f"heads.{h}" for h in HEADS)
        elif name in FAMILIES:
            out.append(name)
        else:
            raise ValueError(f"unknown sidecar family {name!r}; use one of {['heads', *FAMILIES]}.")
    return sorted(set(out), key=out.index)


@dataclass
class StageConfig:
    """One curriculum stage."""

    name: str = field(metadata={"help": "Stage name (used in logs, checkpoints and overrides)."})
    trainable: list[str] = field(metadata={"help": "Sidecar families trained: adapters, snc, heads, heads.<name>."})
    losses: dict[str, float] = field(metadata={"help": f"Loss weights by name; names: {', '.join(LOSSES)}."})
    steps: int = field(metadata={"help": "Optimizer steps in this stage (> 0)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate of this stage's AdamW."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps before the cosine decay."})
    notes_visible: bool = field(
        default=False, metadata={"help": "Whether rows read lagged sibling notes through SNC in this stage."}
    )
    note_grad: bool = field(
        default=False,
        metadata={
            "help": "Keep the graph from the rows' losses back through the sibling notes they read to the notes "
            "and planner heads that wrote them (end to end; needs notes_visible). Without it those heads learn "
            "only from their alignment losses."
        },
    )
    gate_lr_scale: float = field(
        default=1.0,
        metadata={
            "help": "Learning rate of the SNC gates as a multiple of lr (the bus probe needed 10: at 1x the "
            "gates stalled near |tanh| 0.07)."
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "." in self.name:
            raise ValueError(f"stage name must be a non-empty string without dots, got {self.name!r}.")
        where = f"stage {self.name!r}"
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"{where} has steps={self.steps!r}; every stage needs at least 1 step (or remove it).")
        if not isinstance(self.trainable, list) or not self.trainable:
            raise ValueError(f"{where} must list its trainable sidecar families, e.g. trainable: [adapters].")
        try:
            self.trainable = expand_families(self.trainable)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not isinstance(self.losses, dict) or not self.losses:
            raise ValueError(f"{where} must give loss weights, e.g. losses: {{lm: 1.0, kd: 1.0}}.")
        unknown = sorted(set(self.losses) - set(LOSSES))
        if unknown:
            raise ValueError(f"{where} names unknown loss(es) {unknown}; losses are {list(LOSSES)}.")
        for loss, weight in self.losses.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"{where}: weight of loss {loss!r} must be a number >= 0, got {weight!r}.")
        self.losses = {k: float(v) for k, v in self.losses.items()}
        if not float(self.lr) > 0:
            raise ValueError(f"{where}: lr must be > 0, got {self.lr!r}.")
        self.lr = float(self.lr)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"{where}: warmup_steps must be an integer >= 0, got {self.warmup_steps!r}.")
        if self.losses.get("usage", 0) > 0 and not self.notes_visible:
            raise ValueError(f"{where}: the usage loss compares notes with ablated notes; set notes_visible: true.")
        if self.note_grad and not self.notes_visible:
            raise ValueError(
                f"{where}: note_grad trains the heads behind the notes rows read; set notes_visible: true."
            )
        synthesis = [loss for loss in self.losses if loss in SYNTHESIS_LOSSES]
        if synthesis:
            others = sorted(set(self.losses) - set(SYNTHESIS_LOSSES))
            if others:
                raise ValueError(
                    f"{where} mixes the synthesis losses {synthesis} with {others}: the synthesis stream's rows are "
                    "another forward than the section rows', and a step runs one forward with gradients; put the "
                    "synthesis losses in a stage of their own."
                )
            if not self.notes_visible:
                raise ValueError(f"{where}: the synthesis stream reads every stream's notes; set notes_visible: true.")
        if isinstance(self.gate_lr_scale, bool) or not isinstance(self.gate_lr_scale, (int, float)):
            raise ValueError(f"{where}: gate_lr_scale must be a number > 0, got {self.gate_lr_scale!r}.")
        if not self.gate_lr_scale > 0:
            raise ValueError(f"{where}: gate_lr_scale must be > 0, got {self.gate_lr_scale!r}.")
        self.gate_lr_scale = float(self.gate_lr_scale)
        self._check_reach(where)

    def _check_reach(self, where: str) -> None:
        weighted = [loss for loss, w in self.losses.items() if w > 0]
        reach = {loss: {f for f in LOSS_REACH[loss] if f != "snc" or self.notes_visible} for loss in weighted}
        if self.note_grad:
            for loss in set(weighted) & set(NOTE_GRAD_LOSSES):
                reach[loss] |= {"heads.notes", "heads.planner"}
        for family in self.trainable:
            if not any(family in r for r in reach.values()):
                hint = [loss for loss, fams in LOSS_REACH.items() if family in fams]
                raise ValueError(
                    f"{where} trains {family} but none of its weighted losses {weighted} reaches it"
                    f"{' (SNC needs notes_visible: true)' if family == 'snc' else ''}; add one of {hint} "
                    f"or drop {family} from trainable."
                )
        for loss, fams in reach.items():
            if not fams & set(self.trainable):
                raise ValueError(
                    f"{where}: loss {loss!r} has weight {self.losses[loss]} but reaches no trainable family "
                    f"(it can train {sorted(fams) or 'nothing here'}); set its weight to 0 to only log it."
                )


def validate_curriculum(stages: list[StageConfig], run_stages: list[str] | None = None) -> list[StageConfig]:
    """Check names are unique and ``run_stages`` (a subset, in curriculum order) names existing stages."""
    if not stages:
        raise ConfigError("the curriculum is empty; list at least one stage (see recipes/configs/tiny.yaml).")
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"curriculum stage names must be unique; repeated: {dupes}.")
    if run_stages is None:
        return list(stages)
    unknown = [n for n in run_stages if n not in names]
    if unknown:
        raise ConfigError(f"train.run_stages names unknown stage(s) {unknown}; the curriculum has {names}.")
    return [s for s in stages if s.name in run_stages]


def param_groups(sidecar: nn.Module, params: list[nn.Parameter], lr: float, gate_lr_scale: float) -> list[dict]:
    """AdamW groups: the SNC gates at ``lr * gate_lr_scale``, every other parameter of ``params`` at ``lr``."""
    gates = {id(layer.gate) for layer in sidecar.snc_layers}
    groups = [
        {"params": [p for p in params if id(p) not in gates], "lr": lr},
        {"params": [p for p in params if id(p) in gates], "lr": lr * gate_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def set_trainable(sidecar: nn.Module, families: list[str]) -> list[nn.Parameter]:
    """Freeze the whole sidecar, then unfreeze ``families``; returns the trainable parameters in a fixed order."""
    for p in sidecar.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for family in families:
        for p in sidecar.family_parameters(family):
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(True)
                params.append(p)
    return params


def default_curriculum(steps: tuple[int, int, int, int] = (100, 200, 200, 100)) -> list[StageConfig]:
    """The four DESIGN.md stages with unit loss weights."""
    return [
        StageConfig("heads", ["heads.planner", "heads.notes"], {"notes": 1.0, "planner": 1.0}, steps[0]),
        StageConfig("adapters", ["adapters"], {"lm": 1.0, "kd": 1.0}, steps[1]),
        StageConfig(
            "snc",
            ["snc", "heads.speculation"],
            {"lm": 1.0, "kd": 1.0, "speculation": 1.0, "usage": 1.0},
            steps[2],
            notes_visible=True,
        ),
        StageConfig(
            "judges",
            ["heads.coverage", "heads.agreement"],
            {"coverage": 1.0, "agreement": 1.0},
            steps[3],
            notes_visible=True,
        ),
    ]
