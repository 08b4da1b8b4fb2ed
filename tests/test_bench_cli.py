"""``pdt bench``: clocks and summary arithmetic on exact values, then a full run on a tiny trunk.

Benchmarks are not timed tests: nothing here asserts a wall-clock figure.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_tokenizer, tiny_trunk

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.cli import main
from pdt_hf.evaluation.bench import Bench, BenchConfig
from pdt_hf.evaluation.bench_report import summarize_bench
from pdt_hf.evaluation.prompt_sets import EvalItem
from pdt_hf.evaluation.timing import ForwardClock, TokenClock

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_forward_clock_steps_for_hf_and_pdt() -> None:
    clock = ForwardClock(tiny_trunk("llama"))
    # (start, end, query length): prefill of 20 tokens, then three 1-token forwards.
    clock.events = [[0.0, 0.5, 20.0], [1.0, 1.1, 1.0], [1.5, 1.6, 1.0], [2.5, 2.6, 1.0]]
    assert clock.steps(3.0, "hf") == ([0.5, 1.0, 0.5], 1.0)
    # PDT: the prefix and suffix prefills read more than one token and are not steps.
    clock.events = [[0.0, 0.2, 30.0], [0.2, 0.4, 5.0], [1.0, 1.1, 1.0], [2.0, 2.1, 1.0]]
    assert clock.steps(2.5, "pdt") == ([1.0, 0.5], 1.0)
    with pytest.raises(ValueError, match="kind='x'"):
        clock.steps(1.0, "x")


def test_forward_clock_counts_every_forward_of_generate() -> None:
    trunk = tiny_trunk("llama")
    ids = torch.tensor([[1, 5, 6, 7]])
    with ForwardClock(trunk) as clock:
        trunk.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            min_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
    assert [e[2] for e in clock.events] == [4.0, 1.0, 1.0, 1.0, 1.0]
    assert all(e[1] >= e[0] for e in clock.events)


def test_token_clock_time_to() -> None:
    clock = TokenClock()
    clock.put(torch.tensor([[1, 2, 3]]))  # the prompt: skipped
    clock.arrivals.clear()
    clock.arrivals += [(1.0, 1), (2.0, 3), (4.0, 1)]
    assert clock.time_to(1, 0.5) == 0.5
    assert clock.time_to(4, 0.0) == 2.0
    assert clock.time_to(5, 0.0) == 4.0
    assert clock.time_to(6, 0.0) is None


def _run(method, k, prompt, repeat, wall, steps, **extra):
    return {
        "method": method,
        "k": k,
        "prompt": prompt,
        "repeat": repeat,
        "wall": wall,
        "steps": steps,
        "ttft": 0.1,
        "first_visible": 0.2,
        "committed": k * 2,
        "decoded": k * 2,
        "peak_mib": 100.0,
        "start_mib": 90.0,
        "memory_kind": "rss-hwm",
        "rollbacks": 0,
        "sidecar": None,
        **extra,
    }


def test_summary_arithmetic() -> None:
    raw = {
        "settings": {"ks": [1, 2], "max_new_tokens": 2, "methods": ["serial", "pdt-off", "pdt-on"]},
        "runs": [
            _run("serial", 2, 0, 0, 5.0, [0.1, 0.1, 0.1], committed=4, decoded=4, time_to={"1": 2.0, "2": 4.0}),
            _run("pdt-off", 1, 0, 0, 1.0, [0.2, 0.2]),
            _run("pdt-off", 2, 0, 0, 2.0, [0.3, 0.3]),
            _run("pdt-on", 1, 0, 0, 1.0, [0.25, 0.25]),
            _run("pdt-on", 2, 0, 0, 1.0, [0.4, 0.4], decoded=6),
        ],
    }
    rows = {(r["method"], r["k"]): r for r in summarize_bench(raw)}
    assert rows[("serial", 2)]["wall"]["median"] == 4.0 and rows[("serial", 2)]["tokens"] == 4
    assert rows[("serial", 1)]["useful_tps"]["median"] == 1.0
    assert rows[("pdt-off", 2)]["speedup"]["median"] == 2.0  # serial 4.0 s for 4 tokens / 2.0 s
    assert rows[("pdt-on", 2)]["speedup"]["median"] == 4.0
    assert rows[("pdt-on", 2)]["aggregate_tps"]["median"] == 6.0 and rows[("pdt-on", 2)]["useful_tps"]["median"] == 4.0
    assert rows[("pdt-off", 2)]["step_cost_ratio"] == pytest.approx(1.5)
    assert rows[("pdt-on", 2)]["note_bus_overhead"] == pytest.approx(0.4 / 0.3 - 1)
    assert rows[("pdt-off", 2)]["note_bus_overhead"] is None
    assert rows[("serial", 2)]["step_cost_ratio"] is None
    assert rows[("pdt-on", 1)]["run_mib"]["median"] == 10.0


def test_every_method_writes_its_tokens_even_when_eos_comes_first() -> None:
    trunk = tiny_trunk("llama")
    tok = tiny_tokenizer()
    model = PDTForCausalLM(trunk, PDTConfig(num_streams=2))
    model.tokenizer = tok
    model.eval()
    item = EvalItem("Explain tea.", ["Water", "Leaves", "Cups"])
    config = BenchConfig(ks=[1, 3], max_new_tokens=5, repeats=1)
    bench = Bench(model, "untrained", config)
    # Make EOS the token greedy decoding picks first everywhere it matters: without suppression, runs stop at once.
    from pdt_hf.evaluation.baselines import serial_message
    from pdt_hf.generation.prompts import render_ids, stream_message

    prompts = [render_ids(tok, serial_message(item.prompt, item.plan))]
    prompts += [render_ids(tok, stream_message(item.prompt, item.plan[:k], x)) for k in (1, 3) for x in item.plan[:k]]
    with torch.no_grad():
        firsts = {int(trunk(torch.tensor([p])).logits[0, -1].argmax()) for p in prompts}
    trunk.generation_config.eos_token_id = sorted(firsts)
    bench.eos = sorted(firsts | {tok.eos_token_id})
    for method, k in [("serial", 3), ("prompt-lookup", 3), ("hf-batch", 3), ("pdt-off", 1), ("pdt-on", 3)]:
        record = bench.run(method, k, item, 5)
        assert record["committed"] == (3 * 5 if method in ("serial", "prompt-lookup") else k * 5), method
        if method == "pdt-on":
            assert record["sidecar"] == "untrained (speed only)" and len(record["steps"]) == 5
        if method == "serial":
            assert set(record["time_to"]) == {"1", "3"} and record["time_to"]["1"] <= record["time_to"]["3"]


def test_pdt_bench_writes_json_markdown_and_plot(tmp_path) -> None:
    model_dir = tmp_path / "tiny"
    tiny_trunk("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Plan a trip: bus, food, and sleep.\n")
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts),
            "--ks",
            "1,2,4",
            "--max-new-tokens",
            "4",
            "--repeats",
            "2",
            "--num-prompts",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    result = json.loads((out / "bench.json").read_text())
    assert result["settings"]["ks"] == [1, 2, 4] and result["machine"]["device"] == "cpu"
    runs = result["runs"]
    assert len(runs) == 2 * (2 + 6 * 3)  # repeats x (serial, prompt lookup, 3 K for each K-stream method)
    assert {r["repeat"] for r in runs} == {0, 1}
    for run in runs:
        expected = 4 * 4 if run["method"] in ("serial", "prompt-lookup") else run["k"] * 4
        assert run["committed"] == expected and run["peak_mib"] > 0 and run["ttft"] > 0
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    methods = ("serial", "prompt-lookup", "hf-batch", "pdt-off", "pdt-on", "pdt-no-rollback", "pdt-text-bus")
    methods += ("pdt-speculate",)
    assert set(rows) == {(m, k) for m in methods for k in (1, 2, 4)}
    assert rows[("pdt-on", 4)]["sidecar"] == "untrained (speed only)" and rows[("pdt-on", 2)]["sidecar"] == "untrained"
    assert rows[("pdt-on", 2)]["note_bus_overhead"] is not None and rows[("pdt-on", 1)]["step_cost_ratio"] == 1.0
    assert rows[("serial", 4)]["speedup"]["median"] == 1.0
    markdown = (out / "bench.md").read_text()
    assert "| method | K | tokens |" in markdown and "speedup vs serial" in markdown and "torch " in markdown
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC
