import json

import pytest
import torch
from transformers import AutoTokenizer

from linearize.config import DataConfig
from linearize.convert.teachers import bundled_path
from linearize.distill.data import DataError, batch_indices, build_splits, load_documents, pack


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
