"""``pdt calibrate-rollback``: measure the rollback gain per block, choose tau by net benefit, report, write tau.

::

    pdt calibrate-rollback [--sidecar DIR] [--split validation --limit 12] [--held-out-split test
                           --held-out-limit 12] [--rollback-cost 0.05] [--max-rollback-share 0.25]
                           [--fit-head [--fit-split train --fit-limit 60 --fit-l2 1.0]] [--write]

Design decisions:
- tau is chosen on one prompt set (``--split``) and the decision is reported on another (``--held-out-split``):
  precision/recall against "rollback pays", ECE of the score, net benefit. Splits are those of the shipped
  prompts (or of a data-set folder); a .txt/.jsonl file is cut instead: its first ``--limit`` prompts
  calibrate, the next ``--held-out-limit`` are held out.
- Each prompt set's measurements are kept under ``--out`` (``records-<set>.json`` + ``.safetensors``, the
  head's inputs); ``--reuse`` reads them back instead of decoding again when the sidecar (sha256), trunk,
  prompts and settings match, so changing the cost or the budget reruns in seconds.
- ``--fit-head`` measures a third prompt set (``--fit-split``; of a file, the prompts before the other two) and
  refits the agreement head's output layer on its gains (``training.rollback_fit``); tau is then chosen on the
  refitted scores and both heads are reported on both sets. The fit set is never the one tau is chosen on.
- ``--write`` stores tau as ``agreement_threshold`` in the sidecar's ``pdt_config.json``, written to a temporary
  file and moved into place (the file keeps its permissions); nothing else in the file changes. With
  ``--fit-head`` the refitted head replaces the head's tensors in ``sidecar.safetensors`` only when its tau is
  above 0: at tau = 0 the head is never consulted, and the sidecar keeps the head it was trained with.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time

from ..evaluation.cli import _command, _restores_threads, _set_threads

__all__ = ["add_calibrate_rollback_parser", "run_calibrate_rollback"]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _prompt_sets(args: argparse.Namespace) -> dict[str, list]:
    from ..evaluation.prompt_sets import load_eval_items

    source, k = args.prompts, args.streams
    if source is not None and not os.path.isdir(source):
        items = load_eval_items(source, k, None)
        start = args.fit_limit if args.fit_head else 0
        cut = start + args.limit
        held = items[cut : cut + args.held_out_limit]
        if not held:
            before = f"the first --fit-limit {start} and --limit {args.limit}" if start else f"the first --limit {cut}"
            raise ValueError(
                f"--prompts {source!r} holds {len(items)} prompts, none left after {before} for the held-out set; "
                "lower the limits or give more prompts."
            )
        sets = {"calibration": items[start:cut], "held_out": held}
        return {"fit": items[:start], **sets} if args.fit_head else sets
    if args.split == args.held_out_split:
        raise ValueError(f"--split and --held-out-split are both {args.split!r}; hold out another split, e.g. test.")
    if args.fit_head and args.fit_split in (args.split, args.held_out_split):
        raise ValueError(
            f"--fit-split {args.fit_split!r} is also --split or --held-out-split; fit the head on another split, "
            "e.g. --fit-split train."
        )
    sets = {
        "calibration": load_eval_items(source, k, args.limit, split=args.split),
        "held_out": load_eval_items(source, k, args.held_out_limit, split=args.held_out_split),
    }
    return {"fit": load_eval_items(source, k, args.fit_limit, split=args.fit_split), **sets} if args.fit_head else sets


def _records(model, items, key: dict, stem: str, reuse: bool, progress: bool):
    """The records of ``items``: read back from ``stem`` when ``reuse`` and ``key`` match, else measured with
    ``model()`` and saved there."""
    from .rollback_gain import RollbackGainRecords, measure_rollback_gain

    if reuse and os.path.isfile(stem + ".json") and os.path.isfile(stem + ".safetensors"):
        records = RollbackGainRecords.load(stem)
        if records.settings.get("key") == key:
            print(f"reusing {stem}.json ({len(records.blocks)} blocks)")
            return records
        print(f"{stem}.json was measured with other settings; measuring again")
    pdt = model()
    requests = [(i.prompt, i.plan) for i in items]
    records = measure_rollback_gain(pdt, pdt.tokenizer, requests, key["max_new_tokens"], progress)
    records.settings["key"] = key
    records.save(stem)
    return records


def write_threshold(sidecar_dir: str, tau: float) -> str:
    """Set ``agreement_threshold`` in ``sidecar_dir/pdt_config.json`` (validated, written atomically)."""
    from ..checkpoint import atomic_write
    from ..config import CONFIG_NAME, PDTConfig

    config = PDTConfig.from_pretrained(sidecar_dir)
    config.agreement_threshold = float(tau)
    text = PDTConfig.from_dict(config.to_dict()).to_json_string()
    path = os.path.join(sidecar_dir, CONFIG_NAME)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        shutil.copymode(path, tmp)  # the temporary file is private; keep the config's permissions

    atomic_write(path, write)
    return path


def _markdown(result: dict) -> str:
    c = result["choice"]
    lines = [
        "# pdt calibrate-rollback",
        "",
        f"- command: `{result['command']}`",
        f"- trunk: {result['model']}; sidecar: {result['sidecar']} (sha256 {result['sidecar_sha256'][:12]})",
        f"- machine: {result['machine']['cpu_count']}-core {result['machine']['cpu']}, GPU: "
        f"{result['machine']['gpu'] or 'none'}; torch {result['machine']['torch']}, "
        f"{result['machine']['torch_threads']} torch threads; {result['seconds']:.0f} s",
        f"- rollback cost {c['rollback_cost']} nats/token, budget {c['max_rollback_share']:.0%} of blocks, "
        f"min precision gain {c['min_precision_gain']}",
        f"- **tau = {c['tau']:.3f}** ({c['reason']}), agreement head {result['head']}",
    ]
    fit = result["head_fit"]
    if fit is not None:
        lines.append(
            f"- head refit on {fit['blocks']} blocks ({fit['paying']} where rollback pays), l2 {fit['l2']}: "
            f"weighted log-loss {fit['loss_before']:.1f} -> {fit['loss_after']:.1f}; as trained, tau would be "
            f"{result['choice_as_trained']['tau']:.3f} ({result['choice_as_trained']['reason']})"
        )
    lines += [
        "",
        "| set | head | prompts | blocks | mean gain [95% CI] | identical regenerations | gain > 0 | rollback pays "
        "| tau | rolled back | mean gain rolled back | precision | recall | ECE | net benefit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    head = "refitted" if fit is not None else "as trained"
    for name, rep in result["reports"].items():
        for which, label in (("at_tau", head), ("at_candidate_tau", head), ("as_trained_at_tau", "as trained")):
            r = rep.get(which)
            if r is None or (which == "at_candidate_tau" and r["tau"] == rep["at_tau"]["tau"]):
                continue
            mean, low, high = rep["mean_gain_ci"]
            rolled = "–" if r["mean_gain_rolled_back"] is None else f"{r['mean_gain_rolled_back']:+.3f}"
            lines.append(
                f"| {name} | {label} | {r['prompts']} | {r['blocks']} | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | "
                f"{r['same_share']:.0%} | {r['gain_positive_share']:.0%} | {r['pays_share']:.0%} | {r['tau']:.3f} | "
                f"{r['rollback_share']:.0%} | {rolled} | {r['precision']:.2f} | {r['recall']:.2f} | {r['ece']:.3f} | "
                f"{r['net_benefit']:+.3f} |"
            )
    lines += [
        "",
        'AUC for "rollback pays" (0.5: no signal):',
        "",
        "| set | head | " + " | ".join(result["reports"]["held_out"]["at_tau"]["auc_pays"]) + " |",
        "|---|---|---|---|---|",
    ]
    rows = [(name, head, rep["at_tau"]["auc_pays"]) for name, rep in result["reports"].items()]
    if fit is not None:
        rows.insert(0, ("fit", head, fit["auc_pays_fit_set"]))
        rows += [(name, "as trained", rep["as_trained_at_tau"]["auc_pays"]) for name, rep in result["reports"].items()]
    for name, label, auc in rows:
        aucs = ["–" if v is None else f"{v:.2f}" for v in auc.values()]
        lines.append(f"| {name} | {label} | " + " | ".join(aucs) + " |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, records: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .calibration import net_benefit

    c = result["choice"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    grid = np.linspace(0, 1, 201)
    for (name, rec), colour in zip(records.items(), ("tab:blue", "tab:orange")):
        scores, gains = rec.array("score"), rec.array("gain")
        left.scatter(scores, gains, s=10, alpha=0.6, color=colour, label=name)
        right.plot(grid, [net_benefit(scores, gains, t, c["rollback_cost"]) / len(scores) for t in grid], color=colour)
    for axis in (left, right):
        axis.axvline(c["candidate_tau"], color="grey", ls="--", lw=1)
    left.axhline(c["rollback_cost"], color="k", lw=1)
    left.set(xlabel="agreement score", ylabel="gain, NLL(original) - NLL(regenerated)", title="per block")
    right.set(xlabel="tau", ylabel="net benefit per block", title="rollback when score < tau")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@_restores_threads
def run_calibrate_rollback(args: argparse.Namespace) -> int:
    """Measure both prompt sets, choose tau, write ``rollback.json``, ``rollback.md``, ``rollback.png``."""
    from ..config import PDTConfig
    from ..evaluation.report import write_json
    from ..evaluation.runtime import load_model, machine_info
    from ..evaluation.stats import ratio_ci
    from ..generation.cli import shipped_sidecar
    from .calibration import choose_rollback_threshold
    from .config import CalibrationConfig
    from .rollback_gain import decision_report

    cal = CalibrationConfig(
        rollback_cost=args.rollback_cost,
        max_rollback_share=args.max_rollback_share,
        min_precision_gain=args.min_precision_gain,
    )
    sidecar_dir = args.sidecar if args.sidecar is not None else (shipped_sidecar() if args.model is None else None)
    if args.write and sidecar_dir is None:
        raise ValueError(
            "--write needs a sidecar to write tau into; pass --sidecar DIR (a folder with pdt_config.json)."
        )
    if args.fit_head and sidecar_dir is None:
        raise ValueError("--fit-head refits a trained agreement head; pass --sidecar DIR (a folder with weights).")
    start = time.perf_counter()
    _set_threads(args.threads)
    machine = machine_info()
    sets = _prompt_sets(args)
    shipped = args.sidecar is None and args.model is None and sidecar_dir is not None
    label = f"shipped ({os.path.basename(sidecar_dir)})" if shipped else (args.sidecar or "untrained")
    sha = _sha256(os.path.join(sidecar_dir, "sidecar.safetensors")) if sidecar_dir else "untrained"
    name = (PDTConfig.from_pretrained(sidecar_dir).base_model_name_or_path if sidecar_dir else None) or args.model
    loaded: list = []  # the model is loaded only when a prompt set has to be measured

    def model():
        if not loaded:
            loaded.append(load_model(args.model, args.sidecar, args.seed, num_streams=args.streams)[0])
        return loaded[0]

    os.makedirs(args.out, exist_ok=True)
    records = {}
    for which, items in sets.items():
        key = {
            "sidecar_sha256": sha,
            "model": name,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "prompts": [[i.prompt, i.plan] for i in items],
        }
        stem = os.path.join(args.out, f"records-{which}")
        records[which] = _records(model, items, key, stem, args.reuse, not args.no_progress)
        if not records[which].blocks:
            raise ValueError(f"the {which} prompts gave no judged blocks; raise --limit or --max-new-tokens.")
    head_fit, fitted = None, None
    if args.fit_head:
        from .rollback_fit import fit_agreement_head, load_agreement_head, rescore

        fit_set = records.pop("fit")
        fitted, head_fit = fit_agreement_head(
            load_agreement_head(sidecar_dir, fit_set), fit_set, cal.rollback_cost, args.fit_l2
        )
        head_fit["auc_pays_fit_set"] = decision_report(rescore(fitted, fit_set), 0.0, cal.rollback_cost)["auc_pays"]
    as_trained = records
    if fitted is not None:
        records = {which: rescore(fitted, rec) for which, rec in as_trained.items()}

    def choose(calib):
        return choose_rollback_threshold(
            calib.array("score"),
            calib.array("gain"),
            cal.rollback_cost,
            cal.max_rollback_share,
            cal.min_precision_gain,
        )

    choice = choose(records["calibration"])
    choice_as_trained = choose(as_trained["calibration"]) if fitted is not None else None
    reports = {}
    for which, rec in records.items():
        by_prompt: dict[int, list[float]] = {}
        for block in rec.blocks:
            by_prompt.setdefault(block["prompt_index"], []).append(block["gain"])
        ci = ratio_ci([sum(v) for v in by_prompt.values()], [len(v) for v in by_prompt.values()], seed=args.seed)
        reports[which] = {
            "at_tau": decision_report(rec, choice["tau"], cal.rollback_cost),
            "at_candidate_tau": decision_report(rec, choice["candidate_tau"], cal.rollback_cost),
            "mean_gain_ci": list(ci),
        }
        if choice_as_trained is not None:
            reports[which]["as_trained_at_tau"] = decision_report(
                as_trained[which], choice_as_trained["tau"], cal.rollback_cost
            )
    result = {
        "command": _command(args),
        "model": name,
        "sidecar": label,
        "sidecar_dir": sidecar_dir,
        "sidecar_sha256": sha,
        "machine": machine,
        "settings": {
            "num_streams": args.streams,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "split": args.split,
            "held_out_split": args.held_out_split,
        },
        "choice": choice,
        "head": "refitted on gain labels" if fitted is not None else "as trained",
        "choice_as_trained": choice_as_trained,
        "head_fit": head_fit,
        "reports": reports,
        "seconds": time.perf_counter() - start,
    }
    if args.write:
        result["written"] = write_threshold(sidecar_dir, choice["tau"])
        if fitted is not None and choice["tau"] > 0:
            from .rollback_fit import save_agreement_head

            result["written_head"] = save_agreement_head(sidecar_dir, fitted)
    write_json(result, os.path.join(args.out, "rollback.json"))
    markdown = _markdown(result)
    with open(os.path.join(args.out, "rollback.md"), "w", encoding="utf-8") as handle:
        handle.write(markdown)
    _plot(result, records, os.path.join(args.out, "rollback.png"))
    print(markdown)
    if args.write:
        print(f"wrote agreement_threshold = {choice['tau']:.3f} into {result['written']}")
        if "written_head" in result:
            print(f"wrote the refitted agreement head into {result['written_head']}")
        elif fitted is not None:
            print("kept the agreement head as trained: at tau = 0 the head is never consulted")
    print(f"wrote {args.out}/rollback.json, rollback.md, rollback.png and the per-block records")
    return 0


def add_calibrate_rollback_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pdt calibrate-rollback``."""
    from .config import CalibrationConfig

    defaults = CalibrationConfig()
    p = subparsers.add_parser(
        "calibrate-rollback",
        help="measure per block whether a rollback's regeneration beats the kept block; choose tau by net benefit",
        description="Decodes every prompt with rollback off, regenerates every block once as after a rollback, "
        "scores both under the lag-consistent teacher (gain = NLL(original) - NLL(regenerated)), chooses tau on "
        "--split and reports the decision on --held-out-split.",
    )
    p.add_argument("--model", default=None, help="trunk id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sidecar", default=None, help="sidecar folder (default: the shipped one for SmolLM2, if any)")
    p.add_argument("--prompts", default=None, help="data-set folder or .txt/.jsonl file (default: shipped prompts)")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"], help="tau is chosen here")
    p.add_argument("--limit", type=int, default=12, help="prompts of --split")
    p.add_argument("--held-out-split", default="test", choices=["train", "validation", "test"], help="reported here")
    p.add_argument("--held-out-limit", type=int, default=12, help="prompts of --held-out-split")
    p.add_argument("--streams", type=int, default=3, help="K, sections per answer")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per stream")
    p.add_argument("--rollback-cost", type=float, default=defaults.rollback_cost, help="nats/token a rollback costs")
    p.add_argument(
        "--max-rollback-share", type=float, default=defaults.max_rollback_share, help="most blocks tau may roll back"
    )
    p.add_argument(
        "--min-precision-gain",
        type=float,
        default=defaults.min_precision_gain,
        help="the decision's precision (Wilson lower bound) must beat the paying base rate by this much",
    )
    p.add_argument("--fit-head", action="store_true", help="refit the agreement head's output layer on gain labels")
    p.add_argument(
        "--fit-split", default="train", choices=["train", "validation", "test"], help="the head is fit here"
    )
    p.add_argument("--fit-limit", type=int, default=60, help="prompts of --fit-split")
    p.add_argument("--fit-l2", type=float, default=1.0, help="pull of the refitted output layer to the trained one")
    p.add_argument("--seed", type=int, default=0, help="seeds an untrained sidecar and the bootstrap")
    p.add_argument("--threads", default="auto", help="torch threads, or 'auto' (1 when other jobs load the cores)")
    p.add_argument("--out", default="outputs/rollback", help="output folder")
    p.add_argument("--reuse", action="store_true", help="reuse records under --out measured with the same settings")
    p.add_argument("--write", action="store_true", help="store tau in the sidecar's pdt_config.json")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_calibrate_rollback, _parser=p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry, same as ``pdt calibrate-rollback``."""
    parser = argparse.ArgumentParser(prog="pdt")
    add_calibrate_rollback_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
