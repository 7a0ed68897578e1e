"""The per-step losses of tiny runs equal the golden files recorded before stage 1 moved to captured
teacher activations (tests/assets/losses, commit d7d5177): the refactor changed how the losses are
computed, not what they are. Short runs of the linear and window_linear mixers, LoRA and an `auto:2` plan
run by default; the gated, gated_slot and gated_delta runs and the shipped `tiny` recipe (150 + 300 steps)
are `slow`."""

import json
from pathlib import Path

import pytest

from linearize.config import load_recipe
from linearize.pipeline import convert

GOLDEN = Path(__file__).parent / "assets" / "losses"
DEFAULT = ["tiny-short", "tiny-short-lora", "window_linear", "auto2"]  # the other mixers' runs are `slow`
SLOW = sorted(p.stem for p in GOLDEN.glob("*.json") if p.stem not in DEFAULT)


def run_losses(name: str, tmp_path: Path) -> tuple[dict, dict]:
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(golden["recipe_yaml"])
    convert(load_recipe(str(recipe_path), {"output_dir": str(tmp_path / "run")}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {stage: [r["loss"] for r in records if r["stage"] == stage] for stage in golden["losses"]}
    return losses, golden["losses"]


def assert_same(losses: dict, golden: dict) -> None:
    for stage, expected in golden.items():
        assert len(losses[stage]) == len(expected), stage
        assert losses[stage] == pytest.approx(expected, rel=1e-5, abs=1e-7), stage


@pytest.mark.parametrize("name", DEFAULT)
def test_short_runs_reproduce_the_golden_losses(name, tmp_path):
    assert_same(*run_losses(name, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_every_other_golden_run_reproduces_its_losses(name, tmp_path):
    assert_same(*run_losses(name, tmp_path))
