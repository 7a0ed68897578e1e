import pytest
from conftest import tiny_config

from linearize.convert.teachers import TeacherError, family_of, load_teacher, resolve_path
from linearize.data import DataError, load_documents


def test_bundled_teacher_loads_and_generates_the_reference_text():
    model, tok = load_teacher("bundled:stories260K")
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    text = tok.decode(model.generate(ids, max_new_tokens=30, do_sample=False)[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside")


def test_unsupported_family_fails_before_loading_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(
        TeacherError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"
    ):
        load_teacher(str(tmp_path))


def test_folder_without_config_and_bad_paths(tmp_path):
    with pytest.raises(TeacherError, match="has no config.json"):
        resolve_path(str(tmp_path))
    with pytest.raises(TeacherError, match="neither an existing folder nor a Hub id"):
        resolve_path("./missing/model")
    assert resolve_path("org/name") == "org/name"


def test_offline_hub_teacher_and_dataset_are_clear_errors(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="offline, give a local folder"):
        load_teacher("linearize-test/definitely-not-cached")
    with pytest.raises(DataError, match="offline, give local files instead"):
        load_documents("hub:linearize-test/definitely-not-cached")


def test_gqa_must_divide():
    config = tiny_config("llama")
    config.num_key_value_heads = 3
    with pytest.raises(TeacherError, match="not a multiple of 3 KV heads"):
        family_of(config)
