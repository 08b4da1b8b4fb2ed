"""Layout of a built data set, the note-target projection, and loading with compatibility checks.

A data directory holds::

    pdt_dataset.json                 manifest: schema version, trunk fingerprint, build key, split prompt ids
    note_projection.safetensors      mean [d_t], basis [d_t, d_note], scale []: teacher state -> note target
    train/shard-00000.parquet ...    one row per prompt (columns in EXAMPLE_COLUMNS)
    validation/... test/...

Note targets are defined as ``((h - mean) @ basis) / scale`` for a teacher block state ``h`` ``[d_t]``: the
top-d_note principal directions of the train split's block states, scaled so targets have unit RMS. The
projection is fixed (not learned), so the alignment loss cannot be lowered by shrinking both sides.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import torch
from safetensors.torch import load_file, save_file

from ...checkpoint import atomic_write
from ...config import PDTConfig
from .config import SPLITS, DataBuildConfig

__all__ = [
    "EXAMPLE_COLUMNS",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "DatasetMismatchError",
    "NoteProjection",
    "build_key",
    "check_compatible",
    "fit_projection",
    "load_manifest",
    "load_projection",
    "load_split",
    "save_projection",
    "shard_path",
]

SCHEMA_VERSION = 2
MANIFEST_NAME = "pdt_dataset.json"
PROJECTION_NAME = "note_projection.safetensors"
EXAMPLE_COLUMNS = (
    "prompt_id",
    "prompt",
    "plan",
    "plan_source",
    "prefix_ids",
    "suffix_ids",
    "section_ids",
    "block_bounds",
    "note_targets",
    "section_targets",
    "kd_ids",
    "kd_logprobs",
    "sibling_dependence",
    "coverage",
    "schema_version",
    "trunk_fingerprint",
)


class DatasetMismatchError(ValueError):
    """A built data set does not fit this pdt-hf, this trunk or this sidecar config."""


def shard_path(directory: str, split: str, index: int) -> str:
    return os.path.join(directory, split, f"shard-{index:05d}.parquet")


def build_key(cfg: DataBuildConfig, pdt: PDTConfig) -> dict:
    """Everything a shard's content depends on (compared when a build resumes), ``teacher_mode`` included."""
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"}
    key.update(
        schema_version=SCHEMA_VERSION,
        num_streams=pdt.num_streams,
        block_size=pdt.block_size,
        d_note=pdt.d_note,
        trunk_fingerprint=pdt.trunk_fingerprint,
    )
    if cfg.teacher_mode == "lag":  # the lag teacher's contexts depend on Δ; the serial teacher's do not
        key["note_lag"] = pdt.note_lag
    return json.loads(json.dumps(key, sort_keys=True))


@dataclasses.dataclass
class NoteProjection:
    """Fixed map from teacher states ``[..., d_t]`` to note targets ``[..., d_note]``."""

    mean: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        states = states.to(self.basis.dtype)
        return (states - self.mean.to(states.device)) @ self.basis.to(states.device) / self.scale.to(states.device)

    @property
    def d_note(self) -> int:
        return self.basis.shape[1]


def fit_projection(directory: str, num_train_shards: int, d_note: int) -> NoteProjection:
    """PCA of the train split's block states (blocks with a state) -> :class:`NoteProjection`."""
    import datasets

    files = [shard_path(directory, "train", i) for i in range(num_train_shards)]
    ds = datasets.Dataset.from_parquet(files)
    states = [
        torch.tensor(block, dtype=torch.float64)
        for example in ds["note_targets"]
        for stream in example
        for block in stream
    ]
    states = [s for s in states if bool(s.abs().sum() > 0)]
    if not states:
        raise ValueError(f"the train split in {directory} has no block with a teacher state; build more prompts.")
    x = torch.stack(states)  # [n, d_t]
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(x.shape[0] - 1, 1)  # [d_t, d_t]
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigvals, descending=True)
    keep = order[: min(d_note, x.shape[1])]
    basis = torch.zeros(x.shape[1], d_note, dtype=torch.float64)
    basis[:, : keep.numel()] = eigvecs[:, keep]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))  # [1, d_note]
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    scale = (eigvals[keep].clamp(min=0).sum() / d_note).sqrt().clamp(min=1e-6)
    return NoteProjection(mean=mean.float(), basis=basis.float(), scale=scale.float())


