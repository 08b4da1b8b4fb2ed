"""The curriculum loop: stages in order, each with its own optimizer and its own accelerate (DDP) wrapping.

Design decisions:
- At each stage boundary only the stage's families keep ``requires_grad``; the optimizer and the accelerate
  wrapping are rebuilt (``accelerator.free_memory()`` then ``prepare``), so DDP registers exactly the
  parameters that receive gradients in that stage and never needs ``find_unused_parameters``.
- Data order is a pure function of the seed and a global example cursor (one seeded permutation per epoch);
  rank r takes its slice of every global batch. A checkpoint stores the cursor, so a resumed run sees the
  same examples in the same order as an uninterrupted one.
- The LR schedule (linear warmup, cosine to 10%) is stepped once per optimizer step, independent of the
  number of processes.
- After the last stage, rank 0 calibrates tau on the validation split, writes the sidecar (with tau in its
  config), the evaluation report, ``summary.json`` and a PNG of the loss curves.
- A run with a synthesis stage loads the teacher's conclusions next to the train split (``data.synthesis``,
  a clear error when ``pdt data synthesis`` has not run) and reports, per split, the synthesis stream's KD
  with every note, with no note, and of the bare trunk on the same rows. ``train.init_sidecar`` starts from a
  trained sidecar, so a run of the synthesis stage alone trains only the new slot.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from tqdm.auto import tqdm

from ..checkpoint import atomic_write_json
from ..trunk.compat import enable_checkpointing
from .batch import collate
from .calibration import agreement_report, ceiling_closed, choose_threshold, evaluate_split, rollback_pays
from .checkpointing import TrainerState, latest_checkpoint, load_checkpoint, rng_tensors, save_checkpoint
from .config import RecipeConfig
from .curriculum import SYNTHESIS_LOSSES, StageConfig, param_groups, set_trainable
from .data.schema import check_compatible, load_manifest, load_projection, load_split
from .data.synthesis import load_synthesis
from .loading import load_pdt_model, load_trunk_and_tokenizer, reuse_prefix_kv
from .metrics import MetricsLogger, plot_losses
from .notes import check_window
from .objective import PDTObjective

__all__ = ["example_order", "state_digest", "train"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state_dict (names, dtypes, shapes, bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def example_order(cursor: int, count: int, num_examples: int, seed: int) -> list[int]:
    """Indices of the ``count`` examples after global position ``cursor`` (a fresh permutation per epoch)."""
    perms: dict[int, list[int]] = {}
    out = []
    for g in range(cursor, cursor + count):
        epoch, pos = divmod(g, num_examples)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 7919 + epoch)
            perms[epoch] = torch.randperm(num_examples, generator=gen).tolist()
        out.append(perms[epoch][pos])
    return out


def gate_readings(sidecar) -> dict[str, float]:
    """The SNC gates at this step: largest ``|tanh(alpha)|`` and, when they train, their largest |gradient|."""
    layers = sidecar.snc_layers
    if not layers:
        return {}
    out = {"gate_max": max(abs(math.tanh(float(layer.gate.detach()))) for layer in layers)}
    grads = [layer.gate.grad for layer in layers if layer.gate.grad is not None]
    if grads:
        out["gate_grad_max"] = max(float(g.abs()) for g in grads)
    return out


def _schedule(stage: StageConfig):
    def factor(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        span = max(stage.steps - stage.warmup_steps, 1)
        progress = min(max(step - stage.warmup_steps, 0) / span, 1.0)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train(recipe: RecipeConfig, resume: bool = False) -> dict:
    """Run the recipe's curriculum (optionally resuming), calibrate tau, save the sidecar; returns the summary."""
    start = time.time()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(
            f"recipes/train.py does not support {accelerator.distributed_type.value}: the module it wraps holds only "
            "the sidecar, which is small, and stages re-wrap it at every boundary. Launch with "
            "recipes/accelerate/ddp.yaml (one full trunk copy per rank, 4-bit if needed)."
        )
    loop, pdt_cfg = recipe.train, recipe.pdt
    if loop.batch_size % (world * loop.micro_batch_size):
        raise ValueError(
            f"train.batch_size={loop.batch_size} must be a multiple of processes ({world}) x "
            f"train.micro_batch_size ({loop.micro_batch_size})."
        )
    _seed_everything(loop.seed)
    trunk, tokenizer, name = load_trunk_and_tokenizer(recipe.model, accelerator.device)
    if recipe.model.gradient_checkpointing:
        enable_checkpointing(trunk, {"use_reentrant": False})
        trunk.train()  # checkpointing is only active in train mode; the trunk's weights stay frozen
    trunk_before = state_digest(trunk)
    model = load_pdt_model(trunk, pdt_cfg, name, recipe.model.revision, loop.sidecar_dtype)
    if loop.init_sidecar is not None:
        model.load_sidecar(loop.init_sidecar, add_synthesis=model.pdt_config.synthesis)
    cfg = model.pdt_config
    manifest = load_manifest(recipe.data.path)
    check_compatible(manifest, cfg, recipe.data.path)
    check_window(
        cfg.num_streams,
        -(-manifest["build_key"]["section_max_tokens"] // cfg.block_size),
        cfg.note_window,
        cfg.read_own_notes,
        cfg.notes_per_block,
    )
    projection = load_projection(recipe.data.path)
    train_set = load_split(recipe.data.path, "train", manifest)
    synthesis = any(set(s.losses) & set(SYNTHESIS_LOSSES) for s in recipe.stages)
    if synthesis:
        train_set = load_synthesis(recipe.data.path, "train", manifest, train_set)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    objective = PDTObjective(model, loop, reuse_prefix_kv(recipe.model, trunk.config), pad_id)

    def make_batch(examples: list[dict]):
        joined = "conclusion_ids" in examples[0]
        batch = collate(examples, projection, cfg.num_streams, cfg.block_size, pad_id, synthesis=joined)
        return batch.to(accelerator.device)

    root = os.path.join(loop.output_dir, "checkpoints")
    state, opt_state, sched_state = TrainerState(), None, None
    if resume:
        path = latest_checkpoint(root)
        if path is None:
            accelerator.print(f"no checkpoint under {root}; starting from step 0")
        else:
            state, sidecar_sd, opt_state, sched_state, _ = load_checkpoint(path, recipe.resume_key(), rank)
            model.sidecar.load_state_dict(sidecar_sd)
            accelerator.print(f"resuming from {path} (step {state.global_step})")
    logger = MetricsLogger(loop.output_dir, loop.tensorboard, state.global_step if resume else None) if main else None
    stages = recipe.stages
    bar = tqdm(
        total=sum(s.steps for s in stages),
        initial=state.global_step,
        desc="pdt train",
        disable=not (loop.progress and main),
    )
    per_rank = loop.batch_size // world
    for index in range(state.stage_index, len(stages)):
        stage = stages[index]
        params = set_trainable(model.sidecar, stage.trainable)
        optimizer = torch.optim.AdamW(
            param_groups(model.sidecar, params, stage.lr, stage.gate_lr_scale),
            lr=stage.lr,
            weight_decay=loop.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(stage))
        if opt_state is not None and state.stage_step > 0:
            optimizer.load_state_dict(opt_state)
            scheduler.load_state_dict(sched_state)
        opt_state = sched_state = None
        wrapped, optimizer = accelerator.prepare(objective, optimizer)
        wrapped.train()
        for _ in range(state.stage_step, stage.steps):
            tic = time.time()
            order = example_order(state.cursor + rank * per_rank, per_rank, len(train_set), loop.seed)
            micro = [order[i : i + loop.micro_batch_size] for i in range(0, per_rank, loop.micro_batch_size)]
            sums: dict[str, torch.Tensor] = {}
            for i, chunk in enumerate(micro):
                batch = make_batch([train_set[j] for j in chunk])
                sync = accelerator.no_sync(wrapped) if i < len(micro) - 1 else _null()
                with sync:
                    out = wrapped(batch, stage.losses, stage.notes_visible, stage.note_grad)
                    accelerator.backward(out["loss"] / len(micro))
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() / len(micro)
            if loop.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, loop.max_grad_norm)
            gates = gate_readings(model.sidecar)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            keys = sorted(sums)
            means = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="mean").tolist()
            values = dict(zip(keys, means))
            values["lr"] = scheduler.get_last_lr()[0]
            values.update(gates)
            values["step_seconds"] = time.time() - tic
            state.stage_step += 1
            state.global_step += 1
            state.cursor += loop.batch_size
            if main:
                logger.log(state.global_step, stage.name, values)
                bar.set_postfix(stage=stage.name, loss=f"{values['loss']:.4f}")
                bar.update(1)
            last = state.stage_step == stage.steps
            if last:
                state.stage_index, state.stage_step = index + 1, 0
            if state.global_step % loop.save_every == 0 or last:
                _save(accelerator, root, state, model, optimizer, scheduler, recipe)
        del wrapped, optimizer, out
        accelerator.free_memory()  # drops accelerate's references; the next stage wraps afresh
        state.stage_index, state.stage_step = index + 1, 0
    bar.close()
    model.sidecar.requires_grad_(False)
    digests = gather_object([state_digest(model.sidecar)])
    summary: dict = {}
    if main:
        summary = _finish(recipe, objective, model, manifest, make_batch, logger, start, world, digests)
        if synthesis:
            summary["synthesis"] = _synthesis_report(recipe, objective, model, manifest, make_batch)
        summary["trunk_unchanged"] = state_digest(trunk) == trunk_before
        summary["trunk_sha256"] = trunk_before
        atomic_write_json(os.path.join(loop.output_dir, "summary.json"), summary)
    accelerator.wait_for_everyone()
    if not main:
        with open(os.path.join(loop.output_dir, "summary.json"), encoding="utf-8") as handle:
            summary = json.load(handle)
    if not summary["trunk_unchanged"]:
        raise RuntimeError("the trunk's weights changed during training; this is a bug in pdt-hf.")
    return summary


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _save(accelerator, root, state, model, optimizer, scheduler, recipe) -> None:
    rngs = gather_object([rng_tensors()])
    if accelerator.is_main_process:
        save_checkpoint(
            root,
            state,
            model.sidecar.state_dict(),
            optimizer.state_dict(),
            scheduler.state_dict(),
            recipe.resume_key(),
            rngs,
            recipe.train.keep_checkpoints,
        )
        print(f"checkpoint step {state.global_step}", flush=True)
    accelerator.wait_for_everyone()


