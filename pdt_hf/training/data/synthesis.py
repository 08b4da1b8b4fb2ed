"""``pdt data synthesis``: add the serial teacher's conclusion, the synthesis stream's target, to a built data set.

Layout, next to the shards of ``pdt data build`` (which stay byte-identical)::

    synthesis/pdt_synthesis.json             manifest: SYNTHESIS_VERSION, build key, base schema, complete
    synthesis/train/shard-00000.parquet ...  one row per prompt, same order as train/shard-00000.parquet
    synthesis/validation/... synthesis/test/...

Columns (``SYNTHESIS_COLUMNS``), per prompt:

    prompt_id                 the base row's (checked when the two are joined)
    synthesis_prefix_len      n: tokens of the base row's prefix_ids the student's synthesis prompt starts with
    synthesis_suffix_ids      the rest of the student's synthesis prompt (``generation.prompts.synthesis_message``)
    conclusion_ids            the teacher's conclusion, cut after its first end-of-turn token (kept)
    conclusion_kd_ids         [C][k] the teacher's top-k next tokens at each conclusion position
    conclusion_kd_logprobs    [C][k] their log-probs (the sections' KD format, ``Teacher.score``)
    synthesis_version         SYNTHESIS_VERSION

Design decisions:
- The teacher writes the conclusion serially: after the prompt, the plan and the text of all K sections of the
  row (``plan.conclusion_message``), under the synthesis stream's heading; it is then teacher-forced over the
  same context for the KD targets. The student's synthesis row reads the prompt, the heading and the notes.
- Side shards rather than new columns in the base shards: a data set built before this existed keeps loading
  for every other stage unchanged, a half-finished augmentation never breaks training, and only the synthesis
  stage asks for these files (``load_synthesis``, which names the command that makes them).
- Resumable like ``pdt data build``: a shard is written to a temporary file and moved into place, a rerun skips
  the shards that exist, and the manifest pins what they depend on (rerunning with other settings is an error).
"""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from ...checkpoint import atomic_write, atomic_write_json
from ...generation.prompts import render_ids, synthesis_message
from ...generation.synthesis import shared_prefix_length
from ..config import RecipeConfig
from .config import SPLITS
from .plan import conclusion_message
from .schema import SCHEMA_VERSION, DatasetMismatchError, load_manifest, shard_path
from .teacher import Teacher

__all__ = [
    "SYNTHESIS_COLUMNS",
    "SYNTHESIS_DIR",
    "SYNTHESIS_MANIFEST",
    "SYNTHESIS_VERSION",
    "build_synthesis",
    "load_synthesis",
    "synthesis_key",
    "synthesis_rows",
]

SYNTHESIS_VERSION = 1
SYNTHESIS_DIR = "synthesis"
SYNTHESIS_MANIFEST = "pdt_synthesis.json"
SYNTHESIS_COLUMNS = (
    "prompt_id",
    "synthesis_prefix_len",
    "synthesis_suffix_ids",
    "conclusion_ids",
    "conclusion_kd_ids",
    "conclusion_kd_logprobs",
    "synthesis_version",
)
_COMMAND = "`pdt data synthesis --config <recipe.yaml>`"


def synthesis_key(recipe: RecipeConfig, base_manifest: dict) -> dict:
    """Everything the conclusions depend on (compared when an augmentation resumes)."""
    build = recipe.data.build
    key = {
        "synthesis_version": SYNTHESIS_VERSION,
        "base_schema_version": base_manifest["schema_version"],
        "base_build_key": base_manifest["build_key"],
        "max_new_tokens": recipe.data.synthesis.max_new_tokens,
        "top_k": build.top_k,
        "teacher": build.teacher,
        "do_sample": build.do_sample,
        "temperature": build.temperature,
        "top_p": build.top_p,
        "repetition_penalty": build.repetition_penalty,
        "seed": build.seed,
    }
    return json.loads(json.dumps(key, sort_keys=True))


def synthesis_shard(directory: str, split: str, index: int) -> str:
    return shard_path(os.path.join(directory, SYNTHESIS_DIR), split, index)


