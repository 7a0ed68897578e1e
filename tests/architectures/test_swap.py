import pytest
import torch
from conftest import student_config, tiny_config, tiny_model

from linearize.architectures.mixers import LinearMixer, SoftmaxMixer
from linearize.config import RecipeError
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import TeacherError, family_of


def make_plan(config, **student):
    return plan_for(student_config(**student), config)


def test_softmax_swap_keeps_teacher_logits(family):
    """Swap invariance: the softmax mixer reproduces the teacher exactly, in every family."""
    teacher = tiny_model(family)
    ids = torch.randint(0, 512, (2, 40))  # longer than Mistral's window of 16
    with torch.no_grad():
        expected = teacher(ids).logits
        student = swap(teacher, make_plan(teacher.config, mixer="softmax"))
        got = student(ids).logits
    assert all(isinstance(layer.self_attn, SoftmaxMixer) for layer in student.model.layers)
    assert (got - expected).abs().max().item() <= 1e-5


def test_the_swapped_teacher_stays_the_teacher_and_shares_the_weights(family):
    """swap builds the student on the teacher's own weight tensors: the teacher still computes the teacher
    (it is stage attention's and LoRA's teacher) and costs no memory of its own."""
    teacher = tiny_model(family)
    ids = torch.randint(0, 512, (1, 33))
    with torch.no_grad():
        expected = teacher(ids).logits
        student = swap(teacher, make_plan(teacher.config))
        linear = student(ids).logits
        again = teacher(ids).logits
    assert torch.equal(again, expected)
    assert (linear - expected).abs().max().item() > 1e-3  # the linear student really differs
    shared = {id(p) for p in teacher.parameters()}
    assert all(id(p) in shared for n, p in student.named_parameters() if ".feature_map_" not in n)
    assert (linear - expected).abs().max().item() > 1e-3  # the linear student really differs


def test_swap_reuses_teacher_projections_and_keeps_state_dict_keys(family):
    teacher = tiny_model(family)
    q_proj = teacher.model.layers[0].self_attn.q_proj
    keys = set(teacher.state_dict())
    student = swap(teacher, make_plan(teacher.config, layers=[1]))
    layers = student.model.layers
    assert layers[0].self_attn.q_proj.weight is q_proj.weight
    assert isinstance(layers[0].self_attn, LinearMixer) and isinstance(layers[1].self_attn, SoftmaxMixer)
    new = set(student.state_dict()) - keys
    assert keys <= set(student.state_dict())
    assert new and all(".feature_map_" in k for k in new)
    assert not any(k.startswith("model.layers.1.") for k in new)


def test_swap_twice_is_an_error():
    teacher = tiny_model("llama")
    plan = make_plan(teacher.config)
    student = swap(teacher, plan)
    with pytest.raises(ValueError, match="already converted"):
        swap(student, plan)


def test_unsupported_family_names_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(TeacherError, match="llama, mistral, qwen2, qwen3"):
        family_of(GPT2Config())


def test_layer_plans_resolve_against_the_teacher():
    config = tiny_config("llama")  # 3 layers
    assert make_plan(config).softmax_layers == []
    assert make_plan(config, layers=[2, 0, 2]).softmax_layers == [0, 2]
    assert make_plan(config, layers="every:2").softmax_layers == [1]
    auto = make_plan(config, layers="auto:2")
    assert auto.softmax_layers == [] and auto.auto_softmax == 2
    with pytest.raises(RecipeError, match=r"out of range: the teacher has 3 layers"):
        make_plan(config, layers=[3])
    with pytest.raises(RecipeError, match=r"auto:3 would keep every layer .* use auto:N with N < 3"):
        make_plan(config, layers="auto:3")
    with pytest.raises(RecipeError, match=r"keeps all 3 layers as softmax, so nothing is converted"):
        make_plan(config, layers=[0, 1, 2])
    # mixer=softmax is the fine-tuned-teacher control: every layer kept, and only with layers=all
    assert make_plan(config, mixer="softmax").softmax_layers == [0, 1, 2]
    for layers in ([0], "every:2", "auto:1"):
        with pytest.raises(RecipeError, match=r"student.mixer=softmax .* student.layers must be `all`"):
            make_plan(config, mixer="softmax", layers=layers)


@pytest.mark.parametrize("bad", ["some", "every:1", "every:x", "auto:0", "auto:", [-1]])
def test_bad_layer_plans_name_the_valid_forms(bad):
    with pytest.raises(RecipeError, match=r"student.layers"):
        student_config(layers=bad)
    if isinstance(bad, str):
        with pytest.raises(
            RecipeError, match=r"use `all`, a list of layer indices to keep as softmax, `every:K`"
        ):
            student_config(layers=bad)


def test_unknown_mixer_and_feature_map_list_the_known_ones():
    with pytest.raises(RecipeError, match=r"gated, gated_delta, gated_slot, linear, softmax, window_linear"):
        student_config(mixer="mamba")
    with pytest.raises(RecipeError, match=r"elu, hedgehog, relu, t2r"):
        student_config(feature_map="cosformer")


def test_recipe_field_forces_the_kernel_form():
    """student.impl reaches the ops: the reference form gives the chunked form's logits, and forcing
    fla on CPU tensors fails with the kernel's own message."""
    ids = torch.randint(0, 512, (1, 70))
    logits = {}
    for impl in ("auto", "reference"):
        teacher = tiny_model("llama")
        student = swap(teacher, make_plan(teacher.config, impl=impl))
        with torch.no_grad():
            logits[impl] = student(ids).logits
    assert (logits["auto"] - logits["reference"]).abs().max().item() <= 1e-5
    teacher = tiny_model("llama")
    student = swap(teacher, make_plan(teacher.config, impl="fla"))
    with pytest.raises(ValueError, match="impl='fla' needs CUDA tensors"):
        student(ids)
