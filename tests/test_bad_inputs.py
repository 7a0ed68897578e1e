"""Every bad input a user can give, and the faults a run meets, end in one line that names the problem and the
fix: exit status 1 (130 for Ctrl-C), no traceback, and nothing written (an earlier run left as it was).

Each row of PROBES is one command: a workspace folder is prepared by its setup, the command runs in it
(`out/` is the default run folder there), and the workspace must be byte-for-byte what it was."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from linearize.assets import bundled_path
from linearize.cli import main

TEACHER = bundled_path("stories260K")
QUICK = ["stages.attention.steps=1", "stages.logits.steps=1", "eval.tasks=[]"]  # if a check ever let one pass


def copy_teacher(ws: Path, name: str = "teacher", drop: tuple[str, ...] = ()) -> Path:
    folder = ws / name
    folder.mkdir()
    for p in TEACHER.iterdir():
        if p.name not in drop:
            (folder / p.name).write_bytes(p.read_bytes())
    return folder


def truncated_config(ws: Path) -> None:
    folder = copy_teacher(ws)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])


def other_family(ws: Path) -> None:
    folder = copy_teacher(ws)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2"]})
    )


def earlier_run(ws: Path) -> None:
    """out/tiny holds the recipe of a run with other steps (as a run of another recipe would)."""
    from linearize.config import load_recipe

    run = ws / "out" / "tiny"
    run.mkdir(parents=True)
    quick = dict(q.split("=") for q in QUICK)
    (run / "recipe.yaml").write_text(load_recipe("tiny", {**quick, "stages.attention.steps": "7"}).to_yaml())
    (run / "metrics.jsonl").write_text('{"stage": "attention", "step": 1, "loss": 1.0}\n')


def write(name: str, content: str | bytes):
    def setup(ws: Path) -> None:
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


@dataclass
class Probe:
    argv: list[str]
    first_line: str  # a regex the first line of the error must match (after "error: ")
    setup: object = None
    quick: bool = field(default=False)  # append QUICK (convert-like commands)


def convert(*args: str, first_line: str, setup=None) -> Probe:
    return Probe(["convert", *args], first_line, setup, quick=True)


PROBES: dict[str, Probe] = {
    # the command line
    "unknown command": Probe(["convrt"], r"unknown command 'convrt'; commands: convert"),
    "word without =": Probe(["convert", "tiny"], r"expected key=value, got 'tiny'; `linearize help`"),
    "empty key": Probe(["convert", "=3"], r"expected key=value, got '=3'"),
    "key given twice": Probe(["convert", "seed=1", "seed=2"], r"seed is given twice; give it once"),
    # recipes
    "unknown recipe key": convert(
        "stages.attention.stepz=3", first_line=r"unknown recipe key 'stages\.attention\.stepz'"
    ),
    "unknown recipe": convert(
        "recipe=tiny-linaer", first_line=r"unknown recipe 'tiny-linaer'; shipped recipes: .*tiny"
    ),
    "recipe file missing": convert("recipe=mine.yaml", first_line=r"recipe file mine\.yaml does not exist"),
    "recipe not YAML": convert(
        "recipe=mine.yaml",
        first_line=r"recipe file mine\.yaml is not valid YAML at line 2, column \d+ .*fix that line",
        setup=write("mine.yaml", "name: x\n\tstages: 1\n"),
    ),
    "recipe a list": convert(
        "recipe=mine.yaml",
        first_line=r"mine\.yaml must hold a mapping of recipe keys .*not a list",
        setup=write("mine.yaml", "- name\n- tiny\n"),
    ),
    "recipe not UTF-8": convert(
        "recipe=mine.yaml",
        first_line=r"cannot read recipe file mine\.yaml: .*utf-8",
        setup=write("mine.yaml", b"name: t\xe9st\n"),
    ),
    "steps not a number": convert(
        "stages.attention.steps=many", first_line=r"stages\.attention\.steps must be an integer"
    ),
    "negative steps": convert("stages.attention.steps=-1", first_line=r"steps must be >= 0, got -1"),
    "batch size 0": convert("stages.logits.batch_size=0", first_line=r"batch_size must be >= 1, got 0"),
    "unknown mixer": convert(
        "student.mixer=mamba", first_line=r"student\.mixer='mamba' is not valid; choose one of: .*linear"
    ),
    "unknown feature map": convert(
        "student.settings.feature_map=cosine", first_line=r"feature_map='cosine' is not valid; choose one of"
    ),
    "setting of another mixer": convert(
        "student.settings.num_slots=4",
        first_line=r"student\.settings of the linear mixer: unknown .*num_slots",
    ),
    "key moved since": convert(
        "student.window=8", first_line=r"'student\.window' is now 'student\.settings\.window'"
    ),
    "window >= seq_len": convert(
        "student.mixer=window_linear",
        "student.settings.window=256",
        first_line=r"student\.settings\.window=256 >= data\.seq_len=256: .*set student\.settings\.window below 256",
    ),
    "bad layer plan": convert(
        "student.layers=auto:x", first_line=r"student\.layers='auto:x' is not a layer plan; use `all`"
    ),
    "unknown kernel form": convert(
        "student.impl=cuda", first_line=r"student\.impl='cuda' is not valid; choose one of"
    ),
    "unknown dtype": convert("teacher.dtype=float8", first_line=r"teacher\.dtype='float8' is not valid"),
    "unknown precision": convert("train.precision=fp8", first_line=r"train\.precision='fp8' is not valid"),
    "name climbs out": convert(
        "name=../../x", first_line=r"name='\.\./\.\./x' must be a plain folder name .*output_dir="
    ),
    "name with a slash": convert("name=runs/a", first_line=r"name='runs/a' must be a plain folder name"),
    "cache with a stream": convert(
        "data.streaming=true",
        "data.heldout_docs=0",
        "stages.logits.cache_k=8",
        first_line=r"stages\.logits\.cache_k needs the training blocks",
    ),
    # the teacher
    "teacher missing": convert(
        "teacher.path=./no/such",
        first_line=r"teacher '\./no/such' is neither an existing folder nor a Hub id",
    ),
    "teacher folder empty": convert(
        "teacher.path=teacher",
        first_line=r"teacher folder teacher has no config\.json",
        setup=lambda ws: (ws / "teacher").mkdir(),
    ),
    "teacher without weights": convert(
        "teacher.path=teacher",
        first_line=r"teacher folder teacher has a config\.json but no weights \(model\.safetensors.*copy the weight",
        setup=lambda ws: copy_teacher(ws, drop=("model.safetensors",)),
    ),
    "teacher config truncated": convert(
        "teacher.path=teacher",
        first_line=r"teacher/config\.json is not valid JSON .*truncated or damaged",
        setup=truncated_config,
    ),
    "teacher of another family": convert(
        "teacher.path=teacher",
        first_line=r"teacher family 'gpt2' is not supported; supported: llama",
        setup=other_family,
    ),
    "teacher path a file": convert(
        "teacher.path=weights.bin",
        first_line=r"teacher\.path weights\.bin is a file",
        setup=write("weights.bin", b"x"),
    ),
    "seq_len beyond the teacher": convert(
        "data.seq_len=1024",
        "eval.seq_len=256",
        first_line=r"data\.seq_len=1024 exceeds the teacher's context \(max_position_embeddings=512.*data\.seq_len=512",
    ),
    # data
    "data file missing": convert("data.train=[nope.txt]", first_line=r"data file nope\.txt does not exist"),
    "data not UTF-8": convert(
        "data.train=[latin.txt]",
        first_line=r"data file latin\.txt is not UTF-8 text: byte 0xe9 at offset 32 .*iconv",
        setup=write("latin.txt", "Once upon a time there was a caf\xe9.\n".encode("latin-1")),
    ),
    "data of unknown format": convert(
        "data.train=[t.csv]",
        first_line=r"data file t\.csv: unknown format '\.csv'",
        setup=write("t.csv", "a,b\n"),
    ),
    "data empty": convert(
        "data.train=[empty.txt]",
        first_line=r"empty\.txt holds no non-empty documents",
        setup=write("empty.txt", "\n\n"),
    ),
    "jsonl without the column": convert(
        "data.train=[d.jsonl]",
        first_line=r"d\.jsonl: no column 'text' \(columns: body\); set data\.text_field",
        setup=write("d.jsonl", '{"body": "a story"}\n'),
    ),
    "too many passes": convert(
        "stages.attention.steps=100000",
        "stages.logits.steps=1",
        "eval.tasks=[]",
        first_line=r"stage attention would read the training text [\d.]+ times .*data\.max_epochs",
    ),
    # the run folder
    "output_dir a file": convert(
        "output_dir=taken", first_line=r"output_dir taken is a file, not a folder", setup=write("taken", "x")
    ),
    "output_dir under a file": convert(
        "output_dir=taken/run",
        first_line=r"output_dir taken/run: its parent taken is a file",
        setup=write("taken", "x"),
    ),
    "output_dir not writable": convert(
        "output_dir=/sys/linearize-probe/run",
        first_line=r"cannot write the run folder /sys/linearize-probe/run: /sys is not writable",
    ),
    "run folder of another recipe": convert(
        first_line=r"out/tiny holds a run of a different recipe \(stages\.attention\.steps: 7 then, 1 now",
        setup=earlier_run,
    ),
    # the other commands
    "distill without a stage": Probe(
        ["distill", "recipe=tiny"], r"distill needs stage=attention or stage=logits, got None"
    ),
    "distill logits first": Probe(
        ["distill", "stage=logits", "output_dir=run"], r"stage logits needs stage attention done in run"
    ),
    "unknown accelerate config": Probe(
        ["accelerate-config", "zero4"], r"no accelerate config 'zero4': shipped ones are ddp"
    ),
    "generate without teacher text": Probe(
        ["generate"], r"the recipe's data\.train and data\.heldout name no teacher:<tokens>"
    ),
    "eval without a model": Probe(
        ["eval", "tasks=ppl"], r"eval needs model=<folder of a converted checkpoint>"
    ),
    "eval of a missing folder": Probe(
        ["eval", "model=nope"], r"model folder nope does not exist or has no config\.json; give model="
    ),
    "eval of an unknown task": Probe(
        ["eval", "model=nope", "tasks=ppl,vibes"], r"unknown eval task 'vibes'; known: ppl"
    ),
    "eval of an unknown setting": Probe(
        ["eval", "model=nope", "ppl_seq_lenn=3"],
        r"unknown eval option 'ppl_seq_lenn'; valid keys: .*ppl_seq_len",
    ),
    "publish without a folder": Probe(["publish", "repo=me/x"], r"publish needs the exported folder"),
    "publish of a missing folder": Probe(
        ["publish", "nope", "repo=me/x", "dry_run=true"],
        r"nope is not a folder; give the exported checkpoint",
    ),
    "publish in an unknown mode": Probe(
        ["publish", "nope", "repo=me/x", "mode=half"], r"mode must be one of full, deltas, got 'half'"
    ),
}


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("name", list(PROBES))
def test_bad_input_is_one_line_naming_the_fix_and_writes_nothing(name, tmp_path, monkeypatch):
    probe = PROBES[name]
    monkeypatch.chdir(tmp_path)
    if probe.setup:
        probe.setup(tmp_path)
    before = tree(tmp_path)
    given = {a.partition("=")[0] for a in probe.argv}
    argv = probe.argv + [q for q in QUICK if probe.quick and q.partition("=")[0] not in given]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code
    assert isinstance(message, str), f"exit status {message!r}, not a one-line error"  # str: status 1
    first, *rest = message.splitlines()
    assert first.startswith("error: "), first
    assert re.search(probe.first_line, first[len("error: ") :]), first
    assert not rest, f"more than one line: {message!r}"
    assert tree(tmp_path) == before, "the command wrote into its workspace"


def test_there_are_at_least_forty_probes():
    assert len(PROBES) >= 40


def linearize_cli(*args: str, cwd: Path) -> subprocess.Popen:
    """`linearize ARGS` in `cwd`: stdout piped (line by line), stderr into cwd/stderr.txt."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "linearize", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=open(cwd / "stderr.txt", "w"),
        # a shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt:
        # the child gets the default disposition whatever ran this test
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(proc: subprocess.Popen, cwd: Path) -> tuple[str, str]:
    out = proc.communicate(timeout=300)[0]
    return out, (cwd / "stderr.txt").read_text()


