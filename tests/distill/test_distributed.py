"""One process or two (torchrun, gloo on CPU): the same global batch gives the same loss curve, in both
stages, through `linearize distill` run stage by stage; a rank killed mid-step or mid-save loses only the
steps since the last checkpoint, and the rerun ends where an uninterrupted run does."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from linearize.distill.loop import FAULT_ENV

COMMON = [
    "recipe=tiny",
    "stages.attention.steps=4",
    "stages.logits.steps=4",
    "data.heldout_docs=0",
    "eval.tasks=[]",
    "train.checkpoint_every=2",
]
GLOBAL_BATCH = 4
RTOL = 1e-5  # fp32; the 2-process mean of two half-batch losses differs from the whole-batch mean by rounding


def distill(run, processes: int, stage: str, fault: str = "") -> str:
    per_process = GLOBAL_BATCH // processes
    args = [*COMMON, f"output_dir={run}", f"stage={stage}"]
    args += [f"stages.attention.batch_size={per_process}", f"stages.logits.batch_size={per_process}"]
    launcher = [sys.executable, "-m", "linearize"]
    if processes > 1:  # `accelerate launch --cpu` would start a single process: torchrun starts real ranks
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
        launcher += ["-m", "linearize"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    done = subprocess.run([*launcher, "distill", *args], capture_output=True, text=True, env=env, timeout=600)
    assert (done.returncode != 0) == bool(fault), done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def losses(run, stage):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["stage"] == stage]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    out = {}
    for processes in (1, 2):
        run = root / f"p{processes}"
        printed = [distill(run, processes, stage) for stage in ("attention", "logits")]
        out[processes] = (run, printed)
    return out


def test_every_run_says_how_many_processes_it_has(runs):
    for processes, (_, printed) in runs.items():
        backend = "gloo" if processes > 1 else "none"
        for text in printed:
            assert f"processes={processes} backend={backend}" in text


@pytest.mark.parametrize("stage", ["attention", "logits"])
def test_two_processes_give_the_one_process_loss_curve(runs, stage):
    one, two = losses(runs[1][0], stage), losses(runs[2][0], stage)
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, rel=RTOL)


def test_stage_by_stage_ends_in_an_export(runs):
    for run, printed in runs.values():
        assert (run / "final" / "config.json").is_file()
        assert "next: the same command with stage=logits" in printed[0]


@pytest.mark.parametrize("fault", ["attention:3:mid@1", "attention:4:save@0"])
def test_a_killed_rank_costs_only_the_steps_since_the_last_checkpoint(runs, tmp_path, fault):
    """Rank 1 killed between backward and optimizer step 3, or rank 0 killed while writing checkpoint 4:
    torchrun stops the run; the rerun resumes from checkpoint 2 and ends stage 1 with the uninterrupted
    losses and weights (stage 2's resume is the same code, checked on one process in test_resume)."""
    run = tmp_path / "run"
    distill(run, 2, "attention", fault=fault)
    ckpts = run / "attention" / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith(".tmp-")] == ["step-00000002"]
    printed = distill(run, 2, "attention")
    assert "resuming from" in printed and "step 2/4" in printed
    reference = runs[2][0]
    assert losses(run, "attention") == pytest.approx(losses(reference, "attention"), rel=RTOL)
    ours, theirs = (load_file(r / "attention" / "final" / "model.safetensors") for r in (run, reference))
    assert all((ours[name] - theirs[name]).abs().max() <= 1e-5 for name in theirs)
