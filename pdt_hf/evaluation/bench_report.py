"""Summary, markdown table and plot of ``pdt bench`` runs.

Design decisions:

- One row per (method, K). Serial and prompt-lookup rows for every K come from their long runs: the wall
  time of a row is the time until ``K * N`` tokens existed (``time_to``), so their tokens match the K-stream
  rows they are compared with. Their peak memory is that of the long run.
- Wall, TTFT, tokens/s and speedup are medians over runs with the min-max spread; step p50/p90 pool the
  steps of every run of the row. Speedup pairs runs on the same prompt and repeat: serial's time for the
  row's tokens divided by the row's wall time (``metrics.speedup``).
- Step-cost ratio ``t_K / t_1`` divides the row's step p50 by the same method's at K=1; note-bus
  overhead compares ``pdt-on`` with ``pdt-off`` at the same K (``metrics.step_cost_ratio``,
  ``metrics.note_bus_overhead``). Both are empty when their reference row was not run.
- Forwards (decode forwards of a run; empty for long runs, whose one run serves every K), tokens per forward
  (per stream, ``bench`` module docstring) and the draft acceptance rate are medians over the row's runs;
  long runs report the tokens per forward of the whole run. Acceptance is empty for methods without drafts
  under PDT's control (HF's prompt lookup does not report its proposals).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import note_bus_overhead, speedup, step_cost_ratio
from .report import save_figure

__all__ = ["bench_markdown", "plot_bench", "summarize_bench"]

_LONG = ("serial", "prompt-lookup")


def _spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": float(np.median(values)),
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "n": len(values),
    }


def _row_runs(runs: list[dict], method: str, k: int) -> list[dict]:
    """Runs of a row, each with ``wall`` and ``tokens`` for the row's K (long runs cut at ``K * N``)."""
    out = []
    for run in runs:
        if run["method"] != method:
            continue
        if method in _LONG:
            wall = run["time_to"].get(str(k))
            if wall is not None:
                out.append({**run, "wall": wall, "tokens": k * run["per_stream"], "decoded": k * run["per_stream"]})
        elif run["k"] == k:
            out.append({**run, "tokens": run["committed"]})
    return out


def summarize_bench(raw: dict) -> list[dict[str, Any]]:
    """Rows (dicts) of the bench table from ``run_bench``'s raw result."""
    settings, n = raw["settings"], raw["settings"]["max_new_tokens"]
    runs = [{**r, "per_stream": n} for r in raw["runs"]]
    serial = {(r["prompt"], r["repeat"]): r for r in runs if r["method"] == "serial"}
    rows = []
    for method in settings["methods"]:
        for k in settings["ks"]:
            selected = _row_runs(runs, method, k)
            if not selected:
                continue
            steps = [s for r in selected for s in r["steps"]]
            ratios = []
            for r in selected:
                ref = serial.get((r["prompt"], r["repeat"]))
                serial_time = ref["time_to"].get(str(k)) if ref is not None else None
                if serial_time and r["wall"] > 0:
                    ratios.append(speedup(serial_time, r["wall"]))
            rows.append(
                {
                    "method": method,
                    "k": k,
                    "tokens": k * n,
                    "sidecar": selected[0].get("sidecar"),
                    "wall": _spread([r["wall"] for r in selected]),
                    "ttft": _spread([r["ttft"] for r in selected]),
                    "first_visible": _spread([r["first_visible"] for r in selected]),
                    "step_p50": float(np.quantile(steps, 0.5)) if steps else None,
                    "step_p90": float(np.quantile(steps, 0.9)) if steps else None,
                    "aggregate_tps": _spread([r["decoded"] / r["wall"] for r in selected]),
                    "useful_tps": _spread([r["tokens"] / r["wall"] for r in selected]),
                    "speedup": _spread(ratios),
                    "rollbacks": _spread([r.get("rollbacks", 0) for r in selected]),
                    "forwards": None if method in _LONG else _spread([r.get("forwards") for r in selected]),
                    "tokens_per_forward": _spread([r.get("tokens_per_forward") for r in selected]),
                    "acceptance_rate": _spread([r.get("acceptance_rate") for r in selected]),
                    "peak_mib": _spread([r["peak_mib"] for r in selected]),
                    "run_mib": _spread(
                        [
                            r["peak_mib"] - r["start_mib"]
                            for r in selected
                            if r["peak_mib"] is not None and r["start_mib"] is not None
                        ]
                    ),
                    "memory_kind": selected[0].get("memory_kind"),
                    "runs": len(selected),
                }
            )
    p50 = {(r["method"], r["k"]): r["step_p50"] for r in rows}
    for row in rows:
        base = p50.get((row["method"], 1))
        row["step_cost_ratio"] = (
            step_cost_ratio(row["step_p50"], base) if row["method"] not in _LONG and base and row["step_p50"] else None
        )
        off = p50.get(("pdt-off", row["k"]))
        row["note_bus_overhead"] = (
            note_bus_overhead(row["step_p50"], off) if row["method"] == "pdt-on" and off and row["step_p50"] else None
        )
    return rows


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _med(cell: dict | None, spec: str = ".2f", spread: bool = True) -> str:
    if cell is None:
        return "–"
    text = format(cell["median"], spec)
    return f"{text} [{format(cell['min'], spec)}–{format(cell['max'], spec)}]" if spread and cell["n"] > 1 else text


