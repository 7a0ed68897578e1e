"""benchmarks/quality.py: argument checks and the planned commands (fast), and a whole micro-budget run on
the bundled teacher (slow)."""

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_budgets_parse_and_print(quality):
    assert [quality.parse_budget(b) for b in ("500k", "2M", "50M", "1.5M", "20000", "1B")] == [
        500_000,
        2_000_000,
        50_000_000,
        1_500_000,
        20_000,
        1_000_000_000,
    ]
    assert [quality.budget_label(n) for n in (20_000, 2_000_000, 1_500_000, 12_345)] == [
        "20k",
        "2M",
        "1.5M",
        "12345",
    ]
    for bad in ("2x", "M", "-1M", "0", ""):
        with pytest.raises(quality.UsageError, match="is not a token count"):
            quality.parse_budget(bad)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--recipes", "tiny,nope"], r"unknown recipe 'nope'; shipped recipes: .*smollm2-135m-liger.*tiny"),
        (["--budgets", "2M,lots"], r"budget 'lots' is not a token count; use e.g. 500k, 2M, 50M"),
        (["--train", "/no/such/file.txt"], r"--train file /no/such/file.txt does not exist"),
        (["--wizard", "/no/such/oz.txt"], r"--wizard file /no/such/oz.txt does not exist"),
        (["--teacher", "/no/such/folder"], r"neither an existing folder nor a Hub id"),
    ],
)
def test_bad_arguments_fail_before_any_work(quality, tmp_path, capsys, argv, message):
    base = {"--teacher": "bundled:stories260K", "--recipes": "tiny", "--budgets": "20k"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    args = [x for kv in base.items() for x in kv] + ["--out", str(tmp_path / "q"), "--dry-run"]
    with pytest.raises(SystemExit) as err:
        quality.main(args)
    assert err.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "q").exists()


def test_dry_run_prints_every_command_and_runs_nothing(quality, tmp_path, capsys):
    out = tmp_path / "q"
    quality.main(
        ["--teacher", "bundled:stories260K", "--recipes", "tiny,tiny-lolcats", "--budgets", "20k,40k"]
        + ["--out", str(out), "--dry-run", "--eval-quick"]
    )
    lines = capsys.readouterr().out.splitlines()
    assert not out.exists()
    converts = [line for line in lines if line.startswith("linearize convert")]
    # 2 recipes x 2 budgets, plus the fine-tuned teacher of tiny-lolcats (CE in stage 2) at each budget;
    # tiny's stage 2 is KL alone, so its fine-tuned teacher is the teacher itself
    assert len(converts) == 6
    assert sum("student.mixer=softmax" in c for c in converts) == 2
    assert all("recipe=tiny-lolcats" in c for c in converts if "student.mixer=softmax" in c)
    # 20k tokens split 1:2 like the recipe (150 : 300 steps of 8 x 256 tokens)
    tiny20 = next(
        c for c in converts if "recipe=tiny " in c and c.endswith("'eval.tasks=[]'") and "/20k" in c
    )
    assert "stages.attention.steps=3" in tiny20 and "stages.logits.steps=7" in tiny20
    evals = [line for line in lines if line.startswith("linearize eval")]
    # held-out documents (unseen TinyStories), Wizard of Oz, long context per export: no separate TinyStories
    # score, as these recipes train on the other TinyStories documents
    assert len(evals) == 6 * 3
    assert all("ppl_seq_len=2048" not in e for e in evals)  # capped at the 512-token context
    assert sum("ppl_seq_len=512" in e for e in evals) == 6
    assert all("tasks=controls " in e for e in evals if "/heldout" in e and "finetuned" not in e)
    # the sliding window scored beside each student on the other texts (its held-out text: by controls)
    assert all(("ppl_window=true" in e) == ("finetuned" not in e and "/heldout" not in e) for e in evals)
    # every run shares one folder of teacher-written text
    assert all("data.sampling.cache_dir=" in c for c in converts)