def interrupt_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGINT to `proc` once `ready()` is true."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, (
            f"exited {proc.poll()} before it was interrupted"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)


def test_an_error_from_the_command_line_is_status_1_and_one_line_on_stderr(tmp_path):
    proc = linearize_cli("convert", "name=../x", cwd=tmp_path)
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 1
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: name='../x'"), err
    assert "Traceback" not in out + err


def test_ctrl_c_says_where_the_run_stopped_and_where_it_resumes(tmp_path):
    """SIGINT while stage attention trains: status 130, one line with the step and the checkpoint a rerun
    resumes from, no traceback, no half-written checkpoint; the rerun resumes from that checkpoint."""
    args = ["convert", "stages.attention.steps=300", "train.checkpoint_every=2", "stages.logits.steps=1"]
    args += ["eval.tasks=[]"]
    checkpoints = tmp_path / "out" / "tiny" / "attention" / "checkpoints"
    proc = linearize_cli(*args, cwd=tmp_path)
    interrupt_when(proc, lambda: list(checkpoints.glob("step-*/COMPLETE")))
    out, err = finish(proc, tmp_path)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    found = re.fullmatch(
        r"error: interrupted \(Ctrl-C\) at step (\d+)/300 of stage attention; rerun the same command to resume "
        r"from step (\d+) \((.*step-\d{8})\)",
        last,
    )
    assert found, last
    assert int(found.group(2)) < int(found.group(1)) and (tmp_path / found.group(3)).is_dir()
    assert not list(checkpoints.glob(".tmp-*")), "a half-written checkpoint was left"
    resumed = linearize_cli(*args, cwd=tmp_path)
    lines = []
    for line in resumed.stdout:  # up to the line that says where it resumes
        lines.append(line)
        if "resuming from" in line:
            break
    resumed.send_signal(signal.SIGINT)
    finish(resumed, tmp_path)
    assert f"[attention] resuming from {found.group(3)} (step {found.group(2)}/300)" in lines[-1], lines[-3:]
    assert resumed.returncode == 130


