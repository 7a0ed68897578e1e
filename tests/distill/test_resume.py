"""Kill a run with SIGKILL mid-stage, rerun the same command: the result equals an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from linearize.distill.loop import FAULT_ENV

SMALL = [
    "stages.attention.steps=5",
    "stages.logits.steps=5",
    "stages.attention.batch_size=2",
    "stages.logits.batch_size=2",
    "stages.logits.grad_accum=2",
    "data.seq_len=64",
    "eval.max_blocks=4",
    "train.checkpoint_every=2",
]


def convert(out, fault=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "linearize", "convert", f"output_dir={out}", *SMALL],
        capture_output=True,
        text=True,
        env=env,
    )


def weights(run):
    return load_file(str(next((run / "final").glob("*.safetensors"))))


def last_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {stage: [r["loss"] for r in records if r["stage"] == stage] for stage in ("attention", "logits")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = convert(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("fault", ["attention:3", "logits:3"])
def test_killed_run_resumes_to_the_same_result(reference, tmp_path, fault):
    out = tmp_path / "run"
    killed = convert(out, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "final").exists()
    resumed = convert(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), [k for k in a if not (a[k] == b[k]).all()][:5]
    assert last_losses(out) == last_losses(reference)
    # the same run in another folder writes the same bytes (no path in the safetensors metadata)
    files = {p.name: p.read_bytes() for p in (reference / "final").glob("*.safetensors")}
    assert files == {p.name: p.read_bytes() for p in (out / "final").glob("*.safetensors")}


def test_rerun_of_a_finished_run_skips_the_stages(reference):
    again = convert(reference)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[attention] already done" in again.stdout and "[logits] already done" in again.stdout


def test_other_recipe_in_same_folder_is_refused(reference):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "linearize", "convert", f"output_dir={reference}", "seed=5", *SMALL],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0 and "holds a run of a different recipe (seed: 0 then, 5 now;" in proc.stderr
