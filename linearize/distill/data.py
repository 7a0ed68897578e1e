"""Distillation data: documents loaded with `datasets`, tokenised, packed into fixed-length blocks.

Order is a pure function of (seed, step): the batch of step n never depends on what ran before, so a
resumed run sees exactly the batches an uninterrupted one would, with no data iterator state to save.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from linearize.config import DataConfig
from linearize.convert.teachers import BUNDLED_PREFIX, bundled_path

HUB_PREFIX = "hub:"
_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Missing, unreadable or empty data: the message names the source and the fix."""


@dataclass
class Splits:
    train: torch.Tensor
    """[num_blocks, seq_len] token ids of packed training blocks."""
    heldout: list[list[int]]
    """Held-out documents, tokenised (BOS included when the recipe adds it)."""

    @property
    def train_tokens(self) -> int:
        return self.train.numel()


def _split_documents(batch: dict, separator: str) -> dict:
    docs = []
    pattern = re.compile(rf"^\s*{re.escape(separator)}\s*$", flags=re.MULTILINE)
    for text in batch["text"]:
        docs += [d.strip() for d in pattern.split(text) if d.strip()]
    return {"text": docs}


def load_documents(source: str, text_field: str = "text", separator: str = "<|endoftext|>") -> list[str]:
    """Documents of one source: a local .txt/.jsonl/.json/.parquet file, `hub:NAME` or `bundled:NAME`."""
    import datasets

    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        try:
            ds = datasets.load_dataset(name, split="train")
        except Exception as err:  # datasets raises many kinds for a missing or unreachable dataset
            raise DataError(
                f"cannot load Hub dataset {name!r}: {err}; offline, give local files instead"
            ) from None
    else:
        path = (
            bundled_path(source[len(BUNDLED_PREFIX) :]) if source.startswith(BUNDLED_PREFIX) else Path(source)
        )
        if not path.is_file():
            raise DataError(f"data file {path} does not exist (data.train / data.heldout)")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"data file {path}: unknown format {path.suffix!r}; use one of {', '.join(_FORMATS)}"
            )
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
        if fmt == "text":
            ds = ds.map(_split_documents, batched=True, fn_kwargs={"separator": separator})
    if text_field not in ds.column_names:
        raise DataError(
            f"{source}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); set data.text_field"
        )
    docs = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"{source} holds no non-empty documents")
    return docs


def tokenize(docs: list[str], tokenizer, add_bos: bool = True) -> list[list[int]]:
    """Token ids per document, BOS prepended when asked and the tokenizer has one (BOS alone separates
    packed documents, as in llama2.c and Llama pretraining)."""
    # SentencePiece tokenizers collapse runs of spaces; the fast tokenizer does not, so do it here.
    if not docs:  # the tokenizer itself fails on an empty batch
        return []
    docs = [re.sub(r" {2,}", " ", d) for d in docs]
    ids = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    return [bos + x for x in ids]


def pack(token_lists: list[list[int]], seq_len: int, keep_remainder: bool = False) -> list[list[int]]:
    """Concatenate documents and cut into blocks of `seq_len` (the remainder is a shorter last block
    when `keep_remainder`, else dropped)."""
    flat = [t for doc in token_lists for t in doc]
    blocks = [flat[i : i + seq_len] for i in range(0, len(flat), seq_len)]
    if blocks and len(blocks[-1]) < seq_len and not keep_remainder:
        blocks.pop()
    return blocks


def build_splits(cfg: DataConfig, tokenizer) -> Splits:
    """Training blocks and held-out documents as the recipe's data section says."""
    docs = [d for src in cfg.train for d in load_documents(src, cfg.text_field, cfg.doc_separator)]
    if cfg.heldout:
        heldout = [d for src in cfg.heldout for d in load_documents(src, cfg.text_field, cfg.doc_separator)]
    else:
        if cfg.heldout_docs >= len(docs):
            raise DataError(
                f"data.heldout_docs={cfg.heldout_docs} leaves no training documents out of {len(docs)}; lower it"
            )
        heldout = docs[len(docs) - cfg.heldout_docs :] if cfg.heldout_docs else []
        docs = docs[: len(docs) - cfg.heldout_docs]
    blocks = pack(tokenize(docs, tokenizer, cfg.add_bos), cfg.seq_len)
    if not blocks:
        raise DataError(f"the training text is shorter than one block of data.seq_len={cfg.seq_len} tokens")
    return Splits(
        train=torch.tensor(blocks, dtype=torch.long), heldout=tokenize(heldout, tokenizer, cfg.add_bos)
    )


def batch_indices(num_blocks: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Block indices of global batch `step`: epochs are seeded permutations, so any step is reproducible."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), num_blocks)
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out += perm[offset : offset + batch_size - len(out)].tolist()
    return torch.tensor(out)
