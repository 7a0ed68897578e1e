"""One process or two (torchrun, gloo on CPU): the same global batch gives the same loss curve, in both
stages, through `linearize distill` run stage by stage; a rank killed mid-step or mid-save loses only the
steps since the last checkpoint, and the rerun ends where an uninterrupted run does."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


BACKEND_WORKER = str(Path(__file__).with_name("backend_worker.py"))


def distill(run, processes: int, stage: str, fault: str = "", backend: str = "", extra=()) -> str:
    """`linearize distill` on 1 or 2 CPU ranks; backend fsdp2, zero2 or zero3: through accelerate's FSDP2 or
    DeepSpeed path (see backend_worker.py), else DDP."""
    per_process = GLOBAL_BATCH // processes
    args = [*COMMON, f"output_dir={run}", f"stage={stage}", *extra]
    args += [f"stages.attention.batch_size={per_process}", f"stages.logits.batch_size={per_process}"]
    args = [f"{k}={v}" for k, v in dict(a.split("=", 1) for a in args).items()]  # a later value wins
    launcher = [sys.executable, "-m", "linearize"]
    if processes > 1:  # `accelerate launch --cpu` would start a single process: torchrun starts real ranks
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
        ]
        launcher += [BACKEND_WORKER] if backend else ["-m", "linearize"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env |= {"LINEARIZE_TEST_BACKEND": backend, "DS_ACCELERATOR": "cpu"} if backend else {}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    done = subprocess.run([*launcher, "distill", *args], capture_output=True, text=True, env=env, timeout=600)
    killed = bool(fault) and not fault.partition("@")[0].endswith(":nan")  # a NaN loss is skipped, not fatal
    assert (done.returncode != 0) == killed, done.stdout[-3000:] + done.stderr[-3000:]
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


def test_every_stage_reports_its_throughput_and_peak_memory(runs):
    """The numbers a scale-out run is judged by: tokens/s and the largest process's peak memory, printed when
    a stage ends and logged with every metrics line."""
    for run, printed in runs.values():
        for stage, text in zip(("attention", "logits"), printed):
            match = re.search(
                rf"\[{stage}\] done: .* ([\d,]+) tokens/s, peak memory ([\d.]+) GiB per device", text
            )
            assert match and float(match[1].replace(",", "")) > 0 and float(match[2]) > 0, text[-2000:]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(r["peak_memory_gib"] > 0 and r["tok_s"] > 0 for r in records)


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


# ---- FSDP2 and DeepSpeed: accelerate enables them only on GPU ranks; backend_worker.py runs their code
# paths on CPU ranks ----


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    printed = [distill(run, 2, stage, backend="fsdp2") for stage in ("attention", "logits")]
    return run, printed


def final_weights(run, stage=None):
    return load_file((run / stage / "final" if stage else run / "final") / "model.safetensors")


def assert_same_weights(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    assert ours.keys() == theirs.keys()
    worst = max((ours[name] - theirs[name]).abs().max().item() for name in theirs)
    assert worst <= atol, worst


def test_fsdp2_student_gives_the_one_process_losses_and_export(runs, fsdp_run):
    """Sharded student (each decoder layer and each mixer an FSDP2 unit), sharded frozen teacher copy
    (trainable=attention), sharded checkpoints: both stages' losses and the exported weights are the
    one-process run's. Stage 1 needs its loss to leave each mixer as an output (FSDP2 gathers a unit's weights
    for backward only then); clipping must see the sharded parameters, not the ones from before prepare()."""
    run, printed = fsdp_run
    assert all("processes=2 backend=gloo" in text and "distributed=FSDP" in text for text in printed)
    one = runs[1][0]
    for stage in ("attention", "logits"):
        assert losses(run, stage) == pytest.approx(losses(one, stage), rel=RTOL)
    assert_same_weights(final_weights(run, "attention"), final_weights(one, "attention"))
    assert_same_weights(final_weights(run), final_weights(one))


def test_fsdp2_lora_stage_merges_the_gathered_adapters(tmp_path):
    """trainable=lora under FSDP2: the sharded PEFT model is gathered into a plain student, adapters merged,
    and the export equals the one-process run's."""
    extra = ["stages.logits.trainable=lora"]
    for name, processes in (("one", 1), ("fsdp", 2)):
        for stage in ("attention", "logits"):
            distill(tmp_path / name, processes, stage, backend="fsdp2" if processes > 1 else "", extra=extra)
    assert losses(tmp_path / "fsdp", "logits") == pytest.approx(losses(tmp_path / "one", "logits"), rel=RTOL)
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one"))


