import dataclasses
import json
import re
from pathlib import Path
from typing import Literal

import pytest
import yaml

from linearize.config import (
    LaunchConfig,
    Recipe,
    RecipeError,
    accelerate_config_path,
    describe,
    field_docs,
    load_recipe,
    parse_pairs_into,
    shipped_recipes,
)

# The config.json of every Hub teacher a shipped recipe names, stored as <org>__<name>.json: the Hub is
# out of reach in tests, and these are enough to build the teacher (and its student) on the meta device.
HUB_CONFIGS = Path(__file__).parent / "fixtures" / "hub_configs"
# Parameter counts of those teachers as published, so a mistyped fixture fails.
PUBLISHED_PARAMETERS = {
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "Qwen/Qwen3-8B": 8_190_735_360,
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.3": 7_248_023_552,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 134_515_008,
}


def teacher_config(teacher_path: str):
    """The teacher's config without the Hub: the bundled teacher's own, else the stored fixture."""
    from transformers import AutoConfig

    from linearize.assets import BUNDLED_PREFIX
    from linearize.convert.teachers import resolve_path

    if teacher_path.startswith(BUNDLED_PREFIX):
        return AutoConfig.from_pretrained(resolve_path(teacher_path))
    fixture = HUB_CONFIGS / (teacher_path.replace("/", "__") + ".json")
    if not fixture.is_file():
        raise LookupError(
            f"no stored config for teacher {teacher_path!r}: save its config.json from the Hub as "
            f"{fixture.relative_to(Path(__file__).parent.parent)}"
        )
    fields = json.loads(fixture.read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    assert recipe.description, f"{name} needs a one-line description"
    assert recipe.name == name
    # the resolved recipe round-trips through YAML unchanged
    again = load_recipe(name, {})
    assert again.to_yaml() == recipe.to_yaml()


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_builds_and_fits_its_hardware(name):
    """The accelerate config resolves, the teacher is known offline, the student builds on the meta device
    from the config alone, and each stage's memory estimate fits the device memory the recipe names."""
    from linearize.distill.memory import check_fits, estimate
    from linearize.distributed import Sharding

    recipe = load_recipe(name)
    launch = recipe.launch
    if launch.accelerate_config:
        config = yaml.safe_load(accelerate_config_path(launch.accelerate_config).read_text())
        assert config["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
        if launch.nodes > 1:
            assert config["num_machines"] > 1, f"{name}: {launch.nodes} nodes need a multi-node config"
        assert Sharding.from_accelerate_config(launch.accelerate_config).name != "single process"
    try:
        config = teacher_config(recipe.teacher.path)
    except LookupError as err:
        pytest.fail(f"recipe {name}: {err}")
    if not recipe.teacher.path.startswith("bundled:"):
        assert launch.hardware and launch.device_memory_gb, f"{name}: name the hardware it was sized for"
    for stage in ("attention", "logits"):
        est = estimate(
            config, recipe, stage, launch.num_processes, int(launch.device_memory_gb * 2**30) or None
        )
        assert est.params.trainable > 0
        check_fits(est)
        if (
            launch.device_memory_gb and est.whole_model > launch.device_memory_gb * 2**30
        ):  # FSDP2 alone runs it
            assert est.sharding.whole_on_host and not recipe.eval.tasks, name


def test_a_teacher_without_a_stored_config_is_refused():
    with pytest.raises(
        LookupError, match=r"no stored config for teacher 'org/new-model'.*org__new-model\.json"
    ):
        teacher_config("org/new-model")


@pytest.mark.parametrize("teacher", sorted(PUBLISHED_PARAMETERS))
def test_stored_hub_configs_are_the_published_models(teacher):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(teacher_config(teacher))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[teacher]


def test_every_stored_hub_config_is_a_teacher_of_a_recipe():
    teachers = {load_recipe(name).teacher.path for name in shipped_recipes()}
    stored = {p.stem.replace("__", "/") for p in HUB_CONFIGS.glob("*.json")}
    assert stored <= teachers and set(PUBLISHED_PARAMETERS) == stored


BUDGET = re.compile(r"(\d+) x (\d+) x (\d+) x (\d+) x (\d+) = ([\d,]+)")


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_token_budget_comments_agree_with_the_recipe(name):
    """`steps x batch_size x grad_accum x processes x seq_len = total` comments state each stage's tokens."""
    recipe = load_recipe(name)
    if recipe.teacher.path.startswith("bundled:"):
        return
    stated = set()
    for match in BUDGET.finditer(shipped_recipes()[name].read_text()):
        *factors, total = match.groups()
        product = 1
        for f in factors:
            product *= int(f)
        assert product == int(total.replace(",", "")), match.group(0)
        stated.add(product)
    computed = {recipe.stage_tokens(stage, recipe.launch.num_processes) for stage in ("attention", "logits")}
    assert stated == computed, f"{name}: comments state {stated}, the recipe gives {computed} tokens"


def test_launch_section_is_validated(tmp_path):
    assert load_recipe("tiny").launch == LaunchConfig()  # recipes without a launch section keep working
    r = load_recipe(
        "tiny", {"launch.accelerate_config": "fsdp2", "launch.processes": "8", "launch.nodes": "2"}
    )
    assert r.launch.num_processes == 16
    custom = tmp_path / "mine.yaml"
    custom.write_text("distributed_type: MULTI_GPU\n")
    assert load_recipe("tiny", {"launch.accelerate_config": str(custom)}).launch.accelerate_config == str(
        custom
    )
    with pytest.raises(
        RecipeError, match=r"launch\.accelerate_config: no accelerate config 'zero4'.*ddp, fsdp2"
    ):
        load_recipe("tiny", {"launch.accelerate_config": "zero4"})
    with pytest.raises(RecipeError, match=r"launch\.processes must be an integer >= 1"):
        load_recipe("tiny", {"launch.processes": "0"})
    with pytest.raises(RecipeError, match=r"8 processes need launch\.accelerate_config"):
        load_recipe("tiny", {"launch.processes": "8"})
    with pytest.raises(RecipeError, match=r"launch\.device_memory_gb must be >= 0"):
        load_recipe("tiny", {"launch.device_memory_gb": "-1"})
    assert accelerate_config_path("zero3").name == "zero3.yaml"


def test_every_field_is_documented():
    undocumented = [key for key, _, doc in describe() if not doc]
    assert not undocumented


def test_dotted_overrides_are_typed():
    r = load_recipe(
        "tiny",
        {
            "stages.attention.steps": "50",
            "stages.logits.lr": "3e-4",
            "student.layers": "[0, 3]",
            "student.settings.feature_map": "t2r",
        },
    )
    assert r.stages.attention.steps == 50 and r.stages.logits.lr == 3e-4
    assert r.student.layers == [0, 3] and r.student.settings.feature_map == "t2r"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        RecipeError, match=r"unknown recipe key 'stages\.attention\.stepz'; valid keys: steps, lr"
    ):
        load_recipe("tiny", {"stages.attention.stepz": "5"})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'bogus'; valid keys: name"):
        load_recipe("tiny", {"bogus": "1"})
    with pytest.raises(
        RecipeError, match=r"unknown recipe key 'stages\.atention'; valid keys: attention, logits"
    ):
        load_recipe("tiny", {"stages.atention.steps": "5"})


def test_wrong_type_names_the_field():
    with pytest.raises(RecipeError, match=r"stages\.attention\.steps must be an integer, got 'many'"):
        load_recipe("tiny", {"stages.attention.steps": "many"})
    with pytest.raises(RecipeError, match=r"stages\.attention\.steps must be an integer"):
        load_recipe("tiny", {"stages.attention.steps": "1.5"})
    with pytest.raises(RecipeError, match=r"stages\.attention\.steps must be an integer, got '\[1'"):
        load_recipe("tiny", {"stages.attention.steps": "[1"})  # not YAML: still a type error naming the field


def test_overrides_take_comma_lists_and_text_as_written():
    r = load_recipe(
        "tiny",
        {
            "eval.tasks": "ppl,recall",
            "student.layers": "0,3",
            "stages.logits.lora_targets": "q_proj",
            "name": "2024",
            "launch.accelerate_config": '""',
        },
    )
    assert r.eval.tasks == ["ppl", "recall"] and r.student.layers == [0, 3]
    assert r.stages.logits.lora_targets == ["q_proj"]  # one item alone
    assert r.name == "2024" and r.launch.accelerate_config == ""  # text: as written, or as YAML quotes it
    assert load_recipe("tiny", {"eval.tasks": ""}).eval.tasks == []


@dataclasses.dataclass(kw_only=True)
class _Settings:
    """A flat settings class like a command's (EvalSettings, PublishSettings)."""

    revision: str = "main"
    sizes: list[int] = dataclasses.field(default_factory=lambda: [1])
    names: list[str] = dataclasses.field(default_factory=list)
    fractions: list[float] = dataclasses.field(default_factory=list)
    dry_run: bool = False
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if min(self.sizes) < 1:
            raise _CommandError(f"sizes must be >= 1, got {self.sizes}")


class _CommandError(RuntimeError):
    """A command's own error class."""


def test_parse_pairs_into_a_commands_settings():
    s = parse_pairs_into(
        _Settings,
        {"revision": "1.0", "sizes": "4,8", "names": "a,b", "fractions": "[0, 1]", "dry_run": "yes"},
        error=_CommandError,
    )
    assert s == _Settings(revision="1.0", sizes=[4, 8], names=["a", "b"], fractions=[0.0, 1.0], dry_run=True)
    assert parse_pairs_into(_Settings, {"sizes": "[2]", "names": "a"}, error=_CommandError).names == ["a"]
    for pair, message in (
        ({"sise": "1"}, r"unknown option 'sise'; valid keys: model, revision, sizes"),
        ({"sizes": "1,x"}, r"sizes\[1\] must be an integer, got 'x'"),
        ({"dry_run": "maybe"}, r"dry_run must be true or false, got 'maybe'"),
        ({"mode": "c"}, r"mode='c' is not valid; choose one of: a, b"),
    ):
        with pytest.raises(_CommandError, match=message):
            parse_pairs_into(_Settings, pair, error=_CommandError, what="option", also_valid=["model"])
    with pytest.raises(_CommandError, match=r"sizes must be >= 1"):  # the class's own checks pass through
        parse_pairs_into(_Settings, {"sizes": "0"}, error=_CommandError)


def test_stage_tokens_count_every_process_and_only_steps_that_run():
    r = load_recipe(
        "tiny",
        {"stages.logits.steps": "10", "stages.logits.batch_size": "4", "stages.logits.grad_accum": "2"},
    )
    assert r.stages.logits.tokens_per_step(3, r.data.seq_len) == 4 * 2 * 3 * r.data.seq_len
    assert r.stage_tokens("logits", 3) == 10 * 4 * 2 * 3 * r.data.seq_len
    softmax = load_recipe(
        "tiny", {"student.mixer": "softmax", "student.settings": "{}", "stages.attention.steps": "10"}
    )
    assert softmax.stage_tokens("attention", 1) == 0  # nothing to align: stage attention does not run


def test_bad_choice_lists_choices():
    with pytest.raises(
        RecipeError,
        match=r"student\.settings\.feature_map='hedgehug' is not valid; choose one of: elu, hedgehog, relu, t2r",
    ):
        load_recipe("tiny", {"student.settings.feature_map": "hedgehug"})
    with pytest.raises(RecipeError, match=r"train\.precision='fp8' is not valid; choose one of: fp32, bf16"):
        load_recipe("tiny", {"train.precision": "fp8"})
    with pytest.raises(RecipeError, match=r"stages\.logits\.trainable"):
        load_recipe("tiny", {"stages.logits.trainable": "everything"})


def test_bad_values_fail_early():
    with pytest.raises(RecipeError, match=r"stages\.attention\.batch_size must be >= 1"):
        load_recipe("tiny", {"stages.attention.batch_size": "0"})
    with pytest.raises(RecipeError, match=r"train\.keep_checkpoints must be >= 2"):
        load_recipe("tiny", {"train.keep_checkpoints": "1"})


def test_recipe_from_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "seed": 3, "stages": {"attention": {"steps": 2}}}))
    r = load_recipe(str(path))
    assert (r.name, r.seed, r.stages.attention.steps) == ("mine", 3, 2)
    with pytest.raises(RecipeError, match="unknown recipe 'nope'; shipped recipes: .*tiny"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_recipe_hash_changes_with_any_field_but_the_output_folder():
    assert Recipe().hash() != Recipe(seed=1).hash()
    assert Recipe().hash() == Recipe().hash() == Recipe(output_dir="elsewhere").hash()


def test_field_docs_read_docstrings():
    assert "Hub id" in field_docs(Recipe.__dataclass_fields__["teacher"].default_factory().__class__)["path"]


def test_feature_dim_and_bias_are_checked():
    r = load_recipe("tiny", {"student.settings.feature_dim": "32", "student.settings.feature_bias": "true"})
    assert (r.student.settings.feature_dim, r.student.settings.feature_bias) == (32, True)
    with pytest.raises(
        RecipeError, match=r"student\.settings\.feature_dim must be an integer >= 1 or null, got 0"
    ):
        load_recipe("tiny", {"student.settings.feature_dim": "0"})
    with pytest.raises(RecipeError, match=r"student\.settings\.feature_map='elu' has no learned projection"):
        load_recipe("tiny", {"student.settings.feature_map": "elu", "student.settings.feature_bias": "true"})


def test_each_mixer_has_its_own_settings():
    """`student.settings` is the dataclass `student.mixer` selects: its defaults, its keys only, saved and
    reloaded as written; an earlier recipe's flat key names where it lives now."""
    from linearize.config import MIXER_SETTINGS, GatedSlotSettings, LinearSettings, WindowLinearSettings
    from linearize.registry import MIXERS

    assert set(MIXER_SETTINGS) == set(MIXERS)
    r = load_recipe("tiny", {"student.mixer": "window_linear", "student.settings.window": "16"})
    assert isinstance(r.student.settings, WindowLinearSettings) and r.student.settings.window == 16
    assert (
        r.student.settings.feature_dim == 32
    )  # the tiny recipe's settings carry over: window_linear has them
    assert load_recipe(str(write(r))).student == r.student
    slots = load_recipe("tiny", {"student.mixer": "gated_slot", "student.settings": "{num_slots: 8}"})
    assert slots.student.settings == GatedSlotSettings(num_slots=8)
    assert load_recipe("tiny").to_dict()["student"]["settings"] == dataclasses.asdict(
        LinearSettings(feature_dim=32, feature_bias=True)
    )
    with pytest.raises(
        RecipeError,
        match=r"student.settings of the linear mixer: unknown recipe key "
        r"'student.settings.num_slots'.*Its settings: feature_map, feature_dim, feature_bias, eps",
    ):
        load_recipe("tiny", {"student.settings.num_slots": "8"})
    with pytest.raises(RecipeError, match=r"student.settings of the softmax mixer.*student.settings=\{\}"):
        load_recipe("tiny", {"student.mixer": "softmax"})
    with pytest.raises(
        RecipeError, match=r"'student.window' is now 'student.settings.window': move it there"
    ):
        load_recipe("tiny", {"student.window": "8"})


def write(recipe):
    import tempfile

    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    return path
