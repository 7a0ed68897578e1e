"""`student.layers=auto:N` through the pipeline: stage 1 on every layer, the N layers with the highest
alignment loss kept as softmax, the ranking recorded, and a rerun that resumes with the same plan."""

import json

import torch
from transformers import AutoModelForCausalLM

import linearize  # noqa: F401  (registers the converted classes with the Auto classes)
from linearize.architectures.mixers import GatedDeltaMixer, SoftmaxMixer
from linearize.config import load_recipe
from linearize.pipeline import convert

OVERRIDES = {
    "student.mixer": "gated_delta",
    "student.layers": "auto:2",
    "stages.attention.steps": "3",
    "stages.logits.steps": "2",
    "stages.attention.batch_size": "2",
    "stages.logits.batch_size": "2",
    "data.heldout_docs": "4",
    "eval.tasks": "[]",
}


def test_auto_plan_keeps_the_worst_aligned_layers_and_records_the_ranking(tmp_path, capsys):
    recipe = load_recipe("tiny", {**OVERRIDES, "output_dir": str(tmp_path / "run")})
    out = convert(recipe)
    run = tmp_path / "run"
    ranking = json.loads((run / "layer_ranking.json").read_text())
    assert sorted(r["layer"] for r in ranking) == [0, 1, 2, 3, 4]  # the bundled teacher's 5 layers
    losses = [r["loss"] for r in ranking]
    assert losses == sorted(losses, reverse=True) and all(x > 0 for x in losses)
    kept = sorted(r["layer"] for r in ranking[:2])

    config = json.loads((out / "config.json").read_text())
    assert config["linearize"]["softmax_layers"] == kept
    assert config["linearize"]["layer_ranking"] == ranking
    assert [t == "full_attention" for t in config["layer_types"]] == [i in kept for i in range(5)]
    card = (out / "README.md").read_text()
    assert "## Layer plan `auto:2`" in card and f"| {ranking[0]['layer']} |" in card
    assert "student_after_layer_plan" in json.loads((run / "eval.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    kinds = [type(layer.self_attn) for layer in model.model.layers]
    assert kinds == [SoftmaxMixer if i in kept else GatedDeltaMixer for i in range(5)]
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    with torch.no_grad():
        first = model(ids).logits

    # a rerun finds both stages done, reuses the ranking, and exports the same model
    capsys.readouterr()
    again = convert(recipe)
    printed = capsys.readouterr().out
    assert "[attention] already done" in printed and "[logits] already done" in printed
    assert f"keeping softmax in layers {kept}" in printed
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(again).eval()(ids).logits, first)
