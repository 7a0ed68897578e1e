import pytest
import yaml

from linearize.config import Recipe, RecipeError, describe, field_docs, load_recipe, shipped_recipes


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_loads_and_validates(name):
    recipe = load_recipe(name)
    assert recipe.description, f"{name} needs a one-line description"
    assert recipe.name == name
    # the resolved recipe round-trips through YAML unchanged
    again = load_recipe(name, {})
    assert again.to_yaml() == recipe.to_yaml()


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
            "student.feature_map": "t2r",
        },
    )
    assert r.stages.attention.steps == 50 and r.stages.logits.lr == 3e-4
    assert r.student.layers == [0, 3] and r.student.feature_map == "t2r"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(RecipeError, match=r"unknown key stages\.attention\.stepz.*valid keys: steps, lr"):
        load_recipe("tiny", {"stages.attention.stepz": "5"})
    with pytest.raises(RecipeError, match=r"unknown key bogus in the recipe; valid keys: name"):
        load_recipe("tiny", {"bogus": "1"})


def test_wrong_type_names_the_field():
    with pytest.raises(RecipeError, match=r"stages\.attention\.steps must be an integer, got 'many'"):
        load_recipe("tiny", {"stages.attention.steps": "many"})
    with pytest.raises(RecipeError, match=r"stages\.attention\.steps must be an integer"):
        load_recipe("tiny", {"stages.attention.steps": "1.5"})


def test_bad_choice_lists_choices():
    with pytest.raises(
        RecipeError,
        match=r"student\.feature_map='hedgehug' is not valid; choose one of: elu, hedgehog, relu, t2r",
    ):
        load_recipe("tiny", {"student.feature_map": "hedgehug"})
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


def test_recipe_hash_changes_with_any_field():
    assert Recipe().hash() != Recipe(seed=1).hash()
    assert Recipe().hash() == Recipe().hash()


def test_field_docs_read_docstrings():
    assert "Hub id" in field_docs(Recipe.__dataclass_fields__["teacher"].default_factory().__class__)["path"]
