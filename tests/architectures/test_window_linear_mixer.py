"""The window_linear mixer (LoLCATs' sliding-window softmax + linear attention) in converted models."""

import pytest
import torch
from conftest import student_config, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize  # noqa: F401  (registers the converted classes with the Auto classes)
from linearize.architectures.mixers import LinearMixer, SoftmaxMixer, WindowLinearMixer, mixers
from linearize.assets import bundled_path
from linearize.config import Recipe, RecipeError, StudentConfig
from linearize.convert.export import export
from linearize.convert.swap import plan_for, swap

WINDOW = 8  # shorter than the test sequences, so the linear branch carries real weight


def window_student(family, layers="all", window=WINDOW):
    """A tiny window_linear student with non-trivial feature maps and window factors; returns (student, plan)."""
    teacher = tiny_model(family)
    plan = plan_for(
        student_config(mixer="window_linear", window=window, layers=layers),
        teacher.config,
    )
    student = swap(teacher, plan)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".feature_map_" in n or n.endswith("window_factor_logit"):
                p.add_(0.3 * torch.randn_like(p))
    return student, plan


def exported(family, tmp_path, layers="all"):
    student, plan = window_student(family, layers)
    tok = AutoTokenizer.from_pretrained(bundled_path("stories260K"))
    out = export(student, tok, plan, Recipe(), tmp_path / family)
    return student, out


def test_swap_builds_window_mixers_with_new_parameters():
    student, _ = window_student("llama", layers=[1])
    layers = student.model.layers
    assert isinstance(layers[0].self_attn, WindowLinearMixer) and isinstance(
        layers[1].self_attn, SoftmaxMixer
    )
    attn = layers[0].self_attn
    assert attn.window == WINDOW and attn.window_factor_logit.shape == (4,)
    assert set(attn.new_parameter_names()) == {
        "feature_map_q.weight",
        "feature_map_k.weight",
        "window_factor_logit",
    }
    fresh = plan_for(student_config(mixer="window_linear"), tiny_model("llama").config)
    mixer = swap(tiny_model("llama"), fresh).model.layers[0].self_attn
    assert mixer.window == 64 and torch.allclose(torch.sigmoid(mixer.window_factor_logit), torch.tensor(0.5))


def test_recipe_validates_window_fields():
    with pytest.raises(RecipeError, match="student.settings.window must be an integer >= 1"):
        student_config(mixer="window_linear", window=0)
    with pytest.raises(RecipeError, match="window_factor_init must lie in the open interval"):
        student_config(mixer="window_linear", window_factor_init=1.0)


def test_padded_prefill_has_no_nan_and_ignores_pads(tmp_path):
    """A padded query whose whole window is padding gives finite values; real tokens' logits do not
    depend on what the pads hold."""
    _, out = exported("llama", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    real = torch.randint(3, 512, (1, 6))
    mask = torch.cat([torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model(torch.cat([torch.zeros(1, 12, dtype=torch.long), real], 1), attention_mask=mask).logits
        b = model(torch.cat([torch.randint(3, 512, (1, 12)), real], 1), attention_mask=mask).logits
        alone = model(real).logits
    assert torch.isfinite(a).all()
    assert (a[:, 12:] - b[:, 12:]).abs().max().item() <= 1e-5
    assert (a[:, 12:] - alone).abs().max().item() <= 1e-4


def test_window_linear_branches_are_o_proj_of_zero_and_the_linear_mixer(family):
    """(The branches of every hybrid mixer are checked in test_mixers.py.) For window_linear, no_attention is
    o_proj(0) and linear_only is the linear mixer's attention over all keys with the same feature maps."""
    student, _ = window_student(family)
    layer = mixers(student)[0]
    hidden = torch.randn(2, 5, student.config.hidden_size)
    pos = student.model.rotary_emb(hidden, torch.arange(5)[None])
    with torch.no_grad():
        got, _ = layer.forward_branch("no_attention", hidden, position_embeddings=pos)
        assert torch.equal(got, layer.o_proj(torch.zeros(2, 5, layer.num_heads * layer.head_dim)))
        got, _ = layer.forward_branch("linear_only", hidden, position_embeddings=pos)
        assert (got - LinearMixer.attend(layer, hidden, pos, None)).abs().max().item() <= 1e-6


def test_branches_refused_by_other_mixers():
    teacher = tiny_model("llama")
    student = swap(teacher, plan_for(StudentConfig(), teacher.config))
    hidden = torch.randn(1, 3, student.config.hidden_size)
    pos = student.model.rotary_emb(hidden, torch.arange(3)[None])
    with pytest.raises(
        ValueError, match="branch 'window_only' needs a hybrid mixer .* layer 0 is LinearMixer"
    ):
        student.model.layers[0].self_attn.forward_branch("window_only", hidden, pos)
