"""Teacher-written text: generated once per (teacher, settings, split), resumable, reused, held-out openings
kept apart; and the refusal of a stage that would repeat its training text too often."""

import json

import pytest

from linearize import teacher_text
from linearize.config import DataConfig, RecipeError, SamplingConfig, load_recipe, teacher_text_tokens
from linearize.convert.teachers import load_teacher
from linearize.data import DataError

TEACHER = "bundled:stories260K"


@pytest.fixture(scope="module")
def tiny():
    return load_teacher(TEACHER)


def sampling(tmp_path, **kw) -> SamplingConfig:
    return SamplingConfig(cache_dir=str(tmp_path / "cache"), max_new_tokens=12, batch_size=3, **kw)


def texts(parts) -> list[str]:
    return [json.loads(line)["text"] for p in parts for line in p.read_text().splitlines()]


def test_generated_text_continues_document_openings_and_is_kept(tmp_path, tiny):
    model, tokenizer = tiny
    cfg = sampling(tmp_path)
    parts = teacher_text.generate(model, tokenizer, cfg, TEACHER, "float32", "train", 100)
    manifest = json.loads((parts[0].parent / "manifest.json").read_text())
    assert sum(p["tokens"] for p in manifest["parts"]) >= 100 and len(parts) == len(manifest["parts"])
    train_openings = set(teacher_text.openings(cfg, "train"))
    written = texts(parts)
    assert len(written) == 3 * len(parts)
    # each document is an opening (as the tokenizer spells it back) followed by the teacher's continuation
    assert all(any(t.startswith(o[:20]) for o in train_openings) and len(t) > 30 for t in written)
    # asked again (fewer tokens): nothing generated, the first parts returned
    again = teacher_text.generate(None, tokenizer, cfg, TEACHER, "float32", "train", 10)
    assert again == parts[:1]


def test_a_resumed_generation_writes_what_an_unbroken_one_writes(tmp_path, tiny):
    model, tokenizer = tiny
    whole = teacher_text.generate(
        model, tokenizer, sampling(tmp_path / "a"), TEACHER, "float32", "train", 150
    )
    cfg = sampling(tmp_path / "b")
    teacher_text.generate(model, tokenizer, cfg, TEACHER, "float32", "train", 1)  # "killed" after one part
    resumed = teacher_text.generate(model, tokenizer, cfg, TEACHER, "float32", "train", 150)
    assert texts(resumed) == texts(whole)
    # a different batch size is the same text (and the same folder): it is not part of the key
    other = SamplingConfig(**{**vars(cfg), "batch_size": 5})
    assert teacher_text.text_folder(other, TEACHER, "train") == resumed[0].parent


def test_heldout_text_comes_only_from_heldout_openings(tmp_path, tiny):
    cfg = sampling(tmp_path, heldout_prompts=5)
    train, heldout = teacher_text.openings(cfg, "train"), teacher_text.openings(cfg, "heldout")
    assert len(heldout) == 5 and not set(train) & set(heldout)
    model, tokenizer = tiny
    parts = teacher_text.generate(model, tokenizer, cfg, TEACHER, "float32", "heldout", 40)
    assert all(any(t.startswith(o[:20]) for o in heldout) for t in texts(parts))
    assert parts[0].parent != teacher_text.text_folder(cfg, TEACHER, "train")


def test_resolve_replaces_teacher_sources_and_refuses_without_a_writer(tmp_path, tiny):
    model, tokenizer = tiny
    data = DataConfig(train=["teacher:60", "bundled:tinystories_docs.txt"], sampling=sampling(tmp_path))
    with pytest.raises(DataError, match="not generated yet.*linearize generate"):
        teacher_text.resolve(data, TEACHER, "float32", None, tokenizer)
    resolved = teacher_text.resolve(data, TEACHER, "float32", model, tokenizer)
    assert resolved.train[-1] == "bundled:tinystories_docs.txt"
    assert all(p.endswith(".jsonl") for p in resolved.train[:-1])
    assert teacher_text.resolve(data, TEACHER, "float32", None, tokenizer).train == resolved.train


def test_sources_and_settings_are_checked():
    assert teacher_text_tokens("teacher:1.5M") == 1_500_000 and teacher_text_tokens("a.txt") is None
    with pytest.raises(RecipeError, match="'teacher:lots'.*not a token count"):
        DataConfig(train=["teacher:lots"])
    with pytest.raises(RecipeError, match="data.max_epochs must be > 0"):
        DataConfig(max_epochs=0)
    with pytest.raises(RecipeError, match="data.sampling.chat"):
        SamplingConfig(chat="sometimes")
    with pytest.raises(RecipeError, match=r"each hold `\{opening\}`"):
        SamplingConfig(instructions=["Write a story."])


