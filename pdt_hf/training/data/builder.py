"""``pdt data build``: prompts -> teacher plans and sections -> per-stream examples in Parquet shards.

Design decisions:
- Split by prompt first (``sources.split_prompts``), then build each split in shards of ``shard_size``
  prompts. A shard is written to a temporary file and moved into place, so an interrupted build leaves only
  whole shards; a rerun skips the shards that exist. The manifest (``pdt_dataset.json``) pins everything a
  shard depends on; rerunning into the same directory with a different build config is an error.
- Per prompt: the teacher writes a K-item plan; then the sections, by ``data.build.teacher_mode``:
  ``lag`` (default): round by round, block r of every section after the prompt, the plan, its own earlier
  blocks and the sibling blocks of rounds <= r - Δ as text (``generation.text_bus``; all streams of all prompts
  of a batch in one left-padded ``generate`` per round), and every target (KD, note and section states,
  sibling dependence = KL from this teacher to the isolated one) is scored in the context each block was
  written in; ``serial``: for k = 0..K-1, section k after the prompt, the plan and sections 0..k-1 (batched
  across prompts). The student's view of stream k is the chat-templated stream message split exactly as in
  decoding (shared prefix + per-stream suffix).
- After the last shard, a fixed projection from the teacher's width to d_note is fitted on the train split's
  block states (PCA, top-d_note directions, scaled to unit RMS) and saved; note targets are defined through it.
"""

from __future__ import annotations

import json
import os

import torch
from tqdm.auto import tqdm

from ...checkpoint import atomic_write, atomic_write_json
from ...generation.prompts import render_ids, split_stream_prompts, stream_message
from ...generation.text_bus import check_lag, decode_text_bus
from ..config import RecipeConfig
from ..loading import load_trunk_and_tokenizer
from ..rounds import block_bounds
from .config import SPLITS, DataBuildConfig
from .plan import coverage_labels, fallback_plan, parse_plan, plan_message, serial_message
from .schema import MANIFEST_NAME, SCHEMA_VERSION, build_key, fit_projection, save_projection, shard_path
from .sources import load_prompts, prompt_id, split_prompts
from .teacher import Teacher

__all__ = ["build_dataset", "build_examples", "load_teacher", "write_lag", "write_plans", "write_serial"]


def _sampling(cfg: DataBuildConfig) -> dict[str, object]:
    return {
        "do_sample": cfg.do_sample,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "repetition_penalty": cfg.repetition_penalty,
    }


def write_plans(prompts: list[str], teacher: Teacher, num_streams: int, cfg: DataBuildConfig, seed: int):
    """``(plans, plan sources)``: the teacher's K-item plan per prompt, or a fallback (``plan.fallback_plan``)."""
    tok = teacher.tokenizer
    raw = teacher.generate(
        [render_ids(tok, plan_message(p, num_streams)) for p in prompts],
        cfg.plan_max_tokens,
        seed=seed,
        **_sampling(cfg),
    )
    plans, sources = [], []
    for prompt, ids in zip(prompts, raw):
        plan = parse_plan(tok.decode(ids, skip_special_tokens=True), num_streams)
        plan, source = (plan, "teacher") if plan is not None else fallback_plan(prompt, num_streams)
        plans.append(plan)
        sources.append(source)
    return plans, sources


def write_serial(prompts: list[str], plans: list[list[str]], teacher: Teacher, cfg: DataBuildConfig, seed: int):
    """Serial sections ``[P][K][S]``: section k written after the prompt, the plan and sections 0..k-1."""
    tok = teacher.tokenizer
    sections: list[list[list[int]]] = [[] for _ in prompts]
    texts: list[list[str]] = [[] for _ in prompts]
    contexts: list[list[list[int]]] = [[] for _ in prompts]
    for k in range(len(plans[0])):
        batch = [render_ids(tok, serial_message(p, plans[i], k, texts[i])) for i, p in enumerate(prompts)]
        written = teacher.generate(batch, cfg.section_max_tokens, seed=seed + 1 + k, **_sampling(cfg))
        for i, ids in enumerate(written):
            sections[i].append(ids)
            texts[i].append(tok.decode(ids, skip_special_tokens=True))
            contexts[i].append(batch[i])
    return sections, contexts