def test_fsdp2_killed_rank_resumes_from_the_sharded_checkpoint(fsdp_run, tmp_path):
    """Rank 1 killed mid-step 3 of stage 2 under FSDP2: the rerun loads checkpoint 2 (sharded model and
    optimizer state) and ends where the uninterrupted FSDP2 run does."""
    run = tmp_path / "run"
    distill(run, 2, "attention", backend="fsdp2")
    distill(run, 2, "logits", fault="logits:3:mid@1", backend="fsdp2")
    printed = distill(run, 2, "logits", backend="fsdp2")
    assert "resuming from" in printed and "step 2/4" in printed
    reference = fsdp_run[0]
    assert losses(run, "logits") == pytest.approx(losses(reference, "logits"), rel=RTOL)
    assert_same_weights(final_weights(run), final_weights(reference))


SHARDED_EXTRA = [
    "data.heldout_docs=4",
    "student.layers=auto:1",
    "stages.logits.cache_k=8",
    "stages.logits.temperature=1",
]


def greedy_samples(printed: str) -> tuple[str, str]:
    teacher = re.search(r"teacher \(greedy\): (.*)", printed).group(1)
    student = re.search(r"student \(greedy, exported model(?:, sharded)?\): (.*)", printed).group(1)
    return teacher, student


def test_fsdp2_never_holds_the_whole_model_on_a_device_and_matches_one_process(tmp_path):
    """Under FSDP2 the model is whole on no device: rank 0 reads it into CPU memory, the other rank builds it
    empty (a weight read fails it, see backend_worker.py) and receives its shards by broadcast. The teacher's
    perplexity, greedy sample and logit cache come from the sharded student in teacher mode, each process
    scoring its share of the held-out blocks in step with the others; the auto:N layer ranking from the sharded
    student; saves and the export from the state gathered into rank 0's memory; the exported model's sample
    from it sharded again. Every number and file equals the one-process run's."""
    printed = {}
    for name, processes in (("one", 1), ("fsdp", 2)):
        backend = "fsdp2" if processes > 1 else ""
        printed[name] = "".join(
            distill(tmp_path / name, processes, stage, backend=backend, extra=SHARDED_EXTRA)
            for stage in ("attention", "logits")
        )
    assert "[fsdp2] rank 0 holds the whole model in CPU memory" in printed["fsdp"]
    assert "student (greedy, exported model, sharded)" in printed["fsdp"]
    assert greedy_samples(printed["fsdp"]) == greedy_samples(printed["one"])
    one, fsdp = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "fsdp"))
    assert (
        set(one)
        == set(fsdp)
        == {
            "teacher",
            "sliding_window",
            "student_untrained",
            "student_after_attention",
            "student_after_layer_plan",
            "student_after_logits",
        }
    )
    for key in one:
        assert fsdp[key]["tokens"] == one[key]["tokens"]
        assert fsdp[key]["ppl"] == pytest.approx(one[key]["ppl"], rel=RTOL), key
    ranking = {
        name: json.loads((tmp_path / name / "layer_ranking.json").read_text()) for name in ("one", "fsdp")
    }
    assert [r["layer"] for r in ranking["fsdp"]] == [r["layer"] for r in ranking["one"]]
    assert [r["loss"] for r in ranking["fsdp"]] == pytest.approx(
        [r["loss"] for r in ranking["one"]], rel=RTOL
    )
    caches = [tmp_path / name / "logit_cache" for name in ("one", "fsdp")]
    names = sorted(p.name for p in caches[0].iterdir())
    assert len(names) > 2 and sorted(p.name for p in caches[1].iterdir()) == names
    assert all((caches[0] / n).read_bytes() == (caches[1] / n).read_bytes() for n in names)
    for stage in ("attention", "logits"):
        assert losses(tmp_path / "fsdp", stage) == pytest.approx(losses(tmp_path / "one", stage), rel=RTOL)
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one"))


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_accelerate_deepspeed_gives_the_one_process_losses_and_export(runs, zero, tmp_path):
    """accelerate + DeepSpeed ZeRO-2/3 through `linearize distill`: both stages' losses and the export are the
    one-process run's. ZeRO-3 would otherwise build every model partitioned (transformers' zero.Init), and
    ZeRO-1/2 leave the trained weights as views of one flat buffer, which safetensors refuses to save."""
    printed = [distill(tmp_path, 2, stage, backend=zero) for stage in ("attention", "logits")]
    assert all("processes=2 backend=gloo" in text and "distributed=DEEPSPEED" in text for text in printed)
    assert f"ZeRO-{zero[-1]}, 2 processes" in printed[0]
    one = runs[1][0]
    for stage in ("attention", "logits"):
        assert losses(tmp_path, stage) == pytest.approx(losses(one, stage), rel=RTOL)
    assert_same_weights(final_weights(tmp_path), final_weights(one))


