"""``PDTConfig``: every hyperparameter of the sidecars and of multi-stream decoding.

Design decisions:
- Symbols follow DESIGN.md (``num_streams`` = K, ``block_size`` = B, ...); one
  dataclass per sidecar family is nested here so a single ``pdt_config.json``
  describes the whole sidecar.
- Values that depend on the trunk (``d_note``, ``instrumented_layers``) may be
  left ``None`` and are filled in by :meth:`PDTConfig.resolve` when the
  sidecar is attached; the saved file always holds the resolved values.
- Validation happens on construction and names the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .sidecars.adapter.config import AdapterConfig
from .sidecars.heads.config import HeadsConfig
from .sidecars.snc.config import SNCConfig

CONFIG_NAME = "pdt_config.json"
FORMAT_VERSION = 1


def _positive(name: str, value: object, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}")


@dataclass
class PDTConfig:
    """Hyperparameters of a PDT sidecar (DESIGN.md symbol table)."""

    num_streams: int = field(default=3, metadata={"help": "K: parallel streams, one per plan item."})
    block_size: int = field(default=8, metadata={"help": "B: tokens a stream decodes per round before a commit."})
    commit_horizon: int = field(default=32, metadata={"help": "L: most tokens a single rollback may remove (L >= B)."})
    note_lag: int = field(default=1, metadata={"help": "Delta: rounds before a committed note is visible."})
    note_window: int = field(default=16, metadata={"help": "W: most recent visible notes a stream reads."})
    notes_per_block: int = field(
        default=1,
        metadata={
            "help": "M: notes a committed block publishes, each the notes head on one of M equal, consecutive "
            "chunks of its tokens (M = block_size: one note per token); W must then hold M times as many."
        },
    )
    agreement_threshold: float = field(
        default=0.5, metadata={"help": "tau: commit a block if its agreement score >= tau (calibrated)."}
    )
    max_retries: int = field(default=2, metadata={"help": "R: regenerations of one block before accepting it."})
    d_note: int | None = field(default=None, metadata={"help": "Note width; None means min(d_model, 256)."})
    instrumented_layers: list[int] | None = field(
        default=None, metadata={"help": "Decoder layers that get an adapter and SNC; None: every 4th plus the last."}
    )
    instrument_every: int = field(default=4, metadata={"help": "Stride of the default instrumented layers."})
    read_own_notes: bool = field(default=False, metadata={"help": "Whether a stream reads its own notes."})
    note_capacity: int = field(default=512, metadata={"help": "Most notes the bus can hold during one generate."})
    synthesis: bool = field(
        default=False,
        metadata={
            "help": "Give the adapters one more slot, index num_streams, for the synthesis (combiner) stream that "
            "reads every stream's notes after the sections and writes the conclusion (generate(synthesis=True)); "
            "trained by the curriculum's synthesis stage."
        },
    )
    adapter: AdapterConfig = field(default_factory=AdapterConfig, metadata={"help": "Per-stream adapters."})
    snc: SNCConfig = field(default_factory=SNCConfig, metadata={"help": "Gated note cross-attention."})
    heads: HeadsConfig = field(default_factory=HeadsConfig, metadata={"help": "Notes/planner/coverage/... heads."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Trunk the sidecar was built for."})
    revision: str | None = field(default=None, metadata={"help": "Trunk revision, when loaded from the Hub."})
    trunk_adapter: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "PEFT adapter on the trunk (peft_type, name_or_path, revision, adapter_name, merged), loaded "
            "onto base_model_name_or_path when the trunk is rebuilt; None for a plain trunk."
        },
    )
    trunk_fingerprint: dict[str, Any] | None = field(
        default=None, metadata={"help": "model_type, hidden size, layer count and vocab size of the trunk."}
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "Version of this file's layout."})

    def __post_init__(self) -> None:
        for sub, cls in (("adapter", AdapterConfig), ("snc", SNCConfig), ("heads", HeadsConfig)):
            value = getattr(self, sub)
            if isinstance(value, dict):
                setattr(self, sub, cls(**value))
        _positive("num_streams", self.num_streams, "use at least 1 stream, e.g. num_streams=3.")
        _positive("block_size", self.block_size, "try block_size=8.")
        _positive("commit_horizon", self.commit_horizon, "it must be >= block_size, e.g. 32.")
        _positive("note_window", self.note_window, "try note_window=16.")
        _positive("instrument_every", self.instrument_every, "try instrument_every=4.")
        _positive("notes_per_block", self.notes_per_block, "the default is 1 (one note per block).")
        if self.notes_per_block > self.block_size:
            raise ValueError(
                f"notes_per_block ({self.notes_per_block}) > block_size ({self.block_size}): a block cannot publish "
                f"more notes than it has tokens; use at most notes_per_block={self.block_size}."
            )
        _positive("note_capacity", self.note_capacity, "try note_capacity=512.")
        if self.block_size > self.commit_horizon:
            raise ValueError(
                f"block_size ({self.block_size}) > commit_horizon ({self.commit_horizon}): a rollback must be able "
                "to remove a whole block; raise commit_horizon or lower block_size."
            )
        if isinstance(self.note_lag, bool) or not isinstance(self.note_lag, int) or self.note_lag < 0:
            raise ValueError(f"note_lag must be an integer >= 0, got {self.note_lag!r}; the default is 1.")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {self.max_retries!r}; the default is 2.")
        if not 0.0 <= float(self.agreement_threshold) <= 1.0:
            raise ValueError(f"agreement_threshold must lie in [0, 1], got {self.agreement_threshold!r}.")
        if self.d_note is not None:
            _positive("d_note", self.d_note, "or None for min(d_model, 256).")
        if self.instrumented_layers is not None:
            if not self.instrumented_layers or any(
                isinstance(i, bool) or not isinstance(i, int) for i in self.instrumented_layers
            ):
                raise ValueError(
                    f"instrumented_layers must be a non-empty list of ints, got {self.instrumented_layers!r}"
                )
            if len(set(self.instrumented_layers)) != len(self.instrumented_layers):
                raise ValueError(f"instrumented_layers has duplicates: {self.instrumented_layers!r}")
        if self.trunk_adapter is not None and (
            not isinstance(self.trunk_adapter, dict) or "name_or_path" not in self.trunk_adapter
        ):
            raise ValueError(
                f"trunk_adapter must be None or a dict with at least 'name_or_path' (the PEFT adapter's directory or "
                f"Hub id), got {self.trunk_adapter!r}; PDTForCausalLM.from_pretrained fills it for PEFT trunks."
            )
        if not isinstance(self.synthesis, bool):
            raise ValueError(f"synthesis must be true or false, got {self.synthesis!r}.")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"pdt_config.json format_version {self.format_version!r} is not supported "
                f"(this pdt-hf reads version {FORMAT_VERSION}); re-save the sidecar with a matching pdt-hf."
            )

    @property
    def synthesis_stream(self) -> int:
        """Stream id of the synthesis slot (``num_streams``); valid only when ``synthesis`` is true."""
        return self.num_streams

    def notes_needed(self, num_streams: int, max_new_tokens: int, block_size: int) -> int:
        """Bus rows one generate may publish: per stream, a planner note plus M per block."""
        return num_streams * (1 + self.notes_per_block * -(-max_new_tokens // block_size))

    # ------------------------------------------------------------------ trunk-dependent values
    def resolve(self, trunk_config: object) -> PDTConfig:
        """Return a copy with ``d_note``, ``instrumented_layers`` and the fingerprint filled for ``trunk_config``."""
        from .trunk.architectures import trunk_dims, trunk_fingerprint

        hidden, num_layers = trunk_dims(trunk_config)
        layers = self.instrumented_layers
        if layers is None:
            layers = sorted(
                set(range(self.instrument_every - 1, num_layers, self.instrument_every)) | {num_layers - 1}
            )
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"instrumented_layers {bad} out of range: the trunk has {num_layers} decoder layers "
                f"(valid indices 0..{num_layers - 1})."
            )
        d_note = self.d_note if self.d_note is not None else min(hidden, 256)
        head_dim = self.snc.head_dim if self.snc.head_dim is not None else max(1, d_note // self.snc.num_heads)
        fingerprint = trunk_fingerprint(trunk_config)
        if self.trunk_fingerprint is not None and self.trunk_fingerprint != fingerprint:
            field_name = next(k for k in fingerprint if self.trunk_fingerprint.get(k) != fingerprint[k])
            raise ValueError(
                f"this sidecar was built for a trunk with {field_name}={self.trunk_fingerprint.get(field_name)!r}, "
                f"but the trunk has {field_name}={fingerprint[field_name]!r}; load it onto the trunk it was "
                f"trained for ({self.base_model_name_or_path or 'see pdt_config.json'})."
            )
        return dataclasses.replace(
            self,
            d_note=d_note,
            instrumented_layers=sorted(layers),
            snc=dataclasses.replace(self.snc, head_dim=head_dim),
            trunk_fingerprint=fingerprint,
            base_model_name_or_path=self.base_model_name_or_path or getattr(trunk_config, "_name_or_path", None),
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PDTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PDTConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PDTConfig:
        """Read ``pdt_config.json`` from a sidecar directory."""
        file = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {os.fspath(path)!r}: this is not a pdt-hf sidecar directory "
                "(save one with PDTForCausalLM.save_pretrained)."
            )
        with open(file, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file} is not valid JSON ({err}); re-save the sidecar.") from None
        return cls.from_dict(data)
