"""The memory estimate: parameters counted exactly on the meta device, sharding divides what it should, the
activation constants stay upper bounds of what the chunked forms keep, and a run that would not fit is
refused before any work."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model

from linearize.config import RecipeError, load_recipe
from linearize.convert.swap import plan_for, swap
from linearize.distill.memory import (
    ACTIVATION_INTERMEDIATE,
    ACTIVATIONS,
    LOGIT_COPIES,
    RUNTIME_BYTES,
    WORKSPACE_HIDDEN,
    WORKSPACE_INTERMEDIATE,
    GiB,
    MemoryBudgetError,
    check_fits,
    check_host_memory,
    count_parameters,
    estimate,
    student_on_meta,
)
from linearize.distill.stages import attention_stage, logits_stage
from linearize.distill.teacher import LiveTeacher
from linearize.distributed import Sharding

HUB_CONFIGS = Path(__file__).parent.parent / "fixtures" / "hub_configs"
MIXERS = ["linear", "window_linear", "gated", "gated_slot", "gated_delta"]


def hub_config(hub_id: str):
    from transformers import AutoConfig

    fields = json.loads((HUB_CONFIGS / (hub_id.replace("/", "__") + ".json")).read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("mixer", MIXERS)
def test_parameter_counts_match_the_real_student(family, mixer):
    """Counted on the meta device from the config alone == the student the pipeline builds and trains."""
    recipe = load_recipe("tiny", {"student.mixer": mixer, "stages.logits.lora_r": "4"})
    config = tiny_config(family)

    meta, _ = student_on_meta(config, recipe, "attention")
    counts = count_parameters(config, recipe, "attention")
    assert counts.total == sum(p.numel() for p in meta.parameters())
    assert all(p.is_meta for p in meta.parameters())
    teacher = tiny_model(family)
    student = swap(teacher, plan_for(recipe.student, config))
    assert counts.total == sum(p.numel() for p in student.parameters())
    assert counts.weight_bytes == sum(p.numel() * p.element_size() for p in student.parameters())
    attention_stage(student, LiveTeacher(teacher))
    assert counts.trainable == trainable(student) > 0

    for kind in ("lora", "attention", "all"):
        recipe = load_recipe(
            "tiny", {"student.mixer": mixer, "stages.logits.lora_r": "4", "stages.logits.trainable": kind}
        )
        counts = count_parameters(config, recipe, "logits")
        student = swap(tiny_model(family), plan_for(recipe.student, config))
        model, _ = logits_stage(student, recipe.stages.logits, LiveTeacher(tiny_model(family)))
        assert counts.trainable == trainable(model), kind
        assert counts.total == sum(p.numel() for p in model.parameters()), kind


def test_lora_counts_rank_times_in_plus_out_per_target():
    config = hub_config("Qwen/Qwen2.5-7B")
    base = load_recipe("qwen-7b-to-linear", {"stages.logits.lora_r": "8"})
    wider = load_recipe("qwen-7b-to-linear", {"stages.logits.lora_r": "16"})
    per_layer = 8 * ((3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584))  # q, k, v, o with 4 KV heads of 128
    difference = (
        count_parameters(config, wider, "logits").trainable
        - count_parameters(config, base, "logits").trainable
    )
    assert difference == 28 * per_layer


def test_sharding_divides_what_it_should():
    config = hub_config("Qwen/Qwen2.5-7B")
    recipe = load_recipe("qwen-7b-to-linear", {"stages.logits.trainable": "attention"})

    def est(name, n=8):
        return estimate(config, recipe, "logits", n, sharding=Sharding.from_accelerate_config(name))

    one, ddp, zero2, zero3, fsdp2 = est(None, 1), est("ddp"), est("zero2"), est("zero3"), est("fsdp2")
    assert one.weights == ddp.weights == zero2.weights and one.gathered == ddp.gathered == zero2.gathered == 0
    assert ddp.gradients == 2 * one.gradients  # DDP's all-reduce buckets
    assert ddp.optimizer == one.optimizer
    for sharded in (zero3, fsdp2):
        assert sharded.weights == -(-one.weights // 8) and sharded.gathered > 0
    for sharded in (zero2, zero3, fsdp2):
        assert sharded.gradients == -(-one.gradients // 8) and sharded.optimizer == -(-one.optimizer // 8)
    # per-device activations and logits do not shrink with more processes
    for e in (ddp, zero2, zero3, fsdp2):
        assert (e.activations, e.logits) == (one.activations, one.logits)
    # the frozen teacher copy is sharded where the weights are (its own ZeRO-3 engine, FSDP2), else whole
    assert one.frozen_teacher == count_parameters(config, recipe, "logits").teacher_bytes
    assert ddp.frozen_teacher == zero2.frozen_teacher == one.frozen_teacher
    assert zero3.frozen_teacher == fsdp2.frozen_teacher == -(-one.frozen_teacher // 8)
    # stage attention and LoRA share the student's weights, unless the placement shards them
    for shared in (
        estimate(config, recipe, "attention", 8, sharding=Sharding.from_accelerate_config("zero2")),
        estimate(config, load_recipe("qwen-7b-to-linear"), "logits", 1),
    ):
        assert shared.frozen_teacher == 0
    zero3_attention = estimate(
        config, recipe, "attention", 8, sharding=Sharding.from_accelerate_config("zero3")
    )
    assert zero3_attention.frozen_teacher == zero3.frozen_teacher
    assert one.total > zero2.total > fsdp2.total
    # tokens count every process
    assert fsdp2.tokens == 8 * one.tokens == 8 * 2000 * 4 * 2 * 1024


def test_sharding_is_read_from_accelerate_configs(tmp_path):
    expected = {
        "ddp": ("DDP", False, False, False),
        "fsdp2": ("FSDP2", True, True, True),
        "multinode-fsdp2": ("FSDP2", True, True, True),
        "zero2": ("ZeRO-2", False, True, True),
        "zero3": ("ZeRO-3", True, True, True),
    }
    for name, (label, weights, gradients, optimizer) in expected.items():
        s = Sharding.from_accelerate_config(name)
        assert (s.name, s.weights, s.gradients, s.optimizer) == (label, weights, gradients, optimizer), name
    assert Sharding.from_accelerate_config(None).name == "single process"
    v1 = {"distributed_type": "FSDP", "fsdp_config": {"fsdp_sharding_strategy": "SHARD_GRAD_OP"}}
    assert not Sharding.from_accelerate_config(v1).weights and Sharding.from_accelerate_config(v1).optimizer
    v1_full = Sharding.from_accelerate_config({"distributed_type": "FSDP", "fsdp_config": {}})
    assert v1_full.weights and not v1_full.frozen_teacher  # the frozen teacher is sharded under FSDP2 only
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    s = Sharding.from_accelerate_config(
        {"distributed_type": "DEEPSPEED", "deepspeed_config": {"deepspeed_config_file": str(ds)}}
    )
    assert s.weights and s.offload_optimizer and s.name == "ZeRO-3 + offload"
    recipe = load_recipe("qwen-7b-to-linear", {"stages.logits.trainable": "attention"})
    offloaded = estimate(hub_config("Qwen/Qwen2.5-7B"), recipe, "logits", 8, sharding=s)
    assert offloaded.optimizer == 0 and offloaded.gradients > 0


def test_sharding_is_read_from_a_live_accelerator():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def sharding(kind, n=8, **plugin):
        state = SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(**plugin) if plugin else None)
        return Sharding.from_accelerator(SimpleNamespace(distributed_type=kind, state=state, num_processes=n))

    assert sharding(DistributedType.FSDP, fsdp_version=2) == Sharding.from_accelerate_config("fsdp2")
    assert not sharding(DistributedType.FSDP, fsdp_version=2, reshard_after_forward=False).weights
    assert sharding(DistributedType.FSDP, fsdp_version=2, cpu_offload=True).offload_optimizer
    assert not sharding(DistributedType.FSDP, fsdp_version=1, reshard_after_forward="SHARD_GRAD_OP").weights
    assert sharding(DistributedType.MULTI_GPU) == Sharding.from_accelerate_config("ddp")
    assert sharding(DistributedType.NO, n=1).name == "single process"


def test_activation_and_logit_formulas():
    config = hub_config("Qwen/Qwen2.5-7B")  # hidden 3584, intermediate 18944, 28 layers, vocab 152064
    recipe = load_recipe("qwen-7b-to-linear")  # batch 4 x 1024 tokens, bf16
    tokens, h, i = 4 * 1024, 3584, 18944
    workspace = WORKSPACE_HIDDEN * h + WORKSPACE_INTERMEDIATE * i
    fused = ACTIVATIONS["fused"]
    one = estimate(config, recipe, "attention", 1)
    assert one.activations == tokens * 2 * (28 * fused["attention"]["linear"] * h + workspace)
    assert one.logits == 0  # stage attention keeps the logits of one position
    two = estimate(config, recipe, "logits", 1)
    per_layer = fused["logits"]["linear"] * h + ACTIVATION_INTERMEDIATE * i
    assert two.activations == tokens * 2 * (28 * per_layer + workspace)
    assert two.logits == tokens * 152064 * 2 * LOGIT_COPIES  # bf16 logits; the losses work in chunks
    assert two.runtime == RUNTIME_BYTES
    chunked = estimate(config, load_recipe("qwen-7b-to-linear", {"student.impl": "chunked"}), "attention", 1)
    assert chunked.activations > one.activations
    # a hybrid plan: stage 1 converts every layer; stage 2 keeps the auto:N layers softmax
    hybrid = load_recipe("qwen-7b-to-hybrid")
    assert count_parameters(config, hybrid, "attention").layer_mixers == ["linear"] * 28
    assert count_parameters(config, hybrid, "logits").layer_mixers.count("softmax") == 7


def saved_per_token_layer(stage: str, mixer: str, layers: int, feature_dim: int | None = None) -> float:
    """Bytes saved for backward (parameters excluded) by one chunked-form micro-batch, per token; the plain
    hedgehog map (as wide as the head, the setting the constants were measured in) unless feature_dim."""
    from transformers import Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        intermediate_size=512,
        vocab_size=64,
        tie_word_embeddings=False,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    recipe = load_recipe(
        "tiny",
        {
            "student.mixer": mixer,
            "student.impl": "chunked",
            "stages.logits.trainable": "lora",
            "student.settings.feature_dim": str(feature_dim) if feature_dim else "null",
            "student.settings.feature_bias": "false",
        },
    )
    student = swap(model, plan_for(recipe.student, config))
    if stage == "attention":
        model, loss_fn = attention_stage(student, LiveTeacher(model))
    else:
        model, loss_fn = logits_stage(student, recipe.stages.logits, LiveTeacher(model))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, 64, (1, 128))
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        loss_fn(model, ids)
    return sum(saved.values()) / ids.numel()


@pytest.mark.parametrize("stage", ["attention", "logits"])
@pytest.mark.parametrize("mixer", MIXERS)
def test_activation_constants_bound_what_the_chunked_forms_keep(stage, mixer):
    """One more layer adds at most the table's count of 16-bit hidden-wide tensors (and not far less)."""
    per_layer = saved_per_token_layer(stage, mixer, 2) - saved_per_token_layer(stage, mixer, 1)
    bound = ACTIVATIONS["chunked"][stage][mixer] * 256 * 2
    if stage == "logits":
        bound += ACTIVATION_INTERMEDIATE * 512 * 2
    assert 0.5 * bound < per_layer <= bound


