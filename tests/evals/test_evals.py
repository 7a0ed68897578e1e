"""The eval harness on the bundled teacher and an untrained all-linear student exported from it."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import student_config

from linearize.config import Recipe, StudentConfig
from linearize.convert.export import export
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher
from linearize.evals import TASKS, EvalError, check_task_name
from linearize.evals.harness import EvalContext, EvalSettings, Scorer, evaluate, load_student
from linearize.evals.report import CANNOT

SMALL = dict(
    mqar_pairs=[2, 4],
    mqar_lengths=[32, 64],
    mqar_samples=4,
    passkey_lengths=[192, 256],
    passkey_depths=[0.0, 1.0],
    passkey_samples=2,
    speed_lengths=[16, 96],
    decode_tokens=3,
    speed_repeats=1,
    cloze_passages=40,
    ppl_max_blocks=6,
    lm_eval_limit=8,
)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    teacher, tok = load_teacher("bundled:stories260K")
    plan = plan_for(StudentConfig(), teacher.config)
    torch.manual_seed(0)
    student = swap(teacher, plan)
    return export(student, tok, plan, Recipe(), tmp_path_factory.mktemp("eval") / "final")


@pytest.fixture(scope="module")
def ctx(student_dir):
    torch.set_num_threads(1)
    student, tok, recipe = load_student(student_dir, torch.device("cpu"))
    teacher, _ = load_teacher("bundled:stories260K")
    return EvalContext(
        teacher=Scorer("teacher", teacher),
        student=Scorer("student", student),
        tokenizer=tok,
        settings=EvalSettings(**SMALL),
        recipe=recipe,
    )


@pytest.fixture(scope="module")
def report(student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    tasks = ["ppl", "recall", "cloze", "speed", "controls", "lm_eval:linearize_cloze"]
    results = evaluate(student_dir, tasks, out=out, settings=EvalSettings(**SMALL), log=lambda _: None)
    return results, out


def test_importing_evals_imports_neither_torch_tasks_nor_lm_eval():
    code = (
        "import sys, linearize.evals, linearize.evals.harness, linearize.evals.report;"
        "assert 'lm_eval' not in sys.modules; assert 'linearize.evals.recall' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_task_lists_known_ones():
    with pytest.raises(EvalError) as err:
        check_task_name("perplexity")
    for name in TASKS:
        assert name in str(err.value)
    assert "lm_eval:" in str(err.value)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(tmp_path / "nothing", ["ppl"], out=tmp_path / "r")


def test_teacher_with_another_vocabulary_is_refused(student_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    config = LlamaConfig(
        vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(tmp_path / "other")
    with pytest.raises(EvalError, match="teacher vocab mismatch"):
        evaluate(student_dir, ["ppl"], out=tmp_path / "r", teacher=str(tmp_path / "other"))


def test_cli_eval_errors_are_clear(student_dir, tmp_path):
    from linearize.cli import main

    with pytest.raises(SystemExit, match="unknown eval task 'nope'.*ppl, recall"):
        main(["eval", f"model={student_dir}", "tasks=nope"])
    with pytest.raises(SystemExit, match="unknown eval option 'mqar_pair'"):
        main(["eval", f"model={student_dir}", "mqar_pair=[2]"])
    with pytest.raises(SystemExit, match="needs model="):
        main(["eval"])


def test_settings_from_pairs_parse_lists_and_check_choices():
    s = EvalSettings.from_pairs({"mqar_pairs": "[2,4]", "passkey_depths": "[0, 1]", "controls": "window"})
    assert s.mqar_pairs == [2, 4] and s.passkey_depths == [0.0, 1.0] and s.controls == ["window"]
    s = EvalSettings.from_pairs({"mqar_pairs": "2,4", "controls": "window,branches"})
    assert s.mqar_pairs == [2, 4] and s.controls == ["window", "branches"]
    with pytest.raises(EvalError, match="ppl_mode"):
        EvalSettings.from_pairs({"ppl_mode": "sliding"})


def test_settings_from_pairs_name_the_field_and_the_valid_keys():
    s = EvalSettings.from_pairs({"ppl_data": "a.txt,b.txt", "passkey_depths": "0,0.5", "device": "cuda:1"})
    assert s.ppl_data == ["a.txt", "b.txt"] and s.passkey_depths == [0.0, 0.5] and s.device == "cuda:1"
    with pytest.raises(EvalError, match=r"batch_size must be an integer, got 'many'"):
        EvalSettings.from_pairs({"batch_size": "many"})
    with pytest.raises(
        EvalError, match=r"unknown eval option 'mqar_pair'; valid keys: model, teacher, tasks, out, seed"
    ):
        EvalSettings.from_pairs({"mqar_pair": "[2]"})


def test_settings_for_recipe_map_the_recipes_eval_section():
    recipe = Recipe(seed=7)
    recipe.eval.batch_size, recipe.eval.seq_len, recipe.eval.max_blocks = 3, 64, 5
    recipe.data.add_bos = False
    s = EvalSettings.for_recipe(recipe, torch.device("cpu"))
    assert (s.seed, s.device, s.batch_size, s.add_bos) == (7, "cpu", 3, False)
    assert (s.ppl_seq_len, s.ppl_max_blocks) == (64, 5)
    assert s.mqar_pairs == EvalSettings().mqar_pairs  # what the recipe does not set keeps its default


def test_ppl_scores_teacher_below_untrained_student_on_the_same_tokens(ctx):
    from linearize.evals.perplexity import perplexity, ppl_task

    res = ppl_task(ctx)
    assert res["teacher"]["tokens"] == res["student"]["tokens"] > 0
    assert res["teacher"]["ppl"] < res["student"]["ppl"]
    assert res["meta"]["bos"].startswith("prepended") and res["meta"]["mode"] == "window"
    docs = [[1, 5, 6, 7], [1, 8, 9]]
    assert perplexity(ctx.teacher.model, docs, seq_len=4)["tokens"] == 3 + 2


def test_ppl_with_the_window_baseline_scores_it_on_the_same_windows(ctx):
    import dataclasses

    from linearize.evals.perplexity import ppl_task

    def with_window(window: int) -> dict:
        settings = dataclasses.replace(ctx.settings, ppl_window=True, window=window, sinks=2)
        return ppl_task(dataclasses.replace(ctx, settings=settings))

    narrow, wide = with_window(8), with_window(10_000)
    assert narrow["sliding_window"]["tokens"] == narrow["teacher"]["tokens"]
    # a window wider than the text is the teacher itself; a narrow one loses context
    assert wide["sliding_window"]["ppl"] == pytest.approx(wide["teacher"]["ppl"], rel=1e-5)
    assert narrow["sliding_window"]["ppl"] > narrow["teacher"]["ppl"] * 1.05
    assert narrow["ratio_to_window"] == narrow["student"]["ppl"] / narrow["sliding_window"]["ppl"]
    assert "sliding_window" not in ppl_task(ctx)


def test_recall_grids_and_teacher_not_below_untrained_student(ctx):
    from linearize.evals.recall import recall_task

    res = recall_task(ctx)
    mq, pk = res["mqar"], res["passkey"]
    assert len(mq["teacher"]["accuracy"]) == 2 and len(mq["teacher"]["accuracy"][0]) == 2
    assert len(pk["student"]["accuracy"]) == 2 and len(pk["student"]["accuracy"][0]) == 2
    for grid in (mq["teacher"]["accuracy"], pk["teacher"]["accuracy"]):
        assert all(v is None or 0 <= v <= 1 for row in grid for v in row)
    # The 260K-parameter bundled teacher is at chance on token-id MQAR (it never learned in-context
    # copying), so only "not below" can be asserted here; the strict check on SmolLM2-135M is below.
    assert mq["teacher"]["mean"] >= mq["student"]["mean"]


def test_mqar_scores_a_real_teacher_above_its_untrained_linear_student(smollm2_path):
    """The strict check the 260K teacher cannot give: SmolLM2-135M recalls in context, its all-linear
    swap (no training) does not, and MQAR must tell them apart."""
    from linearize.evals.recall import mqar

    torch.set_num_threads(2)
    teacher, tok = load_teacher(str(smollm2_path))
    student, _ = load_teacher(str(smollm2_path))
    student = swap(student, plan_for(StudentConfig(), student.config))
    settings = EvalSettings(mqar_pairs=[4, 8], mqar_lengths=[64], mqar_samples=16, batch_size=16)
    real = EvalContext(Scorer("teacher", teacher), Scorer("student", student), tok, settings)
    res = mqar(real, real.scorers)
    # 96 queries; the value pool holds ~16k ids, so chance is ~0.01% and one right answer is signal.
    assert res["teacher"]["mean"] >= 0.05, res
    assert res["student"]["mean"] <= res["teacher"]["mean"] / 4, res


def test_mqar_and_passkey_samples_are_well_formed(ctx):
    from linearize.evals.recall import mqar_batch, passkey_prompt, token_pools

    pools = token_pools(ctx.tokenizer, 512)
    ids, pos, values = mqar_batch(4, 40, 3, pools, [1], torch.Generator().manual_seed(0))
    assert ids.shape == (3, 40) and ids[0, 0] == 1
    assert torch.equal(ids.gather(1, pos + 1), values)  # the value follows each queried key
    for row in range(3):  # and it is the value that followed the same key in the context
        context = dict(zip(ids[row, 1:9:2].tolist(), ids[row, 2:9:2].tolist()))
        assert [context[k] for k in ids[row].gather(0, pos[row]).tolist()] == values[row].tolist()
    made = passkey_prompt(ctx.tokenizer, 200, 0.5, "12345", [1])
    ids, start = made
    assert len(ids) == 200 and "12345" in ctx.tokenizer.decode(ids[start:]).replace(" ", "")
    assert passkey_prompt(ctx.tokenizer, 20, 0.5, "12345", [1]) is None


def test_cloze_scores_teacher_above_untrained_student(ctx):
    from linearize.evals.cloze import cloze_task

    res = cloze_task(ctx)
    assert res["meta"]["passages"] > 30
    assert res["teacher"]["accuracy"] > res["student"]["accuracy"]
    assert res["teacher"]["token_ppl"] < res["student"]["token_ppl"]


def test_shipped_lm_eval_data_is_what_the_cloze_generator_writes(tmp_path):
    from linearize.data import load_documents
    from linearize.evals.cloze import passages, write_jsonl
    from linearize.evals.lmeval import shipped_tasks_folder

    texts = passages(load_documents("bundled:tinystories_docs.txt")[-49:], 200, 0)
    write_jsonl(tmp_path / "x.jsonl", texts)
    shipped = shipped_tasks_folder() / "linearize_cloze" / "linearize_cloze.jsonl"
    assert shipped.read_text() == (tmp_path / "x.jsonl").read_text()


def test_speed_student_cache_is_constant_teacher_cache_grows(ctx):
    from linearize.evals.speed import speed_task

    res = speed_task(ctx)
    assert res["lengths"] == [16, 96]
    assert res["student"]["cache_growth_bytes"] == 0
    assert res["teacher"]["cache_growth_bytes"] > 0
    t_rows = res["teacher"]["rows"]
    assert t_rows[1]["cache_bytes_after_prefill"] > t_rows[0]["cache_bytes_after_prefill"]
    assert all(r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in t_rows + res["student"]["rows"])


def test_sliding_window_mask_keeps_window_and_sinks(ctx):
    from linearize.evals.controls import sliding_window_mask

    model = ctx.teacher.model
    ids = torch.randint(3, 512, (1, 80), generator=torch.Generator().manual_seed(0))
    full = Scorer("t", model).logits(ids)
    wide = Scorer("w", model, lambda n, d: sliding_window_mask(n, d, window=80, sinks=0)).logits(ids)
    assert (wide - full).abs().max() < 1e-5  # a window as long as the sequence is full attention
    narrow = Scorer("w", model, lambda n, d: sliding_window_mask(n, d, window=8, sinks=2))
    base = narrow.logits(ids)[0, -1]
    outside, sink = ids.clone(), ids.clone()
    # neither a sink nor within the last token's reach (5 layers x 7 earlier tokens)
    outside[0, 10] = (outside[0, 10] + 1) % 509 + 3
    sink[0, 1] = (sink[0, 1] + 1) % 509 + 3
    assert (narrow.logits(outside)[0, -1] - base).abs().max() < 1e-6
    assert (narrow.logits(sink)[0, -1] - base).abs().max() > 1e-4
    assert (full[0, -1] - base).abs().max() > 1e-4


def test_branch_controls_need_a_hybrid_student(ctx):
    from linearize.evals.controls import controls_task, hybrid_branch_controls

    with pytest.raises(
        EvalError,
        match=r"controls for hybrid branches need a hybrid student \(window_linear or gated with gated_window\)",
    ):
        hybrid_branch_controls(ctx)
    ctx.settings.controls = ["branches"]
    try:
        with pytest.raises(EvalError, match="need a hybrid student"):
            controls_task(ctx)
    finally:
        ctx.settings.controls = ["window"]


def test_lm_eval_missing_is_a_clear_error(ctx, monkeypatch):
    from linearize.evals import resolve_task

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(EvalError, match=r"pip install linearize\[eval\]"):
        resolve_task("lm_eval:linearize_cloze")(ctx)


def test_report_files_exist_and_parse(report):
    results, out = report
    import matplotlib.image

    assert not list(out.parent.glob(".tmp-*"))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["tasks"]) == {"ppl", "recall", "cloze", "speed", "controls", "lm_eval:linearize_cloze"}
    assert {"teacher", "student", "sliding_window"} <= set(saved["tasks"]["controls"]["window"]["ppl"])
    assert "verdict" in saved["tasks"]["controls"]["window"]
    assert saved["info"]["recipe"]["name"] == "tiny" and saved["info"]["token_budget_per_process"]
    text = (out / "report.md").read_text()
    plotted = ["ppl.png", "speed.png"]
    for kind, name in (("mqar", "MQAR"), ("passkey", "passkey retrieval")):
        task = saved["tasks"]["recall"][kind]
        if task["teacher"]["mean"] < CANNOT:  # the 260K teacher is at chance on MQAR: said, not plotted
            assert (
                f"The teacher itself cannot do {name}" in text and not (out / f"recall_{kind}.png").exists()
            )
        else:
            plotted.append(f"recall_{kind}.png")
    for name in plotted:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100
    for heading in (
        "## Perplexity",
        "## Recall",
        "## Cloze",
        "## Speed",
        "## Controls",
        "## lm_eval:linearize_cloze",
    ):
        assert heading in text
    assert "x teacher" in text and "sliding_window" in text


def test_offline_lm_eval_task_runs_through_lm_eval(report):
    results, _ = report
    res = results["tasks"]["lm_eval:linearize_cloze"]
    teacher, student = res["teacher"]["linearize_cloze"], res["student"]["linearize_cloze"]
    assert 0 <= student["acc"] <= teacher["acc"] <= 1 and teacher["perplexity"] < student["perplexity"]
    assert "sample_len" not in teacher and set(teacher) == set(student)  # metrics only, no bookkeeping


def test_report_plots_the_loss_curves_of_the_run(report, tmp_path):
    """A report of a converted run plots its training losses (metrics.jsonl) per stage, axes from zero."""
    import matplotlib.image

    from linearize.evals.report import write_report

    results, _ = report
    training = [
        {"stage": stage, "step": step, "loss": 1.0 / step, "tokens": step * 512}
        for stage in ("attention", "logits")
        for step in range(1, 6)
    ]
    results = {**results, "info": {**results["info"], "training": training}}
    write_report(results, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Training" in text and "![loss](loss.png)" in text
    assert matplotlib.image.imread(tmp_path / "report" / "loss.png").shape[1] > 100


@pytest.mark.skipif(shutil.which("lm_eval") is None, reason="lm-eval's CLI is not installed")
def test_exported_checkpoint_runs_with_plain_lm_eval_cli(student_dir, tmp_path):
    from linearize.evals.lmeval import shipped_tasks_folder

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "m"),
    }
    cmd = [
        shutil.which("lm_eval"),
        "--model",
        "hf",
        "--model_args",
        f"pretrained={student_dir},trust_remote_code=True",
        "--device",
        "cpu",
        "--tasks",
        "linearize_cloze",
        "--include_path",
        str(shipped_tasks_folder()),
        "--limit",
        "5",
        "--output_path",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "linearize_cloze" in proc.stdout and "acc" in proc.stdout


@pytest.mark.parametrize(
    "fields", [dict(mixer="window_linear", window=16), dict(mixer="gated", gated_window=True, window=16)]
)
def test_branch_controls_score_each_branch_of_a_hybrid_student(fields, tmp_path):
    """Both hybrid mixers: window only, linear only and no attention each get the student's metrics
    (perplexity, MQAR, passkey); switching off all attention is the worst of them; the report shows the
    table and says whether the student beats each of its branches."""
    torch.set_num_threads(1)
    teacher, tok = load_teacher("bundled:stories260K")
    plan = plan_for(student_config(**fields), teacher.config)
    torch.manual_seed(0)
    folder = export(swap(teacher, plan), tok, plan, Recipe(), tmp_path / "final")
    settings = EvalSettings(**SMALL, controls=["branches"])
    results = evaluate(folder, ["controls"], out=tmp_path / "report", settings=settings, log=lambda _: None)
    out = results["tasks"]["controls"]["branches"]
    branches = ("window_only", "linear_only", "no_attention")
    ppl = {b: out[b]["ppl"] for b in branches}
    assert len(set(ppl.values())) == 3 and all(0 < x < float("inf") for x in ppl.values()), ppl
    assert ppl["no_attention"] == max(ppl.values()), ppl
    assert all(0 <= out[b][metric] <= 1 for b in (*branches, "student") for metric in ("mqar", "passkey"))
    assert out["student_beats_branches"] == {b: out["student"]["ppl"] < ppl[b] for b in branches}
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| window_only |" in text and "| no_attention |" in text
    expected = (
        "beats each of its branches" if all(out["student_beats_branches"].values()) else "does NOT beat"
    )
    assert expected in out["verdict"] and out["verdict"] in text
