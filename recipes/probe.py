"""Bus probe: can the Note Bus carry what only a sibling wrote? (docs/training.md, "Bus probe").

    OMP_NUM_THREADS=1 python recipes/probe.py --config recipes/configs/probe-smollm2.yaml [key=value ...]

Trains only the notes head and SNC of a K = 2 sidecar on the relay task of ``pdt_hf.training.probe``, then
decodes held-out examples with multi-stream ``generate`` (greedy, the real bus) with notes visible, zeroed and
shuffled, and scores stream 1's answer by exact match with Wilson 95% intervals. Also reports the
teacher-forced accuracy and the donor test (readers given another example's notes answer with that example's
item). Writes ``report.json``, ``probe.png`` and the trained ``sidecar/`` to ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="probe YAML, e.g. recipes/configs/probe-smollm2.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. probe.steps=50 output_dir=/tmp/p")
    return parser


def smooth(values: list[float], span: int = 20) -> list[float]:
    """Trailing moving average over ``span`` steps."""
    return [sum(values[max(0, i - span + 1) : i + 1]) / (i - max(0, i - span + 1) + 1) for i in range(len(values))]


def plot(report: dict, history: dict, path: str) -> str:
    """Training curves (loss, teacher-forced accuracy, largest gate) and decoded accuracy per setting with CIs."""
    import matplotlib

    from pdt_hf.evaluation.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curve, bars) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = range(1, len(history["loss"]) + 1)
    curve.plot(steps, smooth(history["loss"]), label="answer CE (nats)")
    curve.plot(steps, smooth(history["accuracy"]), label="train exact match")
    curve.plot(steps, history["gate"], label="max |tanh(gate)|")
    curve.set(xlabel="step", title="training (moving averages)")
    curve.legend(fontsize=8)
    names = ["visible", "zero", "shuffle"]
    acc = [report[n]["accuracy"] for n in names]
    err = [  # clamped: a Wilson bound can sit a rounding error inside an accuracy of 0 or 1
        [max(0.0, a - report[n]["ci95"][0]) for a, n in zip(acc, names)],
        [max(0.0, report[n]["ci95"][1] - a) for a, n in zip(acc, names)],
    ]
    bars.bar(names, acc, yerr=err, capsize=4, color=["tab:green", "tab:grey", "tab:grey"])
    bars.axhline(report["chance"], color="red", ls=":", label=f"chance 1/{round(1 / report['chance'])}")
    bars.set(ylim=(0, 1.05), ylabel="stream 1 exact match", title=f"decoded, {report['examples']} held-out examples")
    bars.legend(fontsize=8)
    return save_figure(fig, path, "Bus probe")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    import torch

    from pdt_hf.config import PDTConfig
    from pdt_hf.modeling import PDTForCausalLM
    from pdt_hf.training.config import ModelConfig
    from pdt_hf.training.configuration import ConfigError, apply_overrides, build_dataclass, load_yaml
    from pdt_hf.training.loading import load_trunk_and_tokenizer
    from pdt_hf.training.probe import ProbeConfig, ProbeTask, train_probe
    from pdt_hf.training.probe_decode import evaluate_probe, forced_accuracy

    data = apply_overrides(load_yaml(args.config), args.overrides)
    unknown = sorted(set(data) - {"model", "pdt", "probe", "output_dir"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown} in {args.config}; known: model, pdt, probe, output_dir.")
    probe = build_dataclass(ProbeConfig, data.get("probe"), "probe")
    out_dir = data.get("output_dir", "outputs/probe")
    tic = time.perf_counter()
    trunk, tokenizer, name = load_trunk_and_tokenizer(build_dataclass(ModelConfig, data.get("model"), "model"))
    torch.manual_seed(probe.seed)
    config = PDTConfig.from_dict(dict(data.get("pdt") or {}))
    config.base_model_name_or_path = name
    model = PDTForCausalLM(trunk, config)
    cfg = model.pdt_config
    if cfg.num_streams != 2:
        raise ConfigError(f"the probe has two streams; set pdt.num_streams=2 (got {cfg.num_streams}).")
    loaded = time.perf_counter()
    task = ProbeTask(probe, tokenizer, cfg.block_size, cfg.note_lag)
    train_set = task.split(probe.train_examples, seed=probe.seed)
    held_out = task.split(probe.eval_examples, probe.seed + 1, balanced=True, exclude={task.key(e) for e in train_set})
    history = train_probe(model, tokenizer, task, train_set, progress=True)
    trained = time.perf_counter()
    report = evaluate_probe(model, tokenizer, task, held_out)
    report["forced"] = {
        "own_notes": forced_accuracy(model, tokenizer, task, held_out),
        "donor_notes_vs_donor_item": forced_accuracy(model, tokenizer, task, held_out, donor_shift=1),
    }
    report.update(
        trunk=name,
        items=len(task.item_ids),
        train_examples=len(train_set),
        steps=probe.steps,
        batch_size=probe.batch_size,
        lr=probe.lr,
        note_grad=probe.note_grad,
        final_gate=history["gate"][-1],
        train_accuracy_last_20=sum(history["accuracy"][-20:]) / min(20, len(history["accuracy"])),
        seconds={"load": loaded - tic, "train": trained - loaded, "evaluate": time.perf_counter() - trained},
        machine={"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor()},
        command=" ".join(["python", "recipes/probe.py", *(argv if argv is not None else sys.argv[1:])]),
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(os.path.join(out_dir, "sidecar"))
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as handle:
        json.dump({**report, "history": history}, handle, indent=2)
    plot(report, history, os.path.join(out_dir, "probe.png"))
    return report


if __name__ == "__main__":
    result = main()
    for setting in ("visible", "zero", "shuffle"):
        r = result[setting]
        print(
            f"{setting:8s} {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] ({r['correct']}/{result['examples']})"
        )
    print(f"chance {result['chance']:.3f}; forced {result['forced']}; seconds {result['seconds']}")
