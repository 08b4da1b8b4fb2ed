"""recipes/train.py run for real on a tiny trunk: four stages with decreasing pinned losses, a frozen trunk,
kill-and-resume, two CPU processes across a stage boundary, a resumable data build, and clear input errors."""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from training_helpers import REPO, TINY_RECIPE, TRAIN_SCRIPT, save_tiny_trunk, tiny_overrides

from pdt_hf import PDTConfig, PDTForCausalLM
from pdt_hf.training.checkpointing import ResumeMismatchError
from pdt_hf.training.config import load_recipe
from pdt_hf.training.data.builder import build_dataset
from pdt_hf.training.data.schema import DatasetMismatchError, shard_path
from pdt_hf.training.loading import load_trunk_and_tokenizer
from pdt_hf.training.metrics import read_metrics
from pdt_hf.training.trainer import state_digest

# First and last total loss of each stage of the tiny recipe (seed 0), pinned.
PINNED = {
    "heads": (1.50991, 1.30861),
    "adapters": (4.45317, 4.03584),
    "snc": (6.02008, 5.80793),
    "judges": (1.32901, 1.24400),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch threads, then restore the process's previous count.

    Float reductions may round differently at another thread count, so a data build is byte-reproducible only
    at the same count: the builds of this module all run at one thread, whatever earlier tests left behind.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("recipe"))
    trunk_dir = save_tiny_trunk(os.path.join(root, "trunk"))
    with torch_threads(1):
        build_dataset(load_recipe(TINY_RECIPE, tiny_overrides(root, trunk_dir)), progress=False)
    return root, trunk_dir


def _main(argv):
    return runpy.run_path(TRAIN_SCRIPT)["main"](argv)


def _losses(run_dir: str) -> dict[int, tuple[str, float]]:
    return {
        r["step"]: (r["stage"], r["value"])
        for r in read_metrics(os.path.join(run_dir, "metrics.csv"))
        if r["name"] == "loss"
    }


@pytest.fixture(scope="module")
def reference(workspace):
    """The uninterrupted tiny run, through the entry point, in this process."""
    root, trunk_dir = workspace
    with torch_threads(1):
        summary = _main(["--config", TINY_RECIPE, *tiny_overrides(root, trunk_dir)])
    return summary, os.path.join(root, "run")


def test_all_four_stages_run_and_each_stage_loss_decreases(reference):
    summary, run = reference
    losses = _losses(run)
    stages = {}
    for step in sorted(losses):
        stage, value = losses[step]
        stages.setdefault(stage, []).append(value)
    assert list(stages) == ["heads", "adapters", "snc", "judges"]
    for stage, values in stages.items():
        assert len(values) == 4
        assert values[-1] < values[0], f"stage {stage} loss did not decrease: {values}"
        first, last = PINNED[stage]
        assert values[0] == pytest.approx(first, rel=2e-3), stage
        assert values[-1] == pytest.approx(last, rel=2e-3), stage
    rows = read_metrics(os.path.join(run, "metrics.csv"))
    snc_terms = {r["name"] for r in rows if r["stage"] == "snc"}
    assert {"lm", "kd", "speculation", "usage", "kd_ablated"} <= snc_terms  # every loss logged on its own
    assert os.path.getsize(os.path.join(run, "loss_curves.png")) > 10_000
    assert os.listdir(os.path.join(run, "tensorboard"))
    assert summary["world_size"] == 1


def test_trunk_is_bit_identical_and_sidecar_carries_tau(reference, workspace):
    summary, run = reference
    _, trunk_dir = workspace
    recipe = load_recipe(TINY_RECIPE, tiny_overrides(*workspace))
    fresh, _, _ = load_trunk_and_tokenizer(recipe.model)
    assert summary["trunk_unchanged"] is True
    assert summary["trunk_sha256"] == state_digest(fresh)
    config = PDTConfig.from_pretrained(os.path.join(run, "sidecar"))
    assert config.agreement_threshold == pytest.approx(summary["agreement_threshold"])
    model = PDTForCausalLM.from_pretrained(fresh, sidecar=os.path.join(run, "sidecar"))
    assert float(model.sidecar.adapters["1"].up.detach().abs().sum()) > 0  # trained weights, not the zero init
    report = summary["evaluation"]["validation"]
    assert {"kd_notes", "kd_no_notes", "kd_shuffled", "kd_bare_trunk", "agreement"} <= set(report)
    assert 0.0 <= report["agreement"]["precision"] <= 1.0
    for split, rep in summary["evaluation"].items():  # every reported split carries its own ceiling and shares
        share, low, high = rep["ceiling_closed"]["notes"]
        assert low <= share <= high, split
        expected = (rep["kd_no_notes"] - rep["kd_notes"]) / rep["kd_bare_trunk"]
        assert share == pytest.approx(expected, rel=1e-4, abs=1e-6), split