@pytest.mark.parametrize("mixer", ["linear", "gated"])
def test_a_wider_feature_map_stays_within_the_scaled_constants(mixer):
    """feature_dim = 2 x head_dim: the estimate scales a converted layer's count by 2, an upper bound."""
    from linearize.distill.memory import feature_width_factor

    per_layer = saved_per_token_layer("attention", mixer, 2, 256) - saved_per_token_layer(
        "attention", mixer, 1, 256
    )
    plain = saved_per_token_layer("attention", mixer, 2) - saved_per_token_layer("attention", mixer, 1)
    recipe = load_recipe("tiny", {"student.settings.feature_dim": "256"})
    factor = feature_width_factor(recipe, type("C", (), {"head_dim": 128, "hidden_size": 256})())
    assert factor == 2.0
    assert plain < per_layer <= factor * ACTIVATIONS["chunked"]["attention"][mixer] * 256 * 2


def test_check_fits_names_the_total_the_memory_and_the_fixes():
    config = hub_config("Qwen/Qwen2.5-7B")
    recipe = load_recipe("qwen-7b-to-linear", {"stages.logits.trainable": "attention"})
    est = estimate(config, recipe, "logits", 1, 80 * GiB)
    assert est.frozen_teacher > 0
    with pytest.raises(MemoryBudgetError) as caught:
        check_fits(est, 24 * GiB)
    message = str(caught.value)
    assert isinstance(caught.value, RecipeError)
    assert f"needs ~{est.total / GiB:.1f} GiB per device" in message and "a device has 24.0 GiB" in message
    for fix in (
        "launch.processes",
        "fsdp2 or zero3",
        "stages.logits.batch_size",
        "grad_accum",
        "cache_k",
        "bf16",
    ):
        assert fix in message, fix
    check_fits(est, est.total)  # exactly enough is enough
    check_fits(estimate(config, recipe, "logits", 1))  # no device memory known: nothing to check


