"""Benchmark the pdt-hf kernels against their PyTorch references and against torch SDPA with a mask.

    python kernels/bench.py --out outputs/bench-kernels            # CUDA if present, else CPU
    python kernels/bench.py --out /tmp/bench --device cpu --quick

Cases (the grid of the design card's defaults and sizes around them):

- note_attention (training/prefill, forward + backward): K streams of T = 64 tokens read `notes` sibling notes.
- note_attention_decode: one query row per stream reads `notes` notes out of a 512-row note store.
- ragged_decode_attention: K streams share a prompt prefix of `prefix` tokens and own suffixes of up to 64.

Methods: `triton` (the dispatched kernel; CUDA only), `reference` (the plain PyTorch `*_ref` from the package)
and `sdpa_mask` (torch.nn.functional.scaled_dot_product_attention over the same keys with a boolean mask; for
the decode cascade this is `sdpa_with_mask_reference`, which copies the prefix into every stream).
Each timing is the median over `--repeats` runs after `--warmup` runs, with the interquartile range, and
torch.cuda.synchronize() around every run on a GPU. On a CPU the Triton kernels would only run in Triton's
interpreter, whose timings say nothing about GPU speed, so a CPU run compares the references with SDPA only.

Writes results.md (table), results.csv and results.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from pdt_kernels import (
    note_attention,
    note_attention_decode,
    note_attention_decode_ref,
    note_attention_ref,
    ragged_decode_attention,
    ragged_decode_attention_ref,
    sdpa_with_mask_reference,
    use_backend,
)
from pdt_kernels._triton import HAS_TRITON, INTERPRET
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

STREAMS = (1, 2, 4, 8)
NOTES = (0, 16, 64)
PREFIXES = (256, 2048)
METHODS = ("triton", "reference", "sdpa_mask")
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # an 8B-class trunk (Llama-3-8B / Qwen3-8B attention shape)
NOTE_HEADS, NOTE_DIM, NOTE_TOKENS, NOTE_STORE, SUFFIX_MAX = 8, 64, 64, 512, 64


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Milliseconds per call of `fn` over `repeats` calls after `warmup` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def sdpa_note_attention(q, k, v, q_round, kv_round, kv_valid, lag):
    """SDPA with the dense [N, 1, T, M] visibility mask; rows that see nothing are set to 0."""
    if k.shape[2] == 0:
        return q * 0.0  # no notes: SDPA over zero keys is not defined on every backend
    visible = (kv_valid[:, None, :] & (kv_round[:, None, :] <= q_round[:, :, None] - lag))[:, None]  # [N, 1, T, M]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)  # [N, H, T, D]
    return torch.where(visible.any(-1, keepdim=True), out, 0.0)


def sdpa_note_decode(q, k_store, v_store, indices, offsets):
    """Gather each row's notes into a padded [R, H, L, D] batch and call SDPA with a padding mask (no notes at
    all: zeros without a call)."""
    if indices.numel() == 0:
        return torch.zeros_like(q)
    counts = offsets[1:] - offsets[:-1]  # [R]
    width = int(counts.max())
    slot = torch.arange(width, device=q.device)  # [L]
    present = slot[None, :] < counts[:, None]  # [R, L]
    rows = indices[torch.where(present, offsets[:-1, None] + slot[None, :], 0)]
    k = k_store[rows].transpose(1, 2)  # [R, H, L, D]
    v = v_store[rows].transpose(1, 2)  # [R, H, L, D]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=present[:, None, None])  # [R, H, 1, D]
    return torch.where(present.any(-1)[:, None, None], out[:, :, 0], 0.0)


def note_attention_case(K: int, notes: int, device, dtype) -> dict[str, Callable[[], object]]:
    q = torch.randn(K, NOTE_HEADS, NOTE_TOKENS, NOTE_DIM, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(K, NOTE_HEADS, notes, NOTE_DIM, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(K, NOTE_HEADS, notes, NOTE_DIM, device=device, dtype=dtype, requires_grad=True)
    q_round = (torch.arange(NOTE_TOKENS, device=device) // 8).expand(K, NOTE_TOKENS)  # blocks of B = 8 tokens
    kv_round = torch.randint(0, 8, (K, notes), device=device)
    kv_valid = torch.rand(K, notes, device=device) < 0.9
    args = (q, k, v, q_round, kv_round, kv_valid, 1)

    def train_step(fn):
        def run():
            out = fn(*args)
            grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
            return out.detach(), grads

        return run

    return {
        "triton": train_step(note_attention),
        "reference": train_step(note_attention_ref),
        "sdpa_mask": train_step(sdpa_note_attention),
    }


def note_decode_case(K: int, notes: int, device, dtype) -> dict[str, Callable[[], object]]:
    q = torch.randn(K, NOTE_HEADS, NOTE_DIM, device=device, dtype=dtype)
    k_store = torch.randn(NOTE_STORE, NOTE_HEADS, NOTE_DIM, device=device, dtype=dtype)
    v_store = torch.randn(NOTE_STORE, NOTE_HEADS, NOTE_DIM, device=device, dtype=dtype)
    offsets = torch.arange(K + 1, device=device) * notes  # [K + 1], every stream reads `notes` notes
    indices = torch.randint(0, NOTE_STORE, (K * notes,), device=device)
    args = (q, k_store, v_store, indices, offsets)
    return {
        "triton": lambda: note_attention_decode(*args),
        "reference": lambda: note_attention_decode_ref(*args),
        "sdpa_mask": lambda: sdpa_note_decode(*args),
    }


def ragged_decode_case(K: int, prefix: int, device, dtype) -> dict[str, Callable[[], object]]:
    q = torch.randn(K, HEADS, HEAD_DIM, device=device, dtype=dtype)
    prefix_k = torch.randn(KV_HEADS, prefix, HEAD_DIM, device=device, dtype=dtype)
    prefix_v = torch.randn(KV_HEADS, prefix, HEAD_DIM, device=device, dtype=dtype)
    suffix_k = torch.randn(K, KV_HEADS, SUFFIX_MAX, HEAD_DIM, device=device, dtype=dtype)
    suffix_v = torch.randn(K, KV_HEADS, SUFFIX_MAX, HEAD_DIM, device=device, dtype=dtype)
    suffix_lens = torch.randint(1, SUFFIX_MAX + 1, (K,), device=device)
    args = (q, prefix_k, prefix_v, suffix_k, suffix_v, suffix_lens)
    return {
        "triton": lambda: ragged_decode_attention(*args),
        "reference": lambda: ragged_decode_attention_ref(*args),
        "sdpa_mask": lambda: sdpa_with_mask_reference(*args),
    }


def cases():
    """(kernel, K, notes, prefix, builder) for every benchmark case; '-' marks a size the kernel does not use."""
    for K in STREAMS:
        for notes in NOTES:
            yield "note_attention", K, notes, "-", lambda d, t, K=K, n=notes: note_attention_case(K, n, d, t)
        for notes in NOTES:
            yield "note_attention_decode", K, notes, "-", lambda d, t, K=K, n=notes: note_decode_case(K, n, d, t)
        for prefix in PREFIXES:
            yield "ragged_decode_attention", K, "-", prefix, lambda d, t, K=K, p=prefix: ragged_decode_case(K, p, d, t)


def first_output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    methods = METHODS if device.type == "cuda" else METHODS[1:]
    rows = []
    for kernel, K, notes, prefix, build in tqdm(list(cases()), desc="kernel benchmark", unit="case"):
        torch.manual_seed(0)
        fns = build(device, dtype)
        with use_backend("triton" if device.type == "cuda" else "reference"):
            expected = first_output(fns["reference"]()).float()
            for method in methods:
                err = (first_output(fns[method]()).float() - expected).abs().max().item() if expected.numel() else 0.0
                times = timed(fns[method], args.warmup, args.repeats, device)
                q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
                rows.append(dict(kernel=kernel, device=device.type, dtype=args.dtype, K=K, notes=notes, prefix=prefix,
                                 method=method, median_ms=statistics.median(times), p25_ms=q1, p75_ms=q3,
                                 min_ms=min(times), max_abs_diff_vs_reference=err, repeats=len(times)))  # fmt: skip
    return rows


def write_markdown(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fast = "triton" if "triton" in methods else "reference"
    n = torch.get_num_threads()
    threads = f", {n} CPU thread{'s' if n != 1 else ''}" if args.device == "cpu" else ""
    title = f"{args.device}, {args.dtype}{threads}, median of {args.repeats} runs after {args.warmup} warm-up"
    lines = [f"# Kernel benchmark ({title})", ""]
    if args.device != "cuda":
        lines += [
            "**CPU run: Triton kernels not timed.** On a CPU they only run in Triton's interpreter, whose timings say "
            "nothing about GPU speed; this table compares the PyTorch references with torch SDPA and a mask.",
            "",
        ]
    lines += [
        "Times in ms: median [25th-75th percentile]. note_attention is forward + backward; the decode kernels are "
        f"forward only. Speedup = sdpa_mask median / {fast} median. max|diff| = largest deviation of any method "
        "from the reference output.",
        "",
        "| kernel | K | notes | prefix | "
        + " | ".join(methods)
        + f" | speedup ({fast} vs sdpa_mask) | max abs diff |",
        "|---|---:|---:|---:|" + "---:|" * len(methods) + "---:|---:|",
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["K"], r["notes"], r["prefix"]), {})[r["method"]] = r
    for (kernel, K, notes, prefix), by_method in groups.items():
        cells = [f"{m['median_ms']:.3f} [{m['p25_ms']:.3f}-{m['p75_ms']:.3f}]" for m in by_method.values()]
        speedup = by_method["sdpa_mask"]["median_ms"] / by_method[fast]["median_ms"]
        diff = max(m["max_abs_diff_vs_reference"] for m in by_method.values())
        lines.append(
            f"| {kernel} | {K} | {notes} | {prefix} | " + " | ".join(cells) + f" | {speedup:.2f}x | {diff:.1e} |"
        )
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path) -> None:
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(1, len(kernels), figsize=(6 * len(kernels), 4.5), squeeze=False)
    for ax, kernel in zip(axes[0], kernels):
        mine = [r for r in rows if r["kernel"] == kernel]
        size_key = "prefix" if kernel == "ragged_decode_attention" else "notes"
        for method in dict.fromkeys(r["method"] for r in mine):
            for size in dict.fromkeys(r[size_key] for r in mine):
                line = [r for r in mine if r["method"] == method and r[size_key] == size]
                ks = [r["K"] for r in line]
                med = [r["median_ms"] for r in line]
                err = [[r["median_ms"] - r["p25_ms"] for r in line], [r["p75_ms"] - r["median_ms"] for r in line]]
                ax.errorbar(ks, med, yerr=err, marker="o", capsize=3, label=f"{method}, {size_key}={size}")
        ax.set(title=kernel, xlabel="streams K", ylabel="ms (median, IQR bars)", yscale="log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(STREAMS, [str(k) for k in STREAMS], minor=False)
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-kernels"), help="output directory")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: bf16 on cuda, fp32 on cpu"
    )
    parser.add_argument("--quick", action="store_true", help="2 warm-up and 7 timed runs per case")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per case (default 5, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 30, quick 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: decode-size ops are too "
                        "small to split, and thread barriers dominate on shared cores)")  # fmt: skip
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device; use --device cpu")
    if args.device == "cuda" and (INTERPRET or not HAS_TRITON):
        parser.error("--device cuda times compiled Triton kernels: install triton and unset TRITON_INTERPRET")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.repeats = args.repeats if args.repeats is not None else (7 if args.quick else 30)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")

    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, args, args.out / "results.md")
    write_plot(rows, args.out / "results.png")
    print(f"wrote {args.out / 'results.md'}, results.csv and results.png")


if __name__ == "__main__":
    main()