def bench_markdown(rows: list[dict], header: str = "") -> str:
    """The bench table as GitHub markdown (medians, [min–max] over runs)."""
    lines = [header] if header else []
    lines += [
        "| method | K | tokens | sidecar | wall s | TTFT s | first text s | step p50 / p90 ms | aggregate tok/s "
        "| useful tok/s | speedup vs serial | t_K/t_1 | bus overhead | rollbacks | forwards | tok/fwd | accepted "
        "| peak MiB (+run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = f"{_fmt(r['step_p50'] and 1000 * r['step_p50'], '.1f')} / {_fmt(r['step_p90'] and 1000 * r['step_p90'], '.1f')}"
        overhead = None if r["note_bus_overhead"] is None else 100 * r["note_bus_overhead"]
        accepted = r.get("acceptance_rate")
        accepted = "–" if accepted is None else f"{100 * accepted['median']:.0f}%"
        lines.append(
            f"| {r['method']} | {r['k']} | {r['tokens']} | {r['sidecar'] or '–'} | {_med(r['wall'])} | "
            f"{_med(r['ttft'], '.3f', False)} | {_med(r['first_visible'], '.3f', False)} | {steps} | "
            f"{_med(r['aggregate_tps'], '.1f', False)} | {_med(r['useful_tps'], '.1f')} | {_med(r['speedup'])} | "
            f"{_fmt(r['step_cost_ratio'])} | {_fmt(overhead, '+.1f') + ('%' if overhead is not None else '')} | "
            f"{_med(r['rollbacks'], '.0f', False)} | {_med(r.get('forwards'), '.0f', False)} | "
            f"{_med(r.get('tokens_per_forward'), '.2f', False)} | {accepted} | "
            f"{_med(r['peak_mib'], '.0f', False)} (+{_med(r['run_mib'], '.0f', False)}) |"
        )
    return "\n".join(lines) + "\n"


def plot_bench(rows: list[dict], path: str, title: str = "") -> str:
    """Useful tokens/s and speedup vs serial against K (medians, min-max bars); writes ``path`` (PNG).

    Rows run on an untrained sidecar (K above the sidecar's streams) get hollow markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == method and r["useful_tps"] is not None]
        if not sub:
            continue
        ks = [r["k"] for r in sub]
        for axis, key in ((left, "useful_tps"), (right, "speedup")):
            cells = [r[key] for r in sub]
            if any(c is None for c in cells):
                continue
            med = np.array([c["median"] for c in cells])
            err = np.array([[m - c["min"] for m, c in zip(med, cells)], [c["max"] - m for m, c in zip(med, cells)]])
            line = axis.errorbar(ks, med, yerr=err, marker="o", capsize=3, label=method)[0]
            hollow = [i for i, r in enumerate(sub) if str(r.get("sidecar") or "").startswith("untrained (speed")]
            if hollow:
                axis.plot([ks[i] for i in hollow], med[hollow], "o", ms=8, mfc="white", mec=line.get_color(), zorder=5)
    left.set(xlabel="K (streams)", ylabel="useful (committed) tokens / s", title="throughput")
    right.set(xlabel="K (streams)", ylabel="serial time / method time (same tokens)", title="speedup vs serial")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    for axis in (left, right):
        axis.set_xticks(sorted({r["k"] for r in rows}))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if any(str(r.get("sidecar") or "").startswith("untrained (speed") for r in rows):
        title = f"{title}\nhollow markers: K above the sidecar's streams, untrained sidecar, no rollbacks (speed only)"
    return save_figure(fig, path, title, dpi=120)
