"""benchmarks/ablate.py: a variant keeps the budget, split as the shipped recipe splits it or as it says."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def ablate():
    sys.path.insert(0, str(BENCHMARKS))  # ablate.py imports its sibling quality.py
    spec = importlib.util.spec_from_file_location("ablate_benchmark", BENCHMARKS / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))


def args_for(budget: int) -> argparse.Namespace:
    return argparse.Namespace(
        recipe="tiny", budget=budget, train=[], text_dir=BENCHMARKS, sets={}, teacher="bundled:stories260K"
    )


def test_variants_parse(ablate):
    assert ablate.parse_variant("shipped") == ("shipped", {})
    name, overrides = ablate.parse_variant("b2:stages.attention.batch_size=2; split=0.5")
    assert name == "b2" and overrides == {"stages.attention.batch_size": "2", "split": "0.5"}
    with pytest.raises(SystemExit, match="NAME"):
        ablate.parse_variant(":stages.attention.lr=1")


def test_a_batch_size_variant_keeps_the_split_and_changes_the_steps(ablate):
    # tiny: attention 150 x 8 x 256, logits 300 x 8 x 256 -> a third of the tokens in stage 1
    _, shipped = ablate.variant_overrides(args_for(61_440), {})
    assert shipped == {"attention": 10 * 2048, "logits": 20 * 2048}
    overrides, tokens = ablate.variant_overrides(args_for(61_440), {"stages.attention.batch_size": "2"})
    assert overrides["stages.attention.steps"] == "40" and overrides["stages.attention.batch_size"] == "2"
    assert tokens == shipped


def test_split_sets_the_share_of_stage_one(ablate):
    overrides, tokens = ablate.variant_overrides(args_for(61_440), {"split": "0.5"})
    assert "split" not in overrides
    assert tokens == {"attention": 15 * 2048, "logits": 15 * 2048}
    with pytest.raises(SystemExit, match="between 0 and 1"):
        ablate.variant_overrides(args_for(61_440), {"split": "2"})