def test_deepspeed_killed_rank_resumes_from_the_engine_checkpoint(runs, tmp_path):
    """Rank 0 killed mid-step 3 of stage 1 under ZeRO-3: the rerun loads the engine's checkpoint 2 and ends
    where the uninterrupted one-process run does."""
    distill(tmp_path, 2, "attention", fault="attention:3:mid@0", backend="zero3")
    printed = distill(tmp_path, 2, "attention", backend="zero3")
    assert "resuming from" in printed and "step 2/4" in printed
    one = runs[1][0]
    assert losses(tmp_path, "attention") == pytest.approx(losses(one, "attention"), rel=RTOL)
    assert_same_weights(final_weights(tmp_path, "attention"), final_weights(one, "attention"))


@pytest.fixture(scope="module")
def skipped_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("skip") / "one"
    distill(run, 1, "logits", fault=SKIPPED_FAULT, extra=SKIPPED_STEP)
    return run


SKIPPED_STEP = ["stages.attention.steps=0", "stages.logits.grad_accum=2", "train.skip_nonfinite=1"]
SKIPPED_FAULT = "logits:2:nan"  # the last micro-batch of step 2 has a NaN loss, on every rank


@pytest.mark.parametrize("backend", ["", "fsdp2", "zero2", "zero3"])
def test_a_skipped_step_leaves_no_gradient_behind(skipped_reference, backend, tmp_path):
    """train.skip_nonfinite with 2 micro-batches a step: step 2's first micro-batch has been backpropagated
    when its second turns out NaN. The skipped step must not leak that gradient into step 3, on any backend;
    under DeepSpeed accelerate's zero_grad() does nothing and the engine accumulates on its own."""
    printed = distill(tmp_path, 2, "logits", fault=SKIPPED_FAULT, backend=backend, extra=SKIPPED_STEP)
    assert "[logits] skipped (1/1)" in printed and "at step 2 (micro-batch 1)" in printed
    assert losses(tmp_path, "logits") == pytest.approx(losses(skipped_reference, "logits"), rel=RTOL)
    assert_same_weights(final_weights(tmp_path), final_weights(skipped_reference))


def test_two_processes_split_the_logit_cache_and_give_the_one_process_losses(tmp_path):
    """stages.logits.cache_k: each of 2 processes writes its share of the cache shards (no process waits at
    a barrier while one writes it all); the files are the one-process cache's, and so are the losses."""
    extra = ["stages.attention.steps=0", "stages.logits.cache_k=8", "stages.logits.temperature=1"]
    printed = {n: distill(tmp_path / f"p{n}", n, "logits", extra=extra) for n in (1, 2)}
    assert "on 2 process(es)" in printed[2]
    one, two = (tmp_path / f"p{n}" / "logit_cache" for n in (1, 2))
    names = sorted(p.name for p in one.iterdir())
    assert len(names) > 2 and sorted(p.name for p in two.iterdir()) == names
    assert all((one / name).read_bytes() == (two / name).read_bytes() for name in names)
    assert losses(tmp_path / "p2", "logits") == pytest.approx(losses(tmp_path / "p1", "logits"), rel=RTOL)


def test_fsdp2_finishes_a_partly_written_cache_in_step(tmp_path):
    """A sharded teacher's forwards are collective. When one process finds all its cache shards written (it
    only probes the teacher once) and the other has all of its own to write, the two agree on a number of
    forwards before either runs one; a probe that ran first met the other process's all-reduce and the run
    hung. The finished cache is the uninterrupted one, byte for byte."""
    extra = [
        "stages.attention.steps=0",
        "stages.logits.steps=2",
        "stages.logits.cache_k=8",
        "stages.logits.temperature=1",
    ]
    distill(tmp_path, 2, "logits", backend="fsdp2", extra=extra)
    cache = tmp_path / "logit_cache"
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    shards = sorted(name for name in before if name.startswith("shard-"))
    assert len(shards) >= 3
    for name in shards[1::2]:  # rank 1's shards: rank 0 finds every one of its own
        (cache / name).unlink()
    shutil.rmtree(tmp_path / "logits")
    shutil.rmtree(tmp_path / "final")
    distill(tmp_path, 2, "logits", backend="fsdp2", extra=extra)
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before
