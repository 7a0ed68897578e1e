"""The placement on one process (the teacher and the student share weights; a frozen copy or a sharding view
shares nothing the student trains), and the pieces of the FSDP2 flow that need no second process: the empty
teacher every rank but 0 builds, and the empty copy a gathered state dict is assigned into. The flow itself
runs on 2 ranks in tests/distributed/test_ranks.py."""

import pytest
import torch
from transformers import PreTrainedModel

from linearize.config import Recipe, StudentConfig
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher
from linearize.distributed import (
    Placement,
    assign_state,
    deepspeed_frozen_teacher,
    meta_copy,
    weight_sharing_view,
)


def test_one_process_places_the_teacher_whole_and_shares_it_with_the_student():
    teacher, _ = load_teacher("bundled:stories260K")
    teacher.train()
    placement = Placement.for_recipe(Recipe())
    student = placement.student(swap(teacher, plan_for(StudentConfig(), teacher.config)))
    evaluated = placement.evaluated_teacher(teacher)
    assert evaluated is teacher and not evaluated.training
    assert not any(p.requires_grad for p in evaluated.parameters())
    assert placement.stage_teacher(evaluated, batch_size=2) is teacher
    # the student's embeddings are the teacher's: no weight is copied
    assert student.plain().get_input_embeddings().weight is teacher.get_input_embeddings().weight
    # ZeRO-1/2 keep whole weights on every process: no engine, nothing imported
    assert deepspeed_frozen_teacher(teacher, {"zero_optimization": {"stage": 2}}, 2, 8) is teacher
    # stage logits training the shared weights gets a copy that shares nothing with the student
    frozen = placement.frozen_teacher(teacher)
    shared = {id(p) for p in student.plain().parameters()} | {
        p.data_ptr() for p in student.plain().parameters()
    }
    assert not any(id(p) in shared or p.data_ptr() in shared for p in frozen.parameters())
    torch.testing.assert_close(frozen.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_a_sharding_view_shares_the_tensors_but_not_the_parameter_objects():
    """FSDP2 and ZeRO-3 replace or empty each parameter's data of what they shard: on a view, the teacher it
    was made from (and the student sharing its parameters) keeps its weights."""
    teacher, _ = load_teacher("bundled:stories260K")
    view = weight_sharing_view(teacher)
    pairs = list(zip(teacher.parameters(), view.parameters()))
    assert all(p is not q and p.data_ptr() == q.data_ptr() for p, q in pairs)
    assert view.lm_head.weight is view.get_input_embeddings().weight  # ties kept
    before = teacher.get_input_embeddings().weight.clone()
    for q in view.parameters():
        q.data = torch.empty(0)  # what ZeRO-3's partitioning does to each parameter
    assert torch.equal(teacher.get_input_embeddings().weight, before)


def test_an_empty_teacher_reads_no_weights_and_keeps_real_buffers(monkeypatch):
    teacher, _ = load_teacher("bundled:stories260K")

    def refuse(*args, **kwargs):
        raise AssertionError("an empty teacher read weights")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    empty, tokenizer = load_teacher("bundled:stories260K", empty=True)
    assert all(p.device.type == "meta" for p in empty.parameters())
    assert [n for n, _ in empty.named_parameters()] == [n for n, _ in teacher.named_parameters()]
    assert all(p.dtype == q.dtype for p, q in zip(empty.parameters(), teacher.parameters()))
    # the rotary frequencies are computed from the config, not broadcast: they must be real and equal
    buffers = dict(teacher.named_buffers())
    for name, buffer in empty.named_buffers():
        assert buffer.device.type == "cpu" and torch.equal(buffer, buffers[name]), name
    assert empty.generation_config.to_dict() == teacher.generation_config.to_dict()
    assert not empty.training and tokenizer is not None


def test_a_gathered_state_assigned_to_the_empty_copy_is_the_model():
    torch.manual_seed(0)
    teacher, _ = load_teacher("bundled:stories260K")
    student = swap(
        teacher, plan_for(StudentConfig(mixer="linear", settings={"feature_map": "hedgehog"}), teacher.config)
    )
    student.requires_grad_(False)
    student.model.layers[0].self_attn.feature_map_q.requires_grad_(True)
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = student(input_ids=ids, use_cache=False).logits

    skeleton = meta_copy(student)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert [p.requires_grad for p in skeleton.parameters()] == [p.requires_grad for p in student.parameters()]
    # FSDP2 hands trained 16-bit weights back in fp32: they go back to the model's dtype
    state = {
        k: v.double() if k.endswith("feature_map_q.weight") else v for k, v in student.state_dict().items()
    }
    assert sum(v.dtype == torch.float64 for v in state.values()) == teacher.config.num_hidden_layers
    assign_state(skeleton, state)
    assert all(p.device.type == "cpu" for p in skeleton.parameters())
    assert all(p.dtype == q.dtype for p, q in zip(skeleton.parameters(), student.parameters()))
    if teacher.config.tie_word_embeddings:
        assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(skeleton(input_ids=ids, use_cache=False).logits, expected)

    with pytest.raises(RuntimeError, match=r"does not fit the model: missing \['lm_head.weight'"):
        assign_state(meta_copy(student), {k: v for k, v in state.items() if k != "lm_head.weight"})
