"""`linearize publish`: checks before any upload, the card, deltas-only checkpoints, the upload call."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import linearize  # noqa: F401  (registers the converted classes with the Auto classes)
from linearize.assets import bundled_path
from linearize.cli import main
from linearize.config import Recipe, StudentConfig
from linearize.convert import export as export_module
from linearize.convert.card import CardError, check_card
from linearize.convert.export import export, file_digests
from linearize.convert.publish import PublishError, PublishSettings, publish
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher

BASE = "karpathy/stories260K"  # the Hub id the deltas name; the weights come from the bundled folder


def exported(folder):
    """The bundled teacher converted (untrained, with perturbed feature maps and one perturbed q_proj, so
    new and changed weights both exist), exported to `folder`."""
    teacher, tokenizer = load_teacher("bundled:stories260K")
    plan = plan_for(StudentConfig(), teacher.config)
    student = swap(teacher, plan)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".feature_map_" in name or "layers.0.self_attn.q_proj" in name:
                p.add_(0.1 * torch.randn_like(p))
    evals = {"teacher": {"ppl": 6.1, "tokens": 100}, "student_after_logits": {"ppl": 7.5, "tokens": 100}}
    return export(student, tokenizer, plan, Recipe(), folder, evals, {"attention": 1024, "logits": 2048})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("publish") / "final")


@pytest.fixture
def copy(folder, tmp_path):
    """A private copy of the export, for tests that break it."""
    target = tmp_path / "final"
    shutil.copytree(folder, target)
    return target


def settings(**kw):
    return PublishSettings.from_pairs({"repo": "me/tiny-linear", **kw})


def never_upload(*args, **kwargs):
    raise AssertionError("upload must not be called")


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_dry_run_checks_everything_lists_the_files_and_leaves_the_export_alone(folder):
    before = snapshot(folder)
    lines = []
    result = publish(folder, settings(dry_run="true"), upload=never_upload, log=lines.append)
    names = [name for name, _ in result["files"]]
    assert {
        "model.safetensors",
        "config.json",
        "README.md",
        "modeling_linearize.py",
        "tokenizer.json",
    } <= set(names)
    assert "COMPLETE" not in names
    printed = "\n".join(lines)
    assert "loads without linearize" in printed and "logits match the export" in printed
    for name, size in result["files"]:
        assert f"{size:,}  {name}" in printed
    assert result["card"] in printed
    assert snapshot(folder) == before


def test_card_names_base_licence_budget_and_validates_offline(folder):
    card = publish(
        folder, settings(dry_run="true", base_model=BASE), upload=never_upload, log=lambda _: None
    )["card"]
    data = check_card(card)
    assert data["base_model"] == BASE and data["license"] == "mit"  # carried over from the teacher's card
    assert data["library_name"] == "transformers"
    assert {"linearize", "linear-attention", "mixer-linear", "llama"} <= set(data["tags"])
    metrics = data["model-index"][0]["results"][0]["metrics"][0]
    assert metrics["type"] == "perplexity" and metrics["value"] == 7.5
    assert "attention: 1,024 tokens, logits: 2,048 tokens" in card and "Hardware: 1 x CPU" in card
    assert "mixer: linear" in card  # the resolved recipe is embedded
    with pytest.raises(CardError, match="license"):
        check_card(card.replace("license: mit\n", ""))


def test_upload_gets_the_staged_folder_and_the_settings(folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    calls = []

    def fake_upload(path, repo, **kw):
        calls.append((path, repo, kw, sorted(p.name for p in path.iterdir())))
        return "https://huggingface.co/me/tiny-linear/commit/abc"

    s = settings(private="true", revision="dev", commit_message="first")
    result = publish(folder, s, upload=fake_upload, log=lambda _: None)
    (path, repo, kw, files) = calls[0]
    assert len(calls) == 1 and repo == "me/tiny-linear"
    assert kw == {"private": True, "revision": "dev", "commit_message": "first"}
    assert path == folder.with_name("final-hub-full") and "model.safetensors" in files
    assert result["url"].endswith("/commit/abc")


def test_no_token_stops_before_any_work(folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN"):
        publish(folder, settings(), upload=never_upload, log=lambda _: None)


def test_network_failure_is_a_clear_error_and_leaves_the_folder_untouched(folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    before = snapshot(folder)

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    with pytest.raises(PublishError, match="upload to me/tiny-linear failed .*ConnectionError.* untouched"):
        publish(folder, settings(), upload=offline, log=lambda _: None)
    assert snapshot(folder) == before


def test_missing_shard_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "MAX_SHARD_SIZE", "300KB")
    folder = exported(tmp_path / "final")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    shards[1].unlink()
    with pytest.raises(
        PublishError, match=f"check 'files' failed: weight shard\\(s\\) {shards[1].name} missing"
    ):
        publish(folder, settings(dry_run="true"), upload=never_upload, log=lambda _: None)


def test_corrupted_weight_file_is_caught(copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(
        PublishError, match="check 'checksums' failed: model.safetensors .*corrupted or modified"
    ):
        publish(copy, settings(dry_run="true"), upload=never_upload, log=lambda _: None)


def test_weights_that_no_longer_give_the_exported_logits_are_caught(copy):
    """Even with digests that match (someone rewrote both), the logits check fails."""
    state = load_file(copy / "model.safetensors")
    state["model.layers.1.self_attn.v_proj.weight"] *= 1.5
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    fingerprint = json.loads((copy / "fingerprint.json").read_text())
    fingerprint["files"] = file_digests(copy)
    (copy / "fingerprint.json").write_text(json.dumps(fingerprint))
    with pytest.raises(PublishError, match="check 'logits' failed .* relative RMS error"):
        publish(copy, settings(dry_run="true"), upload=never_upload, log=lambda _: None)


def test_modeling_code_that_imports_linearize_is_caught(copy):
    code = copy / "modeling_linearize.py"
    code.write_text(code.read_text().replace("import torch\n", "import torch\nimport linearize\n", 1))
    with pytest.raises(PublishError, match="check 'imports linearize' failed"):
        publish(copy, settings(dry_run="true"), upload=never_upload, log=lambda _: None)


def test_deltas_hold_only_changed_weights_and_give_the_full_logits(folder):
    from transformers import AutoModelForCausalLM

    s = settings(dry_run="true", mode="deltas", base_model=BASE)
    result = publish(folder, s, upload=never_upload, log=lambda _: None)
    deltas = folder.with_name("final-hub-deltas")
    stored = set(load_file(deltas / "model.safetensors"))
    assert "model.layers.0.self_attn.feature_map_q.weight" in stored  # new
    assert "model.layers.0.self_attn.q_proj.weight" in stored  # changed
    assert (
        "model.embed_tokens.weight" not in stored and "model.layers.1.self_attn.q_proj.weight" not in stored
    )
    assert json.loads((deltas / "config.json").read_text())["linearize_base"]["name"] == BASE
    assert "deltas-only" in check_card(result["card"])["tags"]
    ids = torch.tensor([[1, 403, 407, 261, 378, 29, 1018 % 512]])
    full = AutoModelForCausalLM.from_pretrained(folder)
    loaded = AutoModelForCausalLM.from_pretrained(deltas, base_model_path=str(bundled_path("stories260K")))
    assert torch.equal(full(ids).logits, loaded(ids).logits)


def test_deltas_refuse_a_wrong_or_unreachable_base(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    publish(
        folder,
        settings(dry_run="true", mode="deltas", base_model=BASE),
        upload=never_upload,
        log=lambda _: None,
    )
    deltas = folder.with_name("final-hub-deltas")
    other = tmp_path / "other"
    shutil.copytree(bundled_path("stories260K"), other)
    state = load_file(other / "model.safetensors")
    state["model.embed_tokens.weight"] += 0.01
    save_file(state, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not the base model 'karpathy/stories260K'"):
        AutoModelForCausalLM.from_pretrained(deltas, base_model_path=str(other))
    with pytest.raises(OSError, match="needs its base model 'karpathy/stories260K'.*base_model_path"):
        AutoModelForCausalLM.from_pretrained(deltas)  # offline, and not in the Hub cache


def test_deltas_need_a_hub_id_for_the_base(folder):
    with pytest.raises(
        PublishError, match="mode=deltas needs the base model's Hub id .* base_model=org/name"
    ):
        publish(folder, settings(dry_run="true", mode="deltas"), upload=never_upload, log=lambda _: None)


def test_report_of_another_model_is_refused(copy, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "results.json").write_text(
        json.dumps({"info": {"model": str(tmp_path / "elsewhere")}, "tasks": {}})
    )
    (report / "report.md").write_text("# report\n")
    with pytest.raises(PublishError, match="evaluated .*elsewhere, not"):
        publish(copy, settings(dry_run="true", report=str(report)), upload=never_upload, log=lambda _: None)


def test_settings_are_checked(folder):
    with pytest.raises(PublishError, match="repo must be a Hub id like org/name"):
        PublishSettings.from_pairs({"repo": "nope"})
    with pytest.raises(PublishError, match="mode must be one of full, deltas"):
        settings(mode="partial")
    with pytest.raises(PublishError, match="unknown publish setting 'privat'.*private"):
        settings(privat="true")
    with pytest.raises(PublishError, match="dry_run must be true or false, got 'maybe'"):
        settings(dry_run="maybe")
    typed = settings(private="yes", revision="1.0", commit_message="fix: a, b")
    assert typed.private is True
    assert (typed.revision, typed.commit_message) == ("1.0", "fix: a, b")  # text fields keep what was written
    with pytest.raises(PublishError, match="not a complete export"):
        publish(folder.parent, settings(dry_run="true"), upload=never_upload, log=lambda _: None)


def test_cli_publish_dry_run(folder, capsys):
    main(["publish", str(folder), "repo=me/tiny-linear", "dry_run=true"])
    out = capsys.readouterr().out
    assert "dry run: would upload to me/tiny-linear" in out and "model.safetensors" in out
    with pytest.raises(SystemExit, match="publish needs the exported folder"):
        main(["publish", "repo=me/x"])


@pytest.mark.parametrize("revision", ["main", "v1"])
def test_hub_upload_creates_the_repo_then_uploads_the_folder(tmp_path, monkeypatch, revision):
    import huggingface_hub

    from linearize.convert.publish import hub_upload

    calls = []

    class CommitInfo:
        commit_url = "https://huggingface.co/me/x/commit/1"

    def record(name, result=None):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result

        return method

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", record("create_repo"))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", record("create_branch"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", record("upload_folder", CommitInfo()))
    url = hub_upload(tmp_path, "me/x", private=True, revision=revision, commit_message="m")
    assert url == CommitInfo.commit_url
    expected = [("create_repo", ("me/x",), {"private": True, "exist_ok": True})]
    if revision != "main":
        expected.append(("create_branch", ("me/x",), {"branch": "v1", "exist_ok": True}))
    upload = {
        "repo_id": "me/x",
        "folder_path": tmp_path,
        "revision": revision,
        "commit_message": "m",
        "ignore_patterns": ["COMPLETE"],
    }
    assert calls == [*expected, ("upload_folder", (), upload)]
