import json

import pytest
import torch
import torch.nn.functional as F
from conftest import student_config, tiny_model

from linearize.config import LogitsStageConfig, Recipe, StageConfig, StudentConfig, TrainConfig
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher
from linearize.distill.loop import MetricsLog, TrainingError, train_stage
from linearize.distill.stages import attention_stage, logits_stage, new_parameters
from linearize.distill.teacher import LiveTeacher
from linearize.distributed import Placement


def student_of(family="llama"):
    teacher = tiny_model(family)
    return teacher, swap(teacher, plan_for(StudentConfig(), teacher.config))


def stage1(family="llama"):
    """(student, aligner, loss_fn) of stage attention on a tiny model of `family`."""
    teacher, student = student_of(family)
    aligner, loss_fn = attention_stage(student, LiveTeacher(teacher))
    return student, aligner, loss_fn


def test_attention_stage_trains_only_new_parameters_on_teacher_inputs(family):
    """Stage 1's loss is the sum over layers of MSE(mixer(teacher's attention input), teacher's attention
    output), the inputs read off an independent teacher forward (its hidden states, normed by the layer);
    only the new parameters get gradients, and the teacher still computes the teacher afterwards."""
    teacher = tiny_model(family)
    ids = torch.randint(0, 512, (2, 12))  # shorter than Mistral's window: its attention is plain causal here
    with torch.no_grad():
        out = teacher(ids, output_hidden_states=True)
        pos = teacher.model.rotary_emb(out.hidden_states[0], torch.arange(12)[None])
        inputs = [layer.input_layernorm(h) for layer, h in zip(teacher.model.layers, out.hidden_states)]
        targets = [layer.self_attn(x, pos, None)[0] for layer, x in zip(teacher.model.layers, inputs)]
    student = swap(teacher, plan_for(StudentConfig(), teacher.config))
    aligner, loss_fn = attention_stage(student, LiveTeacher(teacher))
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == set(new_parameters(student)) and trainable
    loss = loss_fn(aligner, ids)
    with torch.no_grad():
        mixers = [layer.self_attn for layer in student.model.layers]
        expected = sum(F.mse_loss(m(x, pos, None)[0], y) for m, x, y in zip(mixers, inputs, targets))
    assert loss.item() > 0 and abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    loss.backward()
    assert all(p.grad is not None for n, p in student.named_parameters() if n in trainable)
    assert all(p.grad is None for n, p in student.named_parameters() if n not in trainable)
    with torch.no_grad():
        assert torch.equal(teacher(ids).logits, out.logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mixer", ["linear", "window_linear", "gated_slot", "gated_delta"])
def test_capture_hands_the_teachers_rotary_qkv_to_the_mixers(family, attn, mixer):
    """The capture records each layer's q, k, v as the teacher's attention function receives them (after
    its q/k norms and RoPE, k and v on the key/value heads); a mixer given them computes what it computes
    from the hidden states alone, and the attention registry of transformers is left as it was."""
    from transformers.modeling_utils import AttentionInterface

    from linearize.distill.stages import reuses_teacher_qkv

    teacher = tiny_model(family)
    teacher.set_attn_implementation(attn)
    registry = dict(AttentionInterface._global_mapping)
    student = swap(teacher, plan_for(student_config(mixer=mixer), teacher.config))
    aligner, _ = attention_stage(student, LiveTeacher(teacher))
    ids = torch.randint(0, 512, (2, 12))
    captured = LiveTeacher(teacher).capture(ids, aligner.layers)
    assert AttentionInterface._global_mapping == registry
    assert len(captured.qkv) == len(aligner.layers) and all(t is not None for t in captured.qkv)
    for i, x, qkv in zip(captured.layers, captured.inputs, captured.qkv):
        mixer_i = student.model.layers[i].self_attn
        assert reuses_teacher_qkv(mixer_i, qkv)
        own = mixer_i.rotary_qkv(x, captured.position_embeddings)
        assert (
            [t.shape for t in qkv] == [t.shape for t in own] == [(2, 12, 4, 8), (2, 12, 2, 8), (2, 12, 2, 8)]
        )
        for a, b in zip(qkv, own):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        given = aligner(captured, per_layer=True)
        captured.qkv = []
        computed = aligner(captured, per_layer=True)
    torch.testing.assert_close(given, computed, rtol=1e-6, atol=0)


def test_trained_projections_are_not_replaced_by_the_teachers():
    """A mixer whose projections train is never handed the teacher's q, k, v (they would be stale)."""
    from linearize.distill.stages import reuses_teacher_qkv

    _, student = student_of()
    mixer = student.model.layers[0].self_attn
    qkv = (torch.zeros(1),) * 3
    assert reuses_teacher_qkv(mixer.requires_grad_(False), qkv)
    mixer.k_proj.weight.requires_grad_(True)
    assert not reuses_teacher_qkv(mixer, qkv)
    assert not reuses_teacher_qkv(mixer, None)


@pytest.mark.parametrize("trainable", ["lora", "attention", "all"])
def test_logits_stage_teacher_does_not_move(trainable):
    import copy

    teacher, _ = load_teacher("bundled:stories260K")  # a real model: KL starts far from 0
    torch.manual_seed(0)  # the ids and the new parameters: unseeded, 3 steps of every weight at lr 1e-3 could
    ids = torch.randint(3, 512, (2, 24))  # overshoot (seen at HEAD before this change, in one test order)
    lr = 1e-4 if trainable == "all" else 1e-3
    with torch.no_grad():
        expected = teacher(ids).logits
    # LoRA: the teacher shares the student's frozen base weights; else the student trains them: a copy
    frozen = copy.deepcopy(teacher) if trainable != "lora" else teacher
    mlp_before = teacher.model.layers[0].mlp.up_proj.weight.detach().clone()
    student = swap(teacher, plan_for(StudentConfig(), teacher.config))
    cfg = LogitsStageConfig(trainable=trainable, lr=lr)
    model, loss_fn = logits_stage(student, cfg, LiveTeacher(frozen))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(3):
        loss = loss_fn(model, ids)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    with torch.no_grad():
        after = frozen(ids).logits
    assert (after - expected).abs().max().item() <= 1e-5
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("feature_map" in n for n in names)
    mlp_after = student.model.layers[0].mlp.up_proj.weight
    if trainable == "lora":
        assert any("lora_A" in n for n in names) and not any("mlp" in n for n in names)
    elif trainable == "attention":
        assert all(".self_attn." in n for n in names)
    else:
        assert names == {n for n, _ in model.named_parameters()}
        assert any(".mlp." in n for n in names) and "model.embed_tokens.weight" in names
    assert torch.equal(mlp_after, mlp_before) == (trainable != "all")


def test_lora_on_an_all_softmax_student_keeps_the_untouched_teacher():
    """The fine-tuned-teacher control (student.mixer=softmax, LoRA): the teacher, which shares the
    student's base weights, stays the teacher, so the KL target does not move while the student trains."""
    teacher, _ = load_teacher("bundled:stories260K")
    ids = torch.randint(3, 512, (2, 24))
    with torch.no_grad():
        expected = teacher(ids).logits
    student = swap(teacher, plan_for(StudentConfig(mixer="softmax"), teacher.config))
    assert new_parameters(student) == []
    cfg = LogitsStageConfig(trainable="lora", ce_weight=1.0)
    model, loss_fn = logits_stage(student, cfg, LiveTeacher(teacher))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss_fn(model, ids).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert (teacher(ids).logits - expected).abs().max().item() <= 1e-5
        assert (model(ids).logits - expected).abs().max().item() > 1e-3


def run_stage(tmp_path, loss_fn, model, precision="fp32", steps=3, skip_nonfinite=0):
    train = TrainConfig(precision=precision, checkpoint_every=2, skip_nonfinite=skip_nonfinite)
    recipe = Recipe(output_dir=str(tmp_path), train=train)
    cfg = StageConfig(steps=steps, batch_size=2, lr=1e-2)
    return train_stage(
        name="attention",
        cfg=cfg,
        recipe=recipe,
        model=model,
        loss_fn=loss_fn,
        blocks=torch.randint(0, 512, (6, 16)),
        stage_dir=tmp_path / "attention",
        log=MetricsLog(tmp_path / "metrics.jsonl"),
        placement=Placement.for_recipe(recipe),
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loop_logs_metrics_and_checkpoints(tmp_path, precision):
    _, aligner, loss_fn = stage1()
    result = run_stage(tmp_path, loss_fn, aligner, precision)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert {"loss", "lr", "tokens", "tok_s"} <= set(lines[0])
    assert result.tokens == 3 * 2 * 16
    assert sorted(p.name for p in (tmp_path / "attention" / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]


def test_nan_loss_is_a_clear_error(tmp_path):
    _, aligner, loss_fn = stage1()

    def nan_loss(model, ids):
        return loss_fn(model, ids) * float("nan")

    with pytest.raises(
        TrainingError, match=r"non-finite loss .* at step 1 .* loss nan, training blocks \[\d+, \d+\]"
    ):
        run_stage(tmp_path, nan_loss, aligner)
    assert not (tmp_path / "attention" / "checkpoints").exists() or not any(
        (tmp_path / "attention" / "checkpoints").iterdir()
    )


def test_nan_in_one_layer_is_named(tmp_path):
    """The error names the step, the blocks and the first layer whose output broke."""
    student, aligner, loss_fn = stage1()
    with torch.no_grad():
        student.model.layers[1].self_attn.feature_map_k.weight.fill_(float("nan"))
    with pytest.raises(
        TrainingError, match=r"at step 1 .*first non-finite output in student\.model\.layers\.1\.self_attn"
    ):
        run_stage(tmp_path / "a", loss_fn, aligner)


def test_a_full_disk_during_a_save_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    _, aligner, loss_fn = stage1()
    run_stage(tmp_path, loss_fn, aligner, steps=2)  # complete checkpoint at step 2
    real = Accelerator.save_state

    def full_disk(self, output_dir=None, **kwargs):
        real(self, output_dir, **kwargs)  # write some files first, as a real full disk would
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    ckpts = tmp_path / "attention" / "checkpoints"
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in ckpts.iterdir()}
    with pytest.raises(
        TrainingError,
        match=r"could not write checkpoint .*step-00000004: the disk is full \(.* MB free under .*\); the last "
        r"complete checkpoint, step 2 \(.*step-00000002\), is intact",
    ):
        run_stage(tmp_path, loss_fn, aligner, steps=4)
    assert {p.name: sorted(q.name for q in p.iterdir()) for p in ckpts.iterdir()} == before


def test_a_recipe_can_skip_steps_with_a_non_finite_loss(tmp_path):
    _, aligner, stage_loss = stage1()
    calls = []

    def nan_at_step_2(model, ids):
        calls.append(1)
        loss = stage_loss(model, ids)
        return loss * float("nan") if len(calls) == 2 else loss

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    run_stage(tmp_path / "a", nan_at_step_2, aligner, steps=3, skip_nonfinite=1)
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [("skipped" in r) for r in lines] == [False, True, False]
    assert "non-finite loss on 1 of 1 process(es) at step 2" in lines[1]["skipped"]
    calls.clear()

    def nan_from_step_2(model, ids):
        calls.append(1)
        loss = stage_loss(model, ids)
        return loss * float("nan") if len(calls) >= 2 else loss

    with pytest.raises(TrainingError, match=r"at step 3 .*train\.skip_nonfinite \(now 1\)"):
        run_stage(tmp_path / "b", nan_from_step_2, aligner, steps=4, skip_nonfinite=1)