def write_lag(
    prompts: list[str],
    plans: list[list[str]],
    teacher: Teacher,
    cfg: DataBuildConfig,
    block_size: int,
    lag: int,
    seed: int,
):
    """Lag-consistent sections ``[P][K][S]`` and their per-round contexts ``[P][K][nb]`` (``text_bus``)."""

    def generate(rows: list[list[int]], max_new_tokens: int, round_: int) -> list[list[int]]:
        return teacher.generate(rows, max_new_tokens, seed=seed + round_, **_sampling(cfg))

    result = decode_text_bus(
        generate,
        teacher.tokenizer,
        list(zip(prompts, plans)),
        block_size,
        lag,
        cfg.section_max_tokens,
        teacher.eos_ids,
    )
    return result.sections, result.contexts


def _flat(nested: list[list]) -> list:
    return [x for row in nested for x in row]


def _unflat(flat: list, like: list[list]) -> list[list]:
    out, i = [], 0
    for row in like:
        out.append(flat[i : i + len(row)])
        i += len(row)
    return out


def build_examples(
    prompts: list[str],
    teacher: Teacher,
    student_tokenizer: object,
    num_streams: int,
    block_size: int,
    cfg: DataBuildConfig,
    fingerprint: dict,
    seed: int,
    note_lag: int = 1,
) -> list[dict]:
    """Examples (one dict per prompt, K streams each) for a batch of prompts, from ``cfg.teacher_mode``'s teacher."""
    k_streams, tok = num_streams, teacher.tokenizer
    plans, sources = write_plans(prompts, teacher, k_streams, cfg, seed)
    scores, dependence = [[] for _ in prompts], [[] for _ in prompts]
    own = [[render_ids(tok, stream_message(p, plans[i], item)) for item in plans[i]] for i, p in enumerate(prompts)]
    if cfg.teacher_mode == "lag":
        sections, contexts = write_lag(prompts, plans, teacher, cfg, block_size, note_lag, seed)
        flat_sections = _flat(sections)
        flat_scores = teacher.score_rounds(_flat(contexts), flat_sections, cfg.top_k, block_size, cfg.batch_size)
        flat_dep = teacher.dependence(_flat(own), flat_sections, flat_scores)
        scores, dependence = _unflat(flat_scores, sections), _unflat(flat_dep, sections)
    else:
        sections, contexts = write_serial(prompts, plans, teacher, cfg, seed)
        for k in range(k_streams):
            written = [sections[i][k] for i in range(len(prompts))]
            batch_scores = teacher.score([contexts[i][k] for i in range(len(prompts))], written, cfg.top_k, block_size)
            if k == 0:
                batch_dep = [[0.0] * len(ids) for ids in written]
            else:
                batch_dep = teacher.dependence([own[i][k] for i in range(len(prompts))], written, batch_scores)
            for i in range(len(prompts)):
                scores[i].append(batch_scores[i])
                dependence[i].append(batch_dep[i])
    examples = []
    for i, prompt in enumerate(prompts):
        stream_ids = [render_ids(student_tokenizer, stream_message(prompt, plans[i], item)) for item in plans[i]]
        prefix, suffixes = split_stream_prompts(stream_ids)
        bounds = [block_bounds(len(s), block_size) for s in sections[i]]
        coverage = [
            coverage_labels(
                [tok.decode(sec[b[r] : b[r + 1]], skip_special_tokens=True) for r in range(len(b) - 1)],
                plans[i],
                k,
                cfg.coverage_min_overlap,
            )
            for k, (sec, b) in enumerate(zip(sections[i], bounds))
        ]
        examples.append(
            {
                "prompt_id": prompt_id(prompt),
                "prompt": prompt,
                "plan": plans[i],
                "plan_source": sources[i],
                "prefix_ids": prefix,
                "suffix_ids": suffixes,
                "section_ids": sections[i],
                "block_bounds": bounds,
                "note_targets": [s.block_states for s in scores[i]],
                "section_targets": [s.section_state for s in scores[i]],
                "kd_ids": [s.topk_ids for s in scores[i]],
                "kd_logprobs": [s.topk_logprobs for s in scores[i]],
                "sibling_dependence": dependence[i],
                "coverage": coverage,
                "schema_version": SCHEMA_VERSION,
                "trunk_fingerprint": json.dumps(fingerprint, sort_keys=True),
            }
        )
    return examples