def test_killed_run_resumes_to_the_same_losses(reference, workspace):
    root, trunk_dir = workspace
    run = os.path.join(root, "killed")
    args = [
        sys.executable,
        TRAIN_SCRIPT,
        "--config",
        TINY_RECIPE,
        *tiny_overrides(root, trunk_dir),
        f"train.output_dir={run}",
        "train.save_every=1",
        "train.tensorboard=false",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("checkpoint step 7"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(run, "sidecar"))
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    expected, got = _losses(reference[1]), _losses(run)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step in expected:
        assert got[step][0] == expected[step][0]
        assert got[step][1] == pytest.approx(expected[step][1], rel=1e-5, abs=1e-7), step


def test_two_cpu_processes_cross_a_stage_boundary_in_sync(workspace):
    root, trunk_dir = workspace
    run = os.path.join(root, "ddp")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        TRAIN_SCRIPT,
        "--config",
        TINY_RECIPE,
        *tiny_overrides(root, trunk_dir),
        f"train.output_dir={run}",
        "train.run_stages=[adapters, snc]",
        "curriculum.adapters.steps=2",
        "curriculum.snc.steps=2",
        "calibration.report_splits=[validation]",
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(run, "summary.json")) as handle:
        summary = json.load(handle)
    assert summary["world_size"] == 2
    digests = summary["sidecar_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    stages = [stage for _, (stage, _) in sorted(_losses(run).items())]
    assert stages == ["adapters", "adapters", "snc", "snc"]


def test_data_build_resumes_shards_and_pins_its_config(workspace, tmp_path):
    root, trunk_dir = workspace
    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(root, "data"), data)
    victim = shard_path(data, "train", 1)
    keep = shard_path(data, "train", 0)
    before, kept_mtime = open(victim, "rb").read(), os.path.getmtime(keep)
    os.remove(victim)
    time.sleep(0.01)
    with torch_threads(1):
        build_dataset(
            load_recipe(TINY_RECIPE, [*tiny_overrides(root, trunk_dir), f"data.path={data}"]), progress=False
        )
    assert open(victim, "rb").read() == before  # rebuilt identically
    assert os.path.getmtime(keep) == kept_mtime  # finished shards are skipped
    with pytest.raises(ValueError, match="section_max_tokens=10.*section_max_tokens=12"):
        build_dataset(
            load_recipe(
                TINY_RECIPE,
                [*tiny_overrides(root, trunk_dir), f"data.path={data}", "data.build.section_max_tokens=12"],
            ),
            progress=False,
        )


def _edit_manifest(path: str, edit) -> None:
    file = os.path.join(path, "pdt_dataset.json")
    with open(file) as handle:
        manifest = json.load(handle)
    edit(manifest)
    with open(file, "w") as handle:
        json.dump(manifest, handle)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(schema_version=0), "schema version 0.*rebuild"),
        (lambda m: m["trunk_fingerprint"].update(hidden_size=576), "hidden_size=576.*hidden_size=64"),
        (lambda m: m["build_key"].update(block_size=8), "block_size=8.*pdt.block_size"),
    ],
)
def test_mismatched_dataset_is_refused(workspace, tmp_path, edit, message):
    root, trunk_dir = workspace
    data = str(tmp_path / "data")
    shutil.copytree(os.path.join(root, "data"), data)
    _edit_manifest(data, edit)
    with pytest.raises(DatasetMismatchError, match=message):
        _main(
            [
                "--config",
                TINY_RECIPE,
                *tiny_overrides(root, trunk_dir),
                f"data.path={data}",
                f"train.output_dir={tmp_path / 'run'}",
            ]
        )


def test_resume_from_another_config_is_refused(workspace, tmp_path):
    root, trunk_dir = workspace
    base = [
        *tiny_overrides(root, trunk_dir),
        f"train.output_dir={tmp_path / 'run'}",
        "train.run_stages=[heads]",
        "curriculum.heads.steps=2",
        "calibration.report_splits=[validation]",
        "train.tensorboard=false",
    ]
    _main(["--config", TINY_RECIPE, *base])
    with pytest.raises(ResumeMismatchError, match=r"curriculum\[0\]\.lr: checkpoint has 0.003, this config has 0.1"):
        _main(["--config", TINY_RECIPE, *base, "curriculum.heads.lr=0.1", "--resume"])
