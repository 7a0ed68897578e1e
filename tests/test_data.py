import json

import pytest
import torch
from transformers import AutoTokenizer

from linearize.assets import bundled_path
from linearize.config import DataConfig
from linearize.data import DataError, batch_indices, build_splits, load_documents, pack


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_path("stories260K"))


def test_bundled_text_splits_into_documents():
    docs = load_documents("bundled:tinystories_docs.txt")
    assert len(docs) == 149 and all("<|endoftext|>" not in d for d in docs)


def test_jsonl_and_parquet(tmp_path):
    rows = [{"text": f"story number {i}."} for i in range(5)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_documents(str(tmp_path / "a.jsonl")) == [r["text"] for r in rows]
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    assert load_documents(str(tmp_path / "a.parquet")) == [r["text"] for r in rows]
    with pytest.raises(DataError, match="no column 'body'.*set data.text_field"):
        load_documents(str(tmp_path / "a.jsonl"), text_field="body")


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        load_documents(str(tmp_path / "x.csv"))


def test_splits_hold_out_the_last_documents(tokenizer):
    cfg = DataConfig(heldout_docs=49, seq_len=64)
    splits = build_splits(cfg, tokenizer)
    assert len(splits.heldout) == 49 and splits.train.shape[1] == 64
    assert all(doc[0] == tokenizer.bos_token_id for doc in splits.heldout)
    last_story = load_documents("bundled:tinystories_docs.txt")[-1]
    assert tokenizer.decode(splits.heldout[-1][1:]).strip()[:40] == last_story[:40]
    with pytest.raises(DataError, match="leaves no training documents"):
        build_splits(DataConfig(heldout_docs=149), tokenizer)
    with pytest.raises(DataError, match="shorter than one block"):
        build_splits(DataConfig(heldout_docs=148, seq_len=100_000), tokenizer)


def test_pack_keeps_or_drops_the_remainder():
    docs = [[1, 2, 3], [4, 5, 6, 7]]
    assert pack(docs, 3) == [[1, 2, 3], [4, 5, 6]]
    assert pack(docs, 3, keep_remainder=True) == [[1, 2, 3], [4, 5, 6], [7]]


def test_batch_order_is_a_function_of_seed_and_step():
    a = [batch_indices(10, 4, s, seed=0) for s in range(6)]
    b = [batch_indices(10, 4, s, seed=0) for s in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(batch_indices(10, 4, 0, seed=1), a[0])
    seen = torch.cat(a)[:10]  # the first epoch visits every block once
    assert sorted(seen.tolist()) == list(range(10))


def stream(path, tokenizer, per_process=3, rank=0, processes=1):
    from linearize.data import StreamedBlocks

    cfg = DataConfig(train=[str(path)], seq_len=64, streaming=True, heldout_docs=0)
    return StreamedBlocks(cfg, tokenizer, per_process, rank, processes)


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    """40 stories: a stream of about 60 blocks of 64 tokens, so a few batches cross an epoch boundary."""
    docs = load_documents("bundled:tinystories_docs.txt")[:40]
    path = tmp_path_factory.mktemp("stream") / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_stream_packs_the_in_memory_blocks_in_order(short_text, tokenizer):
    blocks = build_splits(DataConfig(train=[str(short_text)], seq_len=64, heldout_docs=0), tokenizer).train
    first = stream(short_text, tokenizer, per_process=len(blocks)).batch(0)
    assert torch.equal(first, blocks)  # one map batch holds every document: the same packing


@pytest.mark.parametrize("second_epoch", [False, True])
def test_a_resumed_stream_continues_on_the_next_unseen_block(short_text, tokenizer, second_epoch):
    blocks = len(
        build_splits(DataConfig(train=[str(short_text)], seq_len=64, heldout_docs=0), tokenizer).train
    )
    stop_after = blocks // 3 + 2 if second_epoch else 5  # batches of 3 blocks read before the "checkpoint"
    reference = stream(short_text, tokenizer)
    expected = [reference.batch(i) for i in range(stop_after + 6)]
    first = stream(short_text, tokenizer)
    for i in range(stop_after):
        first.batch(i)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = stream(short_text, tokenizer)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.batch(i), expected[i]) for i in range(stop_after, stop_after + 6))
    assert resumed.epoch == int(second_epoch)


def test_stream_is_split_over_processes(short_text, tokenizer):
    whole = stream(short_text, tokenizer, per_process=40).batch(0)
    parts = [stream(short_text, tokenizer, per_process=20, rank=r, processes=2).batch(0) for r in (0, 1)]
    rows = {tuple(r.tolist()) for part in parts for r in part}
    assert len(rows) == 40 and rows <= {tuple(r.tolist()) for r in stream(short_text, tokenizer, 70).batch(0)}
    assert not {tuple(r.tolist()) for r in parts[0]} & {tuple(r.tolist()) for r in parts[1]}
    assert len(whole) == 40


def test_streaming_needs_separate_heldout_text():
    from linearize.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="data.streaming .* give data.heldout=<files>"):
        DataConfig(streaming=True)
    with pytest.raises(RecipeError, match="cache_k needs the training blocks up front"):
        load_recipe(
            "tiny", {"data.streaming": "true", "data.heldout_docs": "0", "stages.logits.cache_k": "8"}
        )


def test_a_killed_streaming_run_resumes_to_the_same_losses(tmp_path):
    """`linearize distill` on a stream, killed after step 3 (checkpoint at 2): the rerun reads blocks 5-8
    of the stream again from the saved position, and its losses equal an uninterrupted run's."""
    import os
    import subprocess
    import sys

    from linearize.distill.loop import FAULT_ENV

    def run(out, fault=""):
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        env.pop(FAULT_ENV, None)
        if fault:
            env[FAULT_ENV] = fault
        args = [
            "recipe=tiny",
            "stage=attention",
            f"output_dir={out}",
            "data.streaming=true",
            "data.heldout_docs=0",
        ]
        args += ["stages.attention.steps=4", "stages.attention.batch_size=2", "train.checkpoint_every=2"]
        args += ["eval.tasks=[]", "data.seq_len=64"]
        return subprocess.run(
            [sys.executable, "-m", "linearize", "distill", *args], capture_output=True, text=True, env=env
        )

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert run(tmp_path / "a").returncode == 0
    assert run(tmp_path / "b", "attention:3").returncode != 0
    assert (tmp_path / "b" / "attention" / "checkpoints" / "step-00000002" / "data_state_0.json").is_file()
    resumed = run(tmp_path / "b")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