def save_projection(directory: str, projection: NoteProjection) -> None:
    tensors = {"mean": projection.mean, "basis": projection.basis, "scale": projection.scale.reshape(1)}
    atomic_write(os.path.join(directory, PROJECTION_NAME), lambda tmp: save_file(tensors, tmp))


def load_projection(directory: str) -> NoteProjection:
    tensors = load_file(os.path.join(directory, PROJECTION_NAME))
    return NoteProjection(mean=tensors["mean"], basis=tensors["basis"], scale=tensors["scale"].reshape(()))


def load_manifest(directory: str) -> dict:
    """Read ``pdt_dataset.json``; a missing or unfinished data set is an error with the build command."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DatasetMismatchError(
            f"no {MANIFEST_NAME} in {directory!r}: build the data set first with "
            "`pdt data build --config <recipe.yaml>`."
        )
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetMismatchError(
            f"the data set in {directory!r} has schema version {manifest.get('schema_version')!r}, but this pdt-hf "
            f"reads version {SCHEMA_VERSION}; rebuild it with `pdt data build --config <recipe.yaml>`."
        )
    if not manifest.get("complete"):
        raise DatasetMismatchError(
            f"the data set in {directory!r} is unfinished (an interrupted build); rerun `pdt data build` to resume it."
        )
    return manifest


def check_compatible(manifest: dict, pdt: PDTConfig, directory: str) -> None:
    """The data set must match the trunk fingerprint, K, B and d_note (and Δ for lag-teacher data) of the sidecar."""
    fingerprint = manifest.get("trunk_fingerprint") or {}
    for key, value in (pdt.trunk_fingerprint or {}).items():
        if fingerprint.get(key) != value:
            raise DatasetMismatchError(
                f"the data set in {directory!r} was built for a trunk with {key}={fingerprint.get(key)!r}, but this "
                f"trunk has {key}={value!r}; rebuild the data with this recipe's model."
            )
    build = manifest.get("build_key", {})
    keys = ("num_streams", "block_size", "d_note") + (("note_lag",) if build.get("teacher_mode") == "lag" else ())
    for key in keys:
        if build.get(key) != getattr(pdt, key):
            raise DatasetMismatchError(
                f"the data set in {directory!r} was built with {key}={build.get(key)!r}, but the sidecar config has "
                f"{key}={getattr(pdt, key)!r}; rebuild the data or set pdt.{key}={build.get(key)!r}."
            )


def load_split(directory: str, split: str, manifest: dict):
    """The ``datasets.Dataset`` of one split, checking every row's schema version and fingerprint."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {list(SPLITS)}.")
    num = manifest["splits"][split]["num_shards"]
    files = [shard_path(directory, split, i) for i in range(num)]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise DatasetMismatchError(f"{len(missing)} shard(s) of split {split!r} are missing, e.g. {missing[0]}.")
    if not files:
        raise DatasetMismatchError(f"split {split!r} of {directory!r} is empty; give it prompts (max_prompts).")
    extra = sorted(set(glob.glob(os.path.join(directory, split, "*.parquet"))) - set(files))
    if extra:
        raise DatasetMismatchError(f"unexpected shard(s) {extra[:3]} in {directory!r}; they belong to another build.")
    ds = datasets.Dataset.from_parquet(files)
    versions = set(ds["schema_version"])
    if versions != {SCHEMA_VERSION}:
        raise DatasetMismatchError(
            f"split {split!r} of {directory!r} holds rows with schema version(s) {sorted(versions)}; this pdt-hf "
            f"reads {SCHEMA_VERSION}. Rebuild it with `pdt data build --config <recipe.yaml>`."
        )
    expected = json.dumps(manifest["trunk_fingerprint"], sort_keys=True)
    bad = set(ds["trunk_fingerprint"]) - {expected}
    if bad:
        raise DatasetMismatchError(
            f"split {split!r} of {directory!r} holds rows built for another trunk ({sorted(bad)[0]}); "
            "rebuild the data set."
        )
    return ds
