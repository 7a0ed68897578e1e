"""The pipeline's frozen teacher copy (stage logits, trainable=attention) on one process; its ZeRO-3 engine
is tested on 2 ranks in tests/distill/test_deepspeed.py."""

import json
import math

from linearize.config import Recipe, load_recipe
from linearize.convert.pipeline import convert, deepspeed_frozen_teacher, prepare_frozen_teacher
from linearize.convert.teachers import load_teacher
from linearize.distill.loop import make_accelerator


def test_without_sharding_the_frozen_teacher_is_the_module_itself_frozen():
    teacher, _ = load_teacher("bundled:stories260K")
    teacher.train()
    frozen = prepare_frozen_teacher(make_accelerator(Recipe()), teacher, batch_size=2)
    assert frozen is teacher and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())
    # ZeRO-1/2 keep whole weights on every process: no engine, nothing imported
    assert deepspeed_frozen_teacher(teacher, {"zero_optimization": {"stage": 2}}, 2, 8) is teacher


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
