"""Configuration of the distillation data set (the ``data`` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")
TEACHER_MODES = ("lag", "serial")


@dataclass
class DataBuildConfig:
    """How ``pdt data build`` turns prompts into teacher-written, per-stream training examples."""

    source: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: a .jsonl/.json/.parquet/.csv/.txt file, a Hub dataset name (online), or None "
            "for the shipped pdt_hf/resources/prompts.txt."
        },
    )
    source_split: str = field(default="train", metadata={"help": "Split of the source data set to read."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompt text (a .txt file always uses 'text')."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher model id or path; None: the trunk itself. Must share its vocabulary."}
    )
    teacher_dtype: str = field(default="auto", metadata={"help": "Teacher dtype: auto, float32, bfloat16, float16."})
    teacher_mode: str = field(
        default="lag",
        metadata={
            "help": "lag: the teacher writes the K sections round by round, block r reading the prompt, the plan, "
            "its own earlier blocks and the sibling blocks of rounds <= r - note_lag as text (targets a parallel "
            "stream can reach; generation.text_bus). serial: section k after the whole of sections 0..k-1."
        },
    )
    split_fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1},
        metadata={"help": "Share of prompts per split; a prompt's split is fixed by a hash of its text."},
    )
    max_prompts: dict[str, int | None] = field(
        default_factory=lambda: {"train": None, "validation": None, "test": None},
        metadata={"help": "Cap on prompts per split after splitting (None: all of them)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds the split hash and any sampling."})
    plan_max_tokens: int = field(default=48, metadata={"help": "Most tokens the teacher writes for the plan."})
    section_max_tokens: int = field(default=32, metadata={"help": "Most tokens the teacher writes per section."})
    top_k: int = field(default=16, metadata={"help": "Teacher log-probs kept per position as KD targets."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per batched teacher generate (left padding)."})
    shard_size: int = field(default=16, metadata={"help": "Prompts per written shard (the unit of resumption)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample the teacher (else greedy)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature when do_sample."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass when do_sample."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Teacher repetition penalty while writing."})
    coverage_min_overlap: float = field(
        default=0.5,
        metadata={
            "help": "A block also covers another stream's plan item if it holds at least this share of "
            "the item's content words (its own item is always covered)."
        },
    )

    def __post_init__(self) -> None:
        for name in ("plan_max_tokens", "section_max_tokens", "top_k", "batch_size", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.build.{name} must be a positive integer, got {value!r}.")
        unknown = sorted(set(self.split_fractions) - set(SPLITS)) + sorted(set(self.max_prompts) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split name(s) {unknown}; splits are {list(SPLITS)}.")
        fractions = {s: float(self.split_fractions.get(s, 0.0)) for s in SPLITS}
        if any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
            raise ValueError(
                f"data.build.split_fractions {self.split_fractions} must be >= 0 and sum to 1, "
                "e.g. {train: 0.8, validation: 0.1, test: 0.1}."
            )
        if fractions["train"] <= 0 or fractions["validation"] <= 0:
            raise ValueError("data.build.split_fractions needs a train and a validation share > 0.")
        self.split_fractions = fractions
        self.max_prompts = {s: self.max_prompts.get(s) for s in SPLITS}
        for split, cap in self.max_prompts.items():
            if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 0):
                raise ValueError(f"data.build.max_prompts.{split} must be None or an integer >= 0, got {cap!r}.")
        if self.teacher_mode not in TEACHER_MODES:
            raise ValueError(f"data.build.teacher_mode {self.teacher_mode!r}; use one of {list(TEACHER_MODES)}.")
        if self.teacher_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"data.build.teacher_dtype {self.teacher_dtype!r}; use auto, float32, bfloat16, float16.")
        if not 0.0 < self.coverage_min_overlap <= 1.0:
            raise ValueError(f"data.build.coverage_min_overlap must lie in (0, 1], got {self.coverage_min_overlap!r}.")


@dataclass
class SynthesisDataConfig:
    """How ``pdt data synthesis`` adds the teacher's conclusion (the synthesis stream's target) to a built data set.

    The teacher, its sampling settings and the KD top-k are those of ``data.build``.
    """

    max_new_tokens: int = field(default=48, metadata={"help": "Most tokens the teacher writes for the conclusion."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per batched teacher generate (left padding)."})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.synthesis.{name} must be a positive integer, got {value!r}.")


@dataclass
class DataConfig:
    """Where the built data set lives and how it was built."""

    path: str = field(default="outputs/data", metadata={"help": "Directory of the built data set."})
    build: DataBuildConfig = field(default_factory=DataBuildConfig, metadata={"help": "pdt data build settings."})
    synthesis: SynthesisDataConfig = field(
        default_factory=SynthesisDataConfig, metadata={"help": "pdt data synthesis settings (the conclusions)."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.build, dict):
            self.build = DataBuildConfig(**self.build)
        if isinstance(self.synthesis, dict):
            self.synthesis = SynthesisDataConfig(**self.synthesis)
        if not self.path:
            raise ValueError("data.path must name a directory for the built data set.")