def test_a_72b_teacher_on_one_unsharded_device_is_refused():
    config = hub_config("Qwen/Qwen2.5-72B")
    single = {"launch.accelerate_config": '""', "launch.processes": "1", "launch.nodes": "1"}
    alone = load_recipe("qwen-72b-to-linear", single)
    est = estimate(config, alone, "attention", 1, 80 * GiB)
    assert est.weights > 130 * GiB  # 72.7B parameters in bf16
    with pytest.raises(
        MemoryBudgetError, match=r"stage attention needs ~\d+ GiB per device .* has 80\.0 GiB"
    ):
        check_fits(est)
    shipped = load_recipe("qwen-72b-to-linear")  # 4 nodes x 8 processes, FSDP2
    for stage in ("attention", "logits"):
        sharded = estimate(config, shipped, stage, shipped.launch.num_processes, 80 * GiB)
        assert sharded.total < 80 * GiB  # the training steps fit, sharded over 32 devices
        assert sharded.whole_model > 130 * GiB  # and under FSDP2 the whole model sits on no device
        check_fits(sharded)
        # ZeRO-3 shards the training steps just as well, but holds the whole model on every device outside them
        zero3 = estimate(config, shipped, stage, 32, 80 * GiB, Sharding.from_accelerate_config("zero3"))
        assert zero3.total < 80 * GiB
        with pytest.raises(
            MemoryBudgetError,
            match=r"the whole model \(13\d GiB of weights\) does not fit a device.*Use launch.accelerate_config=fsdp2",
        ):
            check_fits(zero3)


