import json

import torch
from conftest import tiny_model
from transformers import AutoTokenizer

import linearize  # noqa: F401  (registers the converted classes with the Auto classes)
from linearize.assets import bundled_path
from linearize.config import Recipe, StudentConfig
from linearize.convert.export import BUNDLE, MAX_SHARD_SIZE, export
from linearize.convert.swap import plan_for, swap


def converted(family: str, tmp_path, layers="all"):
    """A tiny converted model with non-trivial feature maps, exported; returns (in-memory, folder)."""
    teacher = tiny_model(family)
    plan = plan_for(StudentConfig(layers=layers), teacher.config)
    student = swap(teacher, plan)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".feature_map_" in n:
                p.add_(0.3 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(bundled_path("stories260K"))
    out = export(student, tok, plan, Recipe(), tmp_path / family)
    return student, out


def test_export_folder_contents(tmp_path):
    _, out = converted("llama", tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "recipe.yaml", "README.md", "COMPLETE", "linear_attn_chunked.py"} <= names
    assert set(BUNDLE) <= names
    assert any(n.endswith(".safetensors") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "linearize_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linearize.LinearizeLlamaForCausalLM"
    assert config["layer_types"] == ["linear_attention"] * 3
    assert MAX_SHARD_SIZE == "5GB"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "linear-attention" in card
    assert not (tmp_path / ".tmp-llama").exists()


def test_exported_code_imports_neither_linearize_nor_fla_outside_fallbacks(tmp_path):
    _, out = converted("llama", tmp_path)
    from transformers.dynamic_module_utils import get_imports

    for name in (*BUNDLE, "linear_attn_chunked.py"):
        assert not {"linearize", "fla"} & set(get_imports(out / name)), name