def synthesis_rows(
    rows: list[dict], teacher: Teacher, student_tokenizer, recipe: RecipeConfig, block_size: int, seed: int
) -> list[dict]:
    """Conclusion rows (``SYNTHESIS_COLUMNS``) for base rows of one batch: teacher writes, then scores."""
    build, tok = recipe.data.build, teacher.tokenizer
    eos = set(teacher.eos_ids)
    texts = [
        [tok.decode([t for t in sec if t not in eos], skip_special_tokens=True) for sec in row["section_ids"]]
        for row in rows
    ]
    contexts = [render_ids(tok, conclusion_message(r["prompt"], r["plan"], t)) for r, t in zip(rows, texts)]
    torch.manual_seed(seed)
    conclusions = teacher.generate(
        contexts,
        recipe.data.synthesis.max_new_tokens,
        do_sample=build.do_sample,
        temperature=build.temperature,
        top_p=build.top_p,
        repetition_penalty=build.repetition_penalty,
        seed=seed,
    )
    scores = teacher.score(contexts, conclusions, build.top_k, block_size)
    out = []
    for row, ids, score in zip(rows, conclusions, scores):
        student = render_ids(student_tokenizer, synthesis_message(row["prompt"], row["plan"]))
        n = shared_prefix_length(list(row["prefix_ids"]), student)
        out.append(
            {
                "prompt_id": row["prompt_id"],
                "synthesis_prefix_len": n,
                "synthesis_suffix_ids": student[n:],
                "conclusion_ids": list(ids),
                "conclusion_kd_ids": score.topk_ids,
                "conclusion_kd_logprobs": score.topk_logprobs,
                "synthesis_version": SYNTHESIS_VERSION,
            }
        )
    return out


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def build_synthesis(recipe: RecipeConfig, progress: bool = True, teacher_bundle=None) -> str:
    """Write (or finish writing) the conclusion side shards of ``recipe.data.path``; returns the path.

    ``teacher_bundle``: ``(teacher, student tokenizer, name, pdt)`` as ``builder.load_teacher`` returns (tests).
    """
    import datasets

    from .builder import load_teacher

    directory = recipe.data.path
    base = load_manifest(directory)
    key = synthesis_key(recipe, base)
    manifest_path = os.path.join(directory, SYNTHESIS_DIR, SYNTHESIS_MANIFEST)
    old = _read_json(manifest_path)
    if old is not None:
        for name, value in key.items():
            if old.get("build_key", {}).get(name) != value:
                raise ValueError(
                    f"{os.path.join(directory, SYNTHESIS_DIR)} holds conclusions built with {name}="
                    f"{old.get('build_key', {}).get(name)!r}, but this config has {name}={value!r}; restore the "
                    f"setting or delete {os.path.join(directory, SYNTHESIS_DIR)} to rebuild them."
                )
    teacher, tokenizer, _, pdt = teacher_bundle if teacher_bundle is not None else load_teacher(recipe)
    manifest = {"synthesis_version": SYNTHESIS_VERSION, "build_key": key, "complete": False}
    atomic_write_json(manifest_path, manifest)
    todo = [(s, i) for s in SPLITS for i in range(base["splits"][s]["num_shards"])]
    bar = tqdm(total=len(todo), desc="pdt data synthesis", unit="shard", disable=not progress)
    for split, index in todo:
        target = synthesis_shard(directory, split, index)
        if os.path.exists(target):
            bar.update(1)
            continue
        rows = datasets.Dataset.from_parquet(shard_path(directory, split, index)).to_list()
        out: list[dict] = []
        batch = recipe.data.synthesis.batch_size
        for start in range(0, len(rows), batch):
            seed = recipe.data.build.seed * 1_000_003 + SPLITS.index(split) * 10_007 + index * 101 + start + 7
            out += synthesis_rows(rows[start : start + batch], teacher, tokenizer, recipe, pdt.block_size, seed)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        atomic_write(target, lambda tmp, out=out: datasets.Dataset.from_list(out).to_parquet(tmp))
        bar.update(1)
    bar.close()
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return directory


def load_synthesis(directory: str, split: str, manifest: dict, dataset):
    """``dataset`` (a loaded split) with the conclusion columns joined in; a clear error when they are missing."""
    meta = _read_json(os.path.join(directory, SYNTHESIS_DIR, SYNTHESIS_MANIFEST))
    if meta is None:
        raise DatasetMismatchError(
            f"the data set in {directory!r} has no conclusions, which the synthesis stage trains on; add them "
            f"with {_COMMAND} (the shards of `pdt data build` are kept as they are)."
        )
    if meta.get("synthesis_version") != SYNTHESIS_VERSION or not meta.get("complete"):
        state = "unfinished" if meta.get("synthesis_version") == SYNTHESIS_VERSION else "of another version"
        raise DatasetMismatchError(
            f"the conclusions in {os.path.join(directory, SYNTHESIS_DIR)} are {state} (version "
            f"{meta.get('synthesis_version')!r}, this pdt-hf reads {SYNTHESIS_VERSION}); rerun {_COMMAND}."
        )
    if meta["build_key"].get("base_build_key") != manifest["build_key"] or SCHEMA_VERSION != meta["build_key"].get(
        "base_schema_version"
    ):
        raise DatasetMismatchError(
            f"the conclusions in {os.path.join(directory, SYNTHESIS_DIR)} were written for another build of the "
            f"data set; delete that folder and rerun {_COMMAND}."
        )
    import datasets

    files = [synthesis_shard(directory, split, i) for i in range(manifest["splits"][split]["num_shards"])]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise DatasetMismatchError(
            f"{len(missing)} conclusion shard(s) of split {split!r} are missing; rerun {_COMMAND}."
        )
    extra = datasets.Dataset.from_parquet(files)
    if extra["prompt_id"] != dataset["prompt_id"]:
        raise DatasetMismatchError(
            f"the conclusion shards of split {split!r} do not line up with its rows (prompt ids differ); delete "
            f"{os.path.join(directory, SYNTHESIS_DIR)} and rerun {_COMMAND}."
        )
    for column in SYNTHESIS_COLUMNS[1:]:
        dataset = dataset.add_column(column, extra[column])
    return dataset