@torch.no_grad()
def _synthesis_report(recipe, objective, model, manifest, make_batch, chunk: int = 4) -> dict:
    """Per report split: the synthesis stream's token-mean KD/LM to the teacher's conclusion reading every note,
    reading none, and the bare trunk on the same rows (the reachable reference of the slot)."""
    cal, report = recipe.calibration, {}
    for split in dict.fromkeys([cal.split, *cal.report_splits]):
        if manifest["splits"][split]["num_shards"] == 0:
            continue
        data = load_synthesis(recipe.data.path, split, manifest, load_split(recipe.data.path, split, manifest))
        count = len(data) if cal.max_examples is None else min(len(data), cal.max_examples)
        sums, tokens = {}, 0.0
        for first in range(0, count, chunk):
            batch = make_batch([data[i] for i in range(first, min(first + chunk, count))])
            mask = (batch.synthesis_labels != -100).float()
            variants = {
                "notes": objective.synthesis_notes(batch),
                "no_notes": objective.synthesis_notes(batch, drop=True),
            }
            for name, notes in variants.items():
                kd, lm = objective.synthesis_token_losses(batch, notes)
                sums[f"kd_{name}"] = sums.get(f"kd_{name}", 0.0) + float((kd * mask).sum())
                sums[f"lm_{name}"] = sums.get(f"lm_{name}", 0.0) + float((lm * mask).sum())
            with model.disable_sidecars():
                kd, lm = objective.synthesis_token_losses(batch, None)
            sums["kd_bare_trunk"] = sums.get("kd_bare_trunk", 0.0) + float((kd * mask).sum())
            sums["lm_bare_trunk"] = sums.get("lm_bare_trunk", 0.0) + float((lm * mask).sum())
            tokens += float(mask.sum())
        report[split] = {k: v / max(tokens, 1.0) for k, v in sums.items()} | {"tokens": tokens, "examples": count}
    return report


