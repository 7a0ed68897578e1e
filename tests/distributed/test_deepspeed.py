"""DeepSpeed ZeRO-2 and ZeRO-3 engines on 2 CPU ranks (torchrun, gloo, DS_ACCELERATOR=cpu, torch AdamW)
give the one-process loss curve and weights of both stages for the same global batch; under ZeRO-3 the
frozen teacher of stage logits (trainable=attention) is a sharded engine of its own, and the student is
whole again on every rank after each stage.

deepspeed_worker.py drives the engines directly, the way accelerate does in our loop; the accelerate path
itself (`linearize distill` under ZeRO-2/3) is checked in test_ranks.py through backend_worker.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'linearize[deepspeed]')")

WORKER = Path(__file__).with_name("deepspeed_worker.py")
RTOL = 1e-5  # fp32: a mean over 2 ranks x 2 micro-batches rounds differently (measured: at most 1.9e-7)
WEIGHTS_ATOL = 1e-5  # after 3 AdamW steps per stage (lr 1e-3); measured: at most 3.1e-7


def run(out: Path, processes: int) -> None:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [str(WORKER), str(out)] + ([] if processes > 1 else ["--plain"])
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    run(root / "plain.json", 1)
    run(root / "ds.json", 2)
    results = {**json.loads((root / "plain.json").read_text()), **json.loads((root / "ds.json").read_text())}
    weights = [torch.load(root / f"ds.rank{rank}.pt") for rank in (0, 1)]
    return results, torch.load(root / "plain.rank0.pt")["plain"], weights


@pytest.mark.parametrize("stage", ["attention", "logits"])
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_give_the_one_process_losses_and_weights(runs, zero, stage):
    results, plain, per_rank = runs
    one, two = results["plain"][stage], results[f"zero{zero}"]["losses"][stage]
    assert len(one) == len(two) == 3 and one[0] != one[-1]
    assert two == pytest.approx(one, rel=RTOL)
    for weights in per_rank:  # every rank holds the whole trained student after the stage
        ours = weights[f"zero{zero}"][stage]
        assert ours.keys() == plain[stage].keys()
        for name, tensor in plain[stage].items():
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=WEIGHTS_ATOL, msg=name)


@pytest.mark.parametrize("zero", [2, 3])
def test_weights_and_the_frozen_teacher_are_sharded_exactly_under_zero3(runs, zero):
    checks = runs[0][f"zero{zero}"]["checks"]
    assert checks["attention_zero_stage"] == checks["logits_zero_stage"] == zero
    sharded = zero == 3  # ZeRO-2 shards gradients and optimizer state only: the teacher is a plain copy
    assert checks["teacher_engine"] == checks["teacher_sharded"] == sharded
    assert checks["attention_student_sharded"] == checks["logits_student_sharded"] == sharded
    # unpartition(): whole plain parameters after each stage, the tied embeddings still one tensor
    assert checks["attention_whole_after"] and checks["logits_whole_after"]