def test_chat_always_needs_a_chat_template(tmp_path, tiny):
    _, tokenizer = tiny
    with pytest.raises(DataError, match="no chat template"):
        teacher_text.uses_chat(sampling(tmp_path, chat="always"), tokenizer)


def test_a_stage_that_would_repeat_its_text_too_often_is_refused_before_the_run_folder(tmp_path):
    from linearize.pipeline import convert

    out = tmp_path / "run"
    recipe = load_recipe(
        "tiny",
        {
            "output_dir": str(out),
            "stages.attention.steps": "2",
            "stages.logits.steps": "400",
            "data.max_epochs": "2",
        },
    )
    with pytest.raises(
        RecipeError,
        match=r"stage logits would read the training text .* more than data.max_epochs=2.*teacher:",
    ):
        convert(recipe)
    assert not out.exists()


@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_nucleus_sampling_draws_from_the_tokens_transformers_top_p_keeps(scale):
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 400) * scale
    warped = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.8)(None, logits))
    expected = warped.softmax(-1)
    generator = torch.Generator().manual_seed(0)
    # k=16: the flat rows' nuclei are wider than the partial sort and take the full-sort path
    draws = torch.stack([teacher_text.nucleus_sample(logits, 0.8, 0.9, generator, k=16) for _ in range(3000)])
    counts = torch.zeros_like(expected).scatter_add_(1, draws.T, torch.ones(6, 3000))
    assert not (counts > 0)[torch.isinf(warped)].any(), "a token outside the nucleus was drawn"
    # frequencies match the renormalised nucleus (3000 draws: a standard error of at most 0.009)
    assert (counts / 3000 - expected).abs().max() < 0.04


def test_a_left_padded_prompt_continues_as_it_would_alone(tiny):
    model, tokenizer = tiny
    cfg = SamplingConfig(temperature=1e-4, top_p=1.0, max_new_tokens=10)  # greedy in effect
    prompts = ["Once upon a time, there was a little girl", "The dog ran"]
    together = teacher_text.sample_batch(model, tokenizer, cfg, prompts, seed=0, bos=True)
    alone = [teacher_text.sample_batch(model, tokenizer, cfg, [p], seed=0, bos=True)[0] for p in prompts]
    assert together == alone
    assert together[1][0].startswith("The dog ran") and together[1][1] > 4


def test_a_second_writer_waits_for_the_first_then_reads_its_text(tmp_path, tiny):
    import threading
    import time

    model, tokenizer = tiny
    cfg = sampling(tmp_path)
    folder = teacher_text.text_folder(cfg, TEACHER, "train")
    folder.mkdir(parents=True)
    said, result = [], {}

    def second():
        result["parts"] = teacher_text.generate(
            model, tokenizer, cfg, TEACHER, "float32", "train", 50, said.append
        )

    with teacher_text.exclusive(folder / ".lock", print):  # the first writer, mid-generation
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(1.0)
        assert thread.is_alive() and "another process" in said[0]
        manifest = {"parts": [], "settings": {"split": "train"}}
        teacher_text.write_parts(model, tokenizer, cfg, folder, manifest, "float32", 50, print)
    thread.join(timeout=60)
    assert result["parts"] == [folder / p["file"] for p in manifest["parts"]]
    assert not any("generating" in line for line in said)


def test_evaluation_scores_the_runs_teacher_written_heldout_text_and_never_writes_it(tmp_path, tiny):
    from linearize.evals.context import EvalContext, EvalSettings, Scorer
    from linearize.evals.perplexity import heldout_texts

    model, tokenizer = tiny
    sampling_keys = {"cache_dir": str(tmp_path / "cache"), "max_new_tokens": 12, "batch_size": 3}
    recipe = {
        "teacher": {"path": TEACHER, "dtype": "float32"},
        "data": {"heldout": ["teacher:40"], "sampling": sampling_keys},
    }
    ctx = EvalContext(
        teacher=Scorer("teacher", model),
        student=Scorer("student", model),
        tokenizer=tokenizer,
        settings=EvalSettings(),
        recipe=recipe,
    )
    with pytest.raises(DataError, match="linearize generate"):
        heldout_texts(ctx)
    parts = teacher_text.generate(
        model, tokenizer, SamplingConfig(**sampling_keys), TEACHER, "float32", "heldout", 40
    )
    docs, source = heldout_texts(ctx)
    assert docs == texts(parts) and source == "teacher:40"