def _finish(recipe, objective, model, manifest, make_batch, logger, start, world, digests) -> dict:
    """Calibrate tau, evaluate, save the sidecar and the plot (rank 0)."""
    loop, cal = recipe.train, recipe.calibration
    trained = time.time()
    reports = {}
    for split in dict.fromkeys([cal.split, *cal.report_splits]):
        if manifest["splits"][split]["num_shards"] == 0:
            continue
        data = load_split(recipe.data.path, split, manifest)
        count = len(data) if cal.max_examples is None else min(len(data), cal.max_examples)
        reports[split] = evaluate_split(objective, [data[i] for i in range(count)], make_batch)
    if cal.split not in reports:
        raise ValueError(f"calibration split {cal.split!r} is empty; give it prompts (data.build.max_prompts).")
    for split, rep in reports.items():
        data = load_split(recipe.data.path, split, manifest)
        count = len(data) if cal.max_examples is None else min(len(data), cal.max_examples)
        with model.disable_sidecars():  # reference: the bare trunk reading its own stream prompt
            bare = evaluate_split(objective, [data[i] for i in range(count)], make_batch)
        rep["kd_bare_trunk"], rep["lm_bare_trunk"] = bare["kd_notes"], bare["lm_notes"]
        rep["ceiling_closed"] = ceiling_closed(rep, bare, loop.seed)
    cal_scores, cal_labels = reports[cal.split]["agreement_scores"], reports[cal.split]["agreement_labels"]
    chosen = choose_threshold(cal_scores, cal_labels, cal.objective)
    decision = rollback_pays(agreement_report(cal_scores, cal_labels, chosen), cal.min_precision_gain)
    tau = chosen if decision["pays"] else 0.0
    if not decision["pays"]:
        print(
            f"calibration: the agreement head's rollbacks do not pay on {cal.split} (precision lower bound "
            f"{decision['precision_low']:.3f} vs divergent base rate {decision['base_rate']:.3f}, needed a gain of "
            f"{cal.min_precision_gain}); writing agreement_threshold = 0 (rollback off) instead of {chosen:.3f}."
        )
    model.pdt_config.agreement_threshold = tau
    model.save_pretrained(os.path.join(loop.output_dir, "sidecar"))
    evaluation = {}
    for split, rep in reports.items():
        scores, labels = rep.pop("agreement_scores"), rep.pop("agreement_labels")
        divergence = rep.pop("block_divergence")
        rep.pop("per_example")
        rep["agreement"] = agreement_report(scores, labels, tau)
        rep["block_divergence_median"] = float(divergence.median()) if divergence.numel() else 0.0
        evaluation[split] = rep
    logger.close()
    plot_losses(logger.path, os.path.join(loop.output_dir, "loss_curves.png"))
    return {
        "world_size": world,
        "sidecar_sha256_per_rank": digests,
        "agreement_threshold": tau,
        "rollback_decision": {**decision, "chosen_tau": chosen},
        "evaluation": evaluation,
        "train_examples": len(manifest["splits"]["train"]["prompt_ids"]),
        "steps": {s.name: s.steps for s in recipe.stages},
        "wall_seconds": {"train": trained - start, "calibration": time.time() - trained},
    }