def small_disk(path: Path, size: str) -> Path:
    """A tmpfs of `size` at `path` (root only); the test is skipped, saying so, where it cannot be mounted."""
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode:
        pytest.skip(
            f"cannot mount a small tmpfs here ({proc.stderr.decode().strip()}): the real-disk check did NOT run"
        )
    return path


def test_a_really_full_disk_during_a_checkpoint_names_the_intact_checkpoint(tmp_path):
    """On a real filesystem that fills up (a tmpfs): the stage's second checkpoint cannot be written, and the
    error says the disk is full and which checkpoint is intact; that checkpoint is untouched."""
    disk = small_disk(tmp_path / "disk", "64m")
    try:
        args = [
            "convert",
            f"output_dir={disk}/run",
            "stages.attention.steps=4",
            "train.checkpoint_every=2",
            "stages.logits.steps=1",
            "eval.tasks=[]",
            "data.heldout_docs=1",
        ]
        # the first run writes the step-2 checkpoint and is killed right after it (the loop's fault hook)
        first = subprocess.run(
            [sys.executable, "-m", "linearize", *args],
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "LINEARIZE_FAULT_AFTER_STEP": "attention:2"},
            capture_output=True,
        )
        assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
        checkpoints = disk / "run" / "attention" / "checkpoints"
        kept = sorted(checkpoints.glob("step-*"))[-1]
        before = tree(kept)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 64 * 1024))  # leave 64 KB
        proc = linearize_cli(*args, cwd=tmp_path)
        out, err = finish(proc, tmp_path)
        assert proc.returncode == 1, err[-2000:]
        assert "Traceback" not in out + err
        last = err.strip().splitlines()[-1]
        assert re.fullmatch(
            rf"error: stage attention: could not write checkpoint .*step-\d{{8}}: the disk is full \(0 MB free under "
            rf".*\); the last complete checkpoint, step \d+ \({kept}\), is intact\. Free space .* to resume",
            last,
        ), last
        assert tree(kept) == before
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path):
    disk = small_disk(tmp_path / "ro", "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(
            SystemExit,
            match=rf"error: cannot write the run folder {disk}/run: {disk} is not writable "
            r"\(Read-only file system\); set output_dir=",
        ):
            main(["convert", f"output_dir={disk}/run", *QUICK])
    finally:
        subprocess.run(["umount", str(disk)])
