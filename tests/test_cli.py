import subprocess
import sys

import pytest

from linearize.cli import main


def test_recipes_lists_every_shipped_recipe(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    assert out.startswith("") and "tiny" in out


def test_options_lists_documented_keys(capsys):
    main(["options"])
    assert "stages.attention.steps" in capsys.readouterr().out


def test_options_show_the_values_a_recipe_runs_with_and_every_choice(capsys):
    import re

    main(["options", "recipe=smollm2-135m-lolcats", "stages.logits.lr=0.002"])
    out = capsys.readouterr().out
    assert out.startswith("recipe smollm2-135m-lolcats:")
    rows = {
        line.split()[0]: line for line in out.splitlines() if line and not line.startswith((" ", "recipe"))
    }
    assert re.match(
        r"student\.mixer +'window_linear' +choices: gated, gated_delta, gated_slot, linear",
        rows["student.mixer"],
    )
    assert re.match(r"stages\.logits\.lr +0\.002$", rows["stages.logits.lr"])
    assert "choices: float32, bfloat16, float16" in rows["teacher.dtype"]
    assert "student.settings.window" in rows and "student.settings.num_slots" not in rows  # its mixer's only
    starts = {line.index(line.split()[1]) for line in rows.values() if len(line.split()) > 1}
    assert len(starts) == 1  # the values are aligned


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path):
    with pytest.raises(SystemExit, match="unknown command 'convrt'"):
        main(["convrt"])
    with pytest.raises(SystemExit, match="expected key=value"):
        main(["convert", "tiny"])
    with pytest.raises(SystemExit, match=r"error: unknown recipe key 'stages\.attention\.stepz'"):
        main(["convert", "stages.attention.stepz=3"])
    with pytest.raises(SystemExit, match=r"error: .*does not exist"):
        main(["convert", "data.train=/nonexistent/file.txt", f"output_dir={tmp_path}/a"])
    with pytest.raises(SystemExit, match=r"error: teacher .* neither an existing folder nor a Hub id"):
        main(["convert", "teacher.path=./no/such/dir", f"output_dir={tmp_path}/b"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing half-written


def test_import_is_light():
    heavy = ("triton", "fla", "deepspeed", "lm_eval", "peft")
    code = f"import sys, linearize; print(' '.join(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "linearize", "recipes"], capture_output=True, text=True)
    assert proc.returncode == 0 and "tiny" in proc.stdout


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("linearize") or str(__import__("pathlib").Path(sys.executable).with_name("linearize"))
    proc = subprocess.run([exe, "recipes"], capture_output=True, text=True)
    assert proc.returncode == 0 and "tiny" in proc.stdout


def test_distill_and_accelerate_configs(tmp_path, capsys):
    import yaml

    for name in ("ddp", "fsdp2", "zero2", "zero3", "multinode-fsdp2"):
        main(["accelerate-config", name])
        config = yaml.safe_load(open(capsys.readouterr().out.strip()))
        assert config["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    with pytest.raises(SystemExit, match="no accelerate config 'zero4': shipped ones are ddp, fsdp2"):
        main(["accelerate-config", "zero4"])
    with pytest.raises(SystemExit, match="distill needs stage=attention or stage=logits"):
        main(["distill", "recipe=tiny"])
    with pytest.raises(SystemExit, match="stage logits needs stage attention done .* stage=attention"):
        main(["distill", "stage=logits", f"output_dir={tmp_path}/run"])
    assert not (tmp_path / "run").exists()
