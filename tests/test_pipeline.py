"""The conversion flow on one process: the teacher and the frozen copy stage logits trains against, the
fine-tuned-teacher control; the ZeRO-3 engine of the teacher is tested on 2 ranks in
tests/distributed/test_deepspeed.py."""

import json
import math

from linearize.config import load_recipe
from linearize.convert.teachers import load_teacher
from linearize.pipeline import convert


def test_convert_trains_attention_against_the_frozen_copy(tmp_path):
    overrides = {
        "output_dir": str(tmp_path / "run"),
        "stages.attention.steps": "1",
        "stages.logits.steps": "3",
        "stages.logits.trainable": "attention",
        "data.heldout_docs": "0",
        "eval.tasks": "[]",
    }
    convert(load_recipe("tiny", overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["stage"] == "logits"]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_the_fine_tuned_teacher_control_skips_stage_attention_and_exports_a_softmax_model(tmp_path, capsys):
    """student.mixer=softmax: every layer stays softmax, stage attention has nothing to train and is
    skipped, stage logits fine-tunes the teacher on CE, and the export loads and generates."""
    import torch
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401  (registers the converted classes)

    overrides = {
        "output_dir": str(tmp_path / "run"),
        "student.mixer": "softmax",
        "student.settings": "{}",
        "stages.attention.steps": "2",
        "stages.logits.steps": "2",
        "stages.logits.ce_weight": "1",
        "stages.logits.lr": "0.01",
        "data.heldout_docs": "0",
        "eval.tasks": "[]",
    }
    out = convert(load_recipe("tiny", overrides))
    assert "[attention] skipped: student.mixer=softmax" in capsys.readouterr().out
    assert not (tmp_path / "run" / "attention").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"logits"}
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["full_attention"] * 5
    exported = AutoModelForCausalLM.from_pretrained(out)
    teacher, _ = load_teacher("bundled:stories260K")
    ids = torch.tensor([[1, 403, 407, 261, 378, 395, 261, 3, 262, 323]])
    with torch.no_grad():
        moved = (exported(ids).logits - teacher(ids).logits).abs().max().item()
    assert moved > 1e-2
    generated = exported.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 18)


def test_a_rerun_is_refused_only_for_a_recipe_that_changes_the_run(tmp_path):
    """The refusal names the fields that differ; a new description or hardware line is no difference, and
    neither is a field added to the schema since the run started (read at its default)."""
    import yaml

    from linearize.config import load_recipe
    from linearize.pipeline import recipe_differences

    saved = tmp_path / "recipe.yaml"
    recipe = load_recipe("tiny", {"output_dir": str(tmp_path)})
    tree = recipe.to_dict()
    tree["description"] = "an older wording"
    tree["launch"]["hardware"] = "a laptop"
    del tree["student"]["settings"]["feature_bias"]  # as a run started before the field existed saved it
    tree["student"]["settings"]["feature_bias"] = (
        recipe.student.settings.feature_bias
    )  # ...at the recipe's value
    saved.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert recipe_differences(saved, recipe) == []
    del tree["student"]["settings"]["feature_bias"]  # absent: the default (false); the tiny recipe says true
    saved.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert recipe_differences(saved, recipe) == ["student.settings.feature_bias: False then, True now"]
    other = load_recipe("tiny", {"output_dir": str(tmp_path), "seed": "5", "stages.logits.lr": "0.01"})
    saved.write_text(recipe.to_yaml())
    assert recipe_differences(saved, other) == [
        "seed: 0 then, 5 now",
        "stages.logits.lr: 0.005 then, 0.01 now",
    ]
