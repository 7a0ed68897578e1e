"""Distillation data: documents loaded with `datasets`, tokenised, packed into fixed-length blocks.

Two sources of training batches, one interface (`batch`, `state_dict`, `load_state_dict`):
- `IndexedBlocks` (default): every block in memory; the batch of step n is a pure function of (seed, n),
  so a resumed run sees exactly the batches an uninterrupted one would, with no state to save.
- `StreamedBlocks` (`data.streaming=true`): a `datasets` stream tokenised and packed on the fly, split over
  processes, read in order; its position is saved in every checkpoint, so a resumed run continues on the
  next unseen block, with no repeat and no skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from linearize.assets import resolve_bundled
from linearize.config import DataConfig
from linearize.errors import LinearizeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HUB_PREFIX = "hub:"
PREVIEW_BLOCKS = 16  # blocks read from the head of a stream for the layer ranking and a sample prompt
_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(LinearizeError, ValueError):
    """Missing, unreadable or empty data: the message names the source and the fix."""


@dataclass
class Splits:
    train: torch.Tensor
    """[num_blocks, seq_len] token ids of packed training blocks."""
    heldout: list[list[int]]
    """Held-out documents, tokenised (BOS included when the recipe adds it)."""
    streaming: bool = False
    """`train` is only the start of a stream (see `build_splits`)."""

    @property
    def train_tokens(self) -> int:
        return self.train.numel()


def _split_documents(batch: dict, separator: str) -> dict:
    docs = []
    pattern = re.compile(rf"^\s*{re.escape(separator)}\s*$", flags=re.MULTILINE)
    for text in batch["text"]:
        docs += [d.strip() for d in pattern.split(text) if d.strip()]
    return {"text": docs}


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a text or JSON file that is not UTF-8, naming the byte offset (datasets would raise from deep
    inside its builder)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                at = offset - (len(err.object) - len(data)) + err.start  # err.object: held-over bytes + data
                raise DataError(
                    f"data file {path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset {at} "
                    f"({err.reason}); convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out of the data"
                ) from None
            if not data:
                return
            offset += len(data)


def _open(source: str, text_field: str, separator: str, streaming: bool = False):
    """One source as a `datasets` (Iterable)Dataset with a `text_field` column of documents."""
    import datasets

    datasets.disable_progress_bars()  # split and map bars of a local file say nothing to the user
    if source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        try:
            ds = datasets.load_dataset(name, split="train", streaming=streaming)
        except Exception as err:  # datasets raises many kinds for a missing or unreachable dataset
            raise DataError(
                f"cannot load Hub dataset {name!r}: {err}; offline, give local files instead"
            ) from None
    else:
        path = Path(resolve_bundled(source))
        if not path.is_file():
            raise DataError(f"data file {path} does not exist (data.train / data.heldout)")
        fmt = _FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"data file {path}: unknown format {path.suffix!r}; use one of {', '.join(_FORMATS)}"
            )
        if fmt in ("text", "json"):
            check_utf8(path)
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=streaming, **kwargs)
        if fmt == "text":  # one document per separator-delimited part, in the column the recipe names
            ds = ds.map(_split_documents, batched=True, fn_kwargs={"separator": separator})
            return ds.rename_column("text", text_field) if text_field != "text" else ds
    columns = ds.column_names
    if columns is None:  # a stream whose schema is known only once read: look at its first row
        columns = list(next(iter(ds), {}))
    if text_field not in columns:
        raise DataError(
            f"{source}: no column {text_field!r} (columns: {', '.join(columns)}); set data.text_field"
        )
    return ds


def load_documents(source: str, text_field: str = "text", separator: str = "<|endoftext|>") -> list[str]:
    """Documents of one source: a local .txt/.jsonl/.json/.parquet file, `hub:NAME` or `bundled:NAME`."""
    ds = _open(source, text_field, separator)
    docs = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"{source} holds no non-empty documents")
    return docs


def tokenize(docs: list[str], tokenizer: PreTrainedTokenizerBase, add_bos: bool = True) -> list[list[int]]:
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


def build_splits(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> Splits:
    """Training blocks and held-out documents as the recipe's data section says. When streaming, `train`
    holds only the first `PREVIEW_BLOCKS` blocks of the stream (for the layer ranking and a sample prompt);
    training batches come from `StreamedBlocks`."""
    heldout_docs = [d for src in cfg.heldout for d in load_documents(src, cfg.text_field, cfg.doc_separator)]
    if cfg.streaming:
        first = StreamedBlocks(cfg, tokenizer, PREVIEW_BLOCKS, rank=0, num_processes=1).batch(0)
        return Splits(train=first, heldout=tokenize(heldout_docs, tokenizer, cfg.add_bos), streaming=True)
    docs = [d for src in cfg.train for d in load_documents(src, cfg.text_field, cfg.doc_separator)]
    if cfg.heldout:
        heldout = heldout_docs
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


class IndexedBlocks:
    """Batches of in-memory blocks: epochs are seeded permutations, the batch of a step is a pure function
    of (seed, step), each process takes its slice of the global batch. Nothing to save for a resume."""

    def __init__(self, blocks: torch.Tensor, seed: int, per_process: int, rank: int, num_processes: int):
        self.blocks, self.seed = blocks, seed
        self.per_process, self.rank, self.num_processes = per_process, rank, num_processes
        self.last: list[int] = []

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1]

    def batch(self, index: int) -> torch.Tensor:
        """This process's blocks of global batch number `index` (optimizer step × grad_accum + micro)."""
        idx = batch_indices(len(self.blocks), self.per_process * self.num_processes, index, self.seed)
        mine = idx[self.rank * self.per_process : (self.rank + 1) * self.per_process]
        self.last = mine.tolist()
        return self.blocks[mine]

    def describe(self) -> str:
        return f"training blocks {self.last}"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class StreamedBlocks:
    """Batches read in order from a `datasets` stream of the training sources: tokenised and packed into
    blocks on the fly (documents joined with BOS as in memory; each map batch of `MAP_BATCH` documents
    drops its last partial block), split over processes with `split_dataset_by_node`, restarted for a new
    epoch when it ends. `state_dict` is the stream's position, saved with every checkpoint."""

    MAP_BATCH = 1000

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: PreTrainedTokenizerBase,
        per_process: int,
        rank: int,
        num_processes: int,
    ):
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.cfg, self.per_process = cfg, per_process
        parts = [_open(src, cfg.text_field, cfg.doc_separator, streaming=True) for src in cfg.train]
        parts = [ds.select_columns([cfg.text_field]) for ds in parts]
        stream = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

        def tokenize_and_pack(batch: dict) -> dict:
            docs = [t for t in batch[cfg.text_field] if isinstance(t, str) and t.strip()]
            return {"input_ids": pack(tokenize(docs, tokenizer, cfg.add_bos), cfg.seq_len)}

        stream = stream.map(
            tokenize_and_pack, batched=True, batch_size=self.MAP_BATCH, remove_columns=[cfg.text_field]
        )
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=num_processes)
        self.epoch, self.position, self._rows = 0, 0, None

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def batch(self, index: int) -> torch.Tensor:
        """The next `per_process` blocks of this process's share of the stream (`index` is not needed:
        the stream is read in order, and a resumed one continues where its checkpoint left it)."""
        rows, empty_epochs = [], 0
        while len(rows) < self.per_process:
            if self._rows is None:
                self.stream.set_epoch(self.epoch)
                self._rows = iter(self.stream)
            try:
                rows.append(next(self._rows)["input_ids"])
                self.position += 1
                empty_epochs = 0
            except StopIteration:
                if self.position == 0 or empty_epochs:
                    raise DataError(
                        f"the training stream {self.cfg.train} yields no block of data.seq_len={self.seq_len} "
                        "tokens for this process"
                    ) from None
                self.epoch, self._rows, empty_epochs = self.epoch + 1, None, 1
        return torch.tensor(rows, dtype=torch.long)

    def describe(self) -> str:
        return f"stream epoch {self.epoch}, blocks up to #{self.position} of this process"

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.stream.load_state_dict(state["stream"])
        self._rows = None