def test_fsdp2_needs_the_whole_model_in_rank_0s_cpu_memory():
    config = hub_config("Qwen/Qwen2.5-72B")
    recipe = load_recipe("qwen-72b-to-linear")
    found = [estimate(config, recipe, s, 32, 80 * GiB) for s in ("attention", "logits")]
    check_host_memory(found, 1024 * GiB)  # a node of 8 H100s has 1-2 TiB
    with pytest.raises(
        MemoryBudgetError,
        match=r"rank 0 holds the whole model in CPU memory \(13\d GiB\) .* 128 GiB of RAM",
    ):
        check_host_memory(found, 128 * GiB)
    # trainable=attention without the cache: the teacher is a sharded view, not a second whole copy
    uncached = load_recipe("qwen-72b-to-linear", {"stages.logits.cache_k": "0"})
    check_host_memory([estimate(config, uncached, "logits", 32, 80 * GiB)], 256 * GiB)


def test_convert_prints_the_estimate_and_refuses_a_run_that_does_not_fit(tmp_path, capsys, monkeypatch):
    import re

    from linearize.distill.memory import VERBOSE_ENV
    from linearize.pipeline import convert

    short = {
        "stages.attention.steps": "1",
        "stages.logits.steps": "1",
        "eval.tasks": "[]",
        "data.heldout_docs": "4",
    }
    with pytest.raises(MemoryBudgetError, match=r"stage attention needs .* but a device has 1\.0 KiB"):
        convert(
            load_recipe(
                "tiny", {**short, "launch.device_memory_gb": "1e-6", "output_dir": str(tmp_path / "no")}
            )
        )
    assert not (tmp_path / "no").exists()  # refused before the run folder is written
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[memory]")]
    one_line = r"\[memory\] attention: ~\S+ \S+ per device, 1\.0 KiB available \(single process, 1 process\)"
    assert re.fullmatch(one_line, printed[0])

    monkeypatch.setenv(VERBOSE_ENV, "1")  # linearize -v: the parts too
    convert(load_recipe("tiny", {**short, "output_dir": str(tmp_path / "run")}))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[memory]")]
    assert [line.split(":")[0] for line in lines] == ["[memory] attention", "[memory] logits"]
    assert all("per device" in line and "1 step, 2,048 tokens" in line for line in lines)  # 1 x 8 x 256
    assert "activations" in lines[0] and "frozen teacher" in lines[1] and "logits" in lines[1]
