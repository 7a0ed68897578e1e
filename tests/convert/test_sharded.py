"""The pieces of the FSDP2 flow that need no second process: the empty teacher every rank but 0 builds, and
the empty copy a gathered state dict is assigned into. The flow itself runs on 2 ranks in
tests/distill/test_distributed.py."""

import pytest
import torch
from transformers import PreTrainedModel

from linearize.config import StudentConfig
from linearize.convert.sharded import assign_state, meta_copy
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher


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
    student = swap(teacher, plan_for(StudentConfig(mixer="linear", feature_map="hedgehog"), teacher.config))
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