def test_smollm2_budgets_split_like_the_recipes_and_liger_has_one_stage(quality, tmp_path, capsys):
    quality.main(
        [
            "--teacher",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--budgets",
            "2M",
            "--out",
            str(tmp_path),
            "--dry-run",
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    converts = {
        line.split()[2]: line
        for line in lines
        if line.startswith("linearize convert") and "softmax" not in line
    }
    assert set(converts) == {f"recipe={r}" for r in quality.DEFAULT_RECIPES.split(",")}
    for name, line in converts.items():
        if name == "recipe=smollm2-135m-liger":
            assert "stages.attention.steps=0" in line and "stages.logits.steps=488" in line
        elif name in ("recipe=smollm2-135m-to-linear", "recipe=smollm2-135m-to-hybrid"):
            # 2M tokens at 1,024 per step, two thirds in stage 1 as the recipes split their own
            assert "stages.attention.steps=1302" in line and "stages.logits.steps=651" in line, name
        else:  # 2M tokens at 4,096 per step, 1:2 like the anchors' own split
            assert "stages.attention.steps=163" in line and "stages.logits.steps=326" in line, name
    controls = [
        line for line in lines if line.startswith("linearize convert") and "student.mixer=softmax" in line
    ]
    # stage 2 with cross-entropy: LoLCATs and Liger; the others distil on KL alone
    assert sorted(line.split()[2] for line in controls) == [
        "recipe=smollm2-135m-liger",
        "recipe=smollm2-135m-lolcats",
    ]
    assert any("ppl_seq_len=8192" in line for line in lines)


@pytest.mark.slow
def test_micro_budget_run_on_the_bundled_teacher(quality, tmp_path, capsys):
    """The whole benchmark on stories260K at 20k and 40k tokens (about 6 minutes on 2 CPU cores); a rerun
    skips every finished conversion and evaluation."""
    out = tmp_path / "quality"
    argv = ["--teacher", "bundled:stories260K", "--recipes", "tiny,tiny-lolcats", "--budgets", "20k,40k"]
    argv += ["--out", str(out), "--eval-quick"]
    quality.main(argv)
    result = json.loads((out / "quality.json").read_text())
    assert {(r["recipe"], r["budget"]) for r in result["runs"]} == {
        (r, b) for r in ("tiny", "tiny-lolcats") for b in (20_000, 40_000)
    }
    for r in result["runs"]:
        assert r["student"]["ppl_heldout"] > 1 and r["student"]["ppl_wizard"] > 1
        assert set(r["student"]["ppl_long"]) == {"512"}
        assert r["finetuned_teacher"]["is_teacher"] == (r["recipe"] == "tiny")
        # the zero-training sliding window next to every student, at the training length and beyond
        assert r["x_sliding_window"]["heldout"] > 0 and r["x_sliding_window"]["long"]["512"] > 0
    md = (out / "quality.md").read_text()
    assert "| `tiny-lolcats` | 20,480 |" in md and "20k tokens: best is" in md and "40k tokens: best is" in md
    assert (out / "quality_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    quality.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("unit done") == 6 and "[quality] convert" not in printed
    units = sorted(p.name for p in (out / "units").glob("*.json"))
    assert units == sorted(
        [f"{r}@{b}.json" for r in ("tiny", "tiny-lolcats") for b in ("20k", "40k")]
        + [f"finetuned-teacher--tiny-lolcats@{b}.json" for b in ("20k", "40k")]
    )
    unit = json.loads((out / "units" / "tiny@20k.json").read_text())
    assert unit["seconds"]["convert"] > 0 and set(unit["seconds"]["evals"]) == {
        "heldout",
        "wizard",
        "long_512",
    }
    # the report is rebuilt from the units alone
    (out / "quality.md").unlink()
    quality.main([*argv, "--report-only"])
    assert "| `tiny-lolcats` | 20,480 |" in (out / "quality.md").read_text()


def unit(quality, recipe, budget, student, window_long, control=None):
    """A unit as write_unit leaves it (after a JSON round trip: long-context keys are strings)."""
    teacher = {
        "ppl_heldout": 10.0,
        "ppl_wizard": 20.0,
        "ppl_long": {"2048": 18.0},
        "mqar": 0.9,
        "passkey": 1.0,
    }
    window = {
        "ppl_heldout": 14.0,
        "ppl_wizard": 30.0,
        "ppl_long": {"2048": window_long},
        "window": 64,
        "sinks": 4,
    }
    return {
        "unit": quality.unit_name(recipe, budget, control is True),
        "recipe": recipe,
        "budget": budget,
        "control": control is True,
        "tokens": {"attention": budget // 3, "logits": budget - budget // 3, "total": budget},
        "train": ["teacher:300k"],
        "finetuned_teacher": None if control is True else (control or "teacher"),
        "metrics": {
            "student": student,
            "teacher": teacher,
            "sliding_window": window,
            "verdicts": {"beats_window": {"ppl": student["ppl_heldout"] < 14.0}},
        },
        "seconds": {"convert": 600.0, "evals": {"heldout": 60.0}},
        "machine": {"cpu": "AMD EPYC", "threads": 2, "bf16_instructions": False, "commit": "abc1234"},
        "settings": {"teacher": "smollm2", "eval_quick": False, "set": {"teacher.dtype": "float32"}},
    }


def test_the_report_sets_each_student_beside_teacher_control_and_sliding_window(quality, tmp_path):
    units = {}
    for u in (
        unit(
            quality,
            "lin",
            150_000,
            {"ppl_heldout": 13.0, "ppl_wizard": 26.0, "ppl_long": {"2048": 40.0}},
            25.0,
        ),
        unit(
            quality,
            "lolcats",
            150_000,
            {"ppl_heldout": 12.0, "ppl_wizard": 24.0, "ppl_long": {"2048": 20.0}},
            25.0,
            control="finetuned-teacher--lolcats@150k",
        ),
        unit(quality, "lolcats", 150_000, {"ppl_heldout": 8.0, "ppl_wizard": 16.0}, 25.0, control=True),
    ):
        units[u["unit"]] = json.loads(json.dumps(u))
    result = quality.collect(units)
    rows = {r["recipe"]: r for r in result["runs"]}
    assert set(rows) == {"lin", "lolcats"}  # the control is a reference, not a row
    assert rows["lolcats"]["x_finetuned_teacher"]["heldout"] == pytest.approx(12.0 / 8.0)
    assert rows["lin"]["x_finetuned_teacher"]["heldout"] == pytest.approx(13.0 / 10.0)  # KL only: the teacher
    assert rows["lin"]["x_sliding_window"]["long"]["2048"] == pytest.approx(40.0 / 25.0)
    verdict = result["verdicts"]["150k"]
    assert "best is lolcats" in verdict and "lin at 2048 tokens (1.60x)" in verdict
    quality.write_markdown(result, tmp_path / "quality.md", units)
    md = (tmp_path / "quality.md").read_text()
    assert "× sliding window (2048)" in md and "| `lolcats` | 150,000 |" in md
    assert "AMD EPYC (2 threads, no bf16 instructions) with `--set teacher.dtype=float32`" in md


def test_a_report_without_student_units_says_so_and_drops_the_stale_table(quality, tmp_path):
    results = tmp_path / "results"
    (results / "units").mkdir(parents=True)
    for stale in ("quality.md", "quality.json", "quality_vs_tokens.png"):
        (results / stale).write_text("an old table")
    quality.report(argparse.Namespace(results=results))
    assert "No student unit" in (results / "quality.md").read_text()
    assert not (results / "quality.json").exists() and not (results / "quality_vs_tokens.png").exists()
