"""Training metrics: a long-format CSV (step, stage, name, value), TensorBoard scalars, and a PNG of loss curves.

The CSV is the source of truth. On resume, rows after the checkpoint's step are dropped before appending, so
the file reads as if the run had never been interrupted.
"""

from __future__ import annotations

import csv
import os

__all__ = ["MetricsLogger", "plot_losses", "read_metrics"]

HEADER = ["step", "stage", "name", "value"]


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics CSV with ``step`` as int and ``value`` as float."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", newline="") as handle:
        return [
            {"step": int(r["step"]), "stage": r["stage"], "name": r["name"], "value": float(r["value"])}
            for r in csv.DictReader(handle)
        ]


class MetricsLogger:
    """Appends scalars to ``metrics.csv`` and (optionally) TensorBoard under ``directory``."""

    def __init__(self, directory: str, tensorboard: bool, resume_step: int | None) -> None:
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.csv")
        rows = read_metrics(self.path) if resume_step is not None else []
        rows = [r for r in rows if r["step"] <= (resume_step or 0)]
        with open(self.path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HEADER)
            writer.writeheader()
            writer.writerows(rows)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=(resume_step or 0) + 1)

    def log(self, step: int, stage: str, values: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            for name, value in sorted(values.items()):
                writer.writerow([step, stage, name, f"{value:.9g}"])
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{stage}/{name}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _smooth(values: tuple[float, ...]) -> list[float]:
    """Exponential moving average with a span of about a tenth of the series (raw values are drawn faintly)."""
    alpha = 2.0 / (max(len(values) // 10, 1) + 1)
    out, acc = [], values[0]
    for v in values:
        acc = alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def plot_losses(csv_path: str, png_path: str, title: str = "PDT curriculum") -> str:
    """One panel per loss name (x: optimizer step; faint raw values, a moving average on top), stage boundaries
    as dashed lines; returns ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(csv_path)
    names = sorted({r["name"] for r in rows if r["name"] not in ("lr", "step_seconds")})
    cols = min(3, max(len(names), 1))
    lines = -(-max(len(names), 1) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 2.8 * lines), squeeze=False)
    starts: dict[str, int] = {}
    for r in rows:
        starts.setdefault(r["stage"], r["step"])
    for ax, name in zip(axes.flat, names):
        for stage in starts:
            pts = [(r["step"], r["value"]) for r in rows if r["name"] == name and r["stage"] == stage]
            if pts:
                steps, values = zip(*pts)
                line = ax.plot(steps, values, linewidth=0.6, alpha=0.35)[0]
                ax.plot(steps, _smooth(values), color=line.get_color(), linewidth=1.5, label=stage)
        for step in list(starts.values())[1:]:
            ax.axvline(step - 0.5, color="grey", linestyle="--", linewidth=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