def _write_shard(path: str, rows: list[dict]) -> None:
    import datasets

    atomic_write(path, lambda tmp: datasets.Dataset.from_list(rows).to_parquet(tmp))


def _check_manifest(directory: str, manifest: dict) -> None:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        old = json.load(handle)
    for key, value in manifest["build_key"].items():
        if old.get("build_key", {}).get(key) != value:
            raise ValueError(
                f"{directory} already holds a data set built with {key}={old.get('build_key', {}).get(key)!r}, "
                f"but this config has {key}={value!r}; use another data.path or delete {directory}."
            )


def load_teacher(recipe: RecipeConfig):
    """``(teacher, student tokenizer, trunk name, resolved PDTConfig)``; teacher: data.build.teacher or the trunk."""
    cfg = recipe.data.build
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trunk, tokenizer, name = load_trunk_and_tokenizer(recipe.model, device)
    pdt = recipe.pdt.resolve(trunk.config)
    if cfg.teacher is None:
        return Teacher(trunk, tokenizer), tokenizer, name, pdt
    teacher_cfg = type(recipe.model)(name_or_path=cfg.teacher, dtype=cfg.teacher_dtype)
    teacher_model, teacher_tok, _ = load_trunk_and_tokenizer(teacher_cfg, device)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"teacher {cfg.teacher!r} and trunk {name!r} have different vocabularies; KD targets need a shared "
            "tokenizer (e.g. a larger model of the same family)."
        )
    return Teacher(teacher_model, teacher_tok), tokenizer, name, pdt


def build_dataset(recipe: RecipeConfig, progress: bool = True) -> str:
    """Build (or finish building) the data set of ``recipe`` into ``recipe.data.path``; returns the path."""
    cfg, directory = recipe.data.build, recipe.data.path
    splits = split_prompts(load_prompts(cfg), cfg)
    teacher, tokenizer, name, pdt = load_teacher(recipe)
    if cfg.teacher_mode == "lag":
        check_lag(pdt.note_lag)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "trunk_fingerprint": pdt.trunk_fingerprint,
        "base_model_name_or_path": name,
        "teacher": cfg.teacher or name,
        "teacher_hidden_size": int(teacher.model.config.hidden_size),
        "teacher_mode": cfg.teacher_mode,
        "build_key": build_key(cfg, pdt),
        "splits": {
            s: {"prompt_ids": [prompt_id(p) for p in splits[s]], "num_shards": -(-len(splits[s]) // cfg.shard_size)}
            for s in SPLITS
        },
        "complete": False,
    }
    _check_manifest(directory, manifest)
    os.makedirs(directory, exist_ok=True)
    atomic_write_json(os.path.join(directory, MANIFEST_NAME), manifest)
    total = sum(len(v) for v in splits.values())
    done = sum(
        min(cfg.shard_size, len(splits[s]) - i * cfg.shard_size)
        for s in SPLITS
        for i in range(manifest["splits"][s]["num_shards"])
        if os.path.exists(shard_path(directory, s, i))
    )
    bar = tqdm(total=total, initial=done, desc="pdt data build", unit="prompt", disable=not progress)
    for split in SPLITS:
        for shard in range(manifest["splits"][split]["num_shards"]):
            path = shard_path(directory, split, shard)
            if os.path.exists(path):
                continue
            prompts = splits[split][shard * cfg.shard_size : (shard + 1) * cfg.shard_size]
            rows = []
            for start in range(0, len(prompts), cfg.batch_size):
                batch = prompts[start : start + cfg.batch_size]
                bar.set_postfix(split=split, shard=shard)
                seed = cfg.seed * 1_000_003 + SPLITS.index(split) * 10_007 + shard * 101 + start
                rows.extend(
                    build_examples(
                        batch,
                        teacher,
                        tokenizer,
                        pdt.num_streams,
                        pdt.block_size,
                        cfg,
                        pdt.trunk_fingerprint,
                        seed,
                        note_lag=pdt.note_lag,
                    )
                )
                bar.update(len(batch))
            _write_shard(path, rows)
    bar.close()
    projection = fit_projection(directory, manifest["splits"]["train"]["num_shards"], pdt.d_note)
    save_projection(directory, projection)
    manifest["complete"] = True
    atomic_write_json(os.path.join(directory, MANIFEST_NAME), manifest)
    return directory
