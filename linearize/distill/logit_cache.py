"""An on-disk cache of a teacher's top-k logits, so stage 2 can distil without the teacher in memory.

Layout of a cache folder:

    manifest.json                 k, vocab size, seq_len, teacher identity, shards and their token hashes
    shard-00000.safetensors       blocks [0, shard_blocks)
    shard-00001.safetensors       ...

A shard holds, for its blocks `n` of `seq_len` tokens:

    logprobs   [n, seq_len, k]  float16   teacher log-probs log_softmax(z) of the top-k tokens, descending
    indices    [n, seq_len, k]  int16 when vocab <= 32768, else int32
    lse        [n, seq_len]     float32   logsumexp(z) over the full vocabulary
    block_hash [n]              int64     hash of each block's token ids

Log-probs rather than raw logits are stored: they differ by the per-position constant `lse` (stored
exactly, so the raw logits are `logprobs + lse`), but sit in [-30, 0] where float16 is finest (error
<= 2.5e-4 on a log-prob in [-1, 0]) instead of at |z| ~ 10-30 (error up to 8e-3). float16 rather than
bfloat16: the range of bfloat16 is not needed and its 8-bit significand is 8x coarser.

The manifest, with the hash of every shard's token ids, is written before any shard, and every file is
written to a temp name and renamed: a shard file that exists is complete. A rerun checks that the request
matches the manifest, skips existing shards (after checking their token hashes and re-running the teacher
on one stored block) and writes the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from linearize.errors import LinearizeError

MANIFEST = "manifest.json"
FORMAT = "linearize-logit-cache/1"
TMP_PREFIX = ".tmp-"
# Config keys that name where or how the teacher was loaded, not what it computes.
# use_cache changes no logit: the student in teacher mode (FSDP2's cache writer) runs without a cache
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache")
PROBE_TOL = 0.05
"""Largest mean |log-prob difference| (teacher-probability weighted, nats) between a stored block and
the teacher re-run on it for the teacher to count as the one the cache was built from."""


class LogitCacheError(LinearizeError, ValueError):
    """A cache that does not match the request or the data: the message names the mismatch and the fix."""


@dataclass
class TopkLogits:
    """A teacher's top-k logits for a batch of blocks, ready for `kl_from_topk`."""

    values: torch.Tensor
    """[batch, seq_len, k] float32 raw logits of the top-k tokens, descending."""
    indices: torch.Tensor
    """[batch, seq_len, k] int64 token ids of the top-k tokens."""
    lse: torch.Tensor
    """[batch, seq_len] float32 logsumexp of the full logits."""

    def to(self, device: torch.device | str) -> TopkLogits:
        return TopkLogits(self.values.to(device), self.indices.to(device), self.lse.to(device))


def block_hash(tokens: torch.Tensor) -> int:
    """64-bit BLAKE2b hash of one block's token ids (taken as little-endian int64), as a signed int."""
    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _shard_hash(hashes: list[int]) -> str:
    return hashlib.sha256(b"".join(h.to_bytes(8, "little", signed=True) for h in hashes)).hexdigest()[:32]


def teacher_identity(teacher: torch.nn.Module, name: str | None = None) -> dict:
    """Name (informative) and hash of the teacher's config (checked); see `PROBE_TOL` for the weights."""
    config = {k: v for k, v in teacher.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "name": name if name is not None else teacher.config._name_or_path,
        "config_hash": config_hash,
        "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
    }


def _index_dtype(vocab_size: int) -> torch.dtype:
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def _shard_file(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _replace_atomic(tmp: Path, target: Path) -> None:
    """fsync `tmp`, then rename it over `target` (readers see the old file or the whole new one)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(TMP_PREFIX + path.name)
    tmp.write_text(json.dumps(obj, indent=1))
    _replace_atomic(tmp, path)


def _plan(hashes: list[int], seq_len: int, k: int, vocab_size: int, shard_blocks: int, teacher: dict) -> dict:
    """The manifest a complete cache of the blocks with these `block_hash`es has."""
    shards = []
    for i, start in enumerate(range(0, len(hashes), shard_blocks)):
        stop = min(start + shard_blocks, len(hashes))
        tokens_hash = _shard_hash(hashes[start:stop])
        shards.append({"file": _shard_file(i), "start": start, "stop": stop, "tokens_hash": tokens_hash})
    return {
        "format": FORMAT,
        "k": k,
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "num_blocks": len(hashes),
        "shard_blocks": shard_blocks,
        "temperature": 1.0,
        "index_dtype": str(_index_dtype(vocab_size)).removeprefix("torch."),
        "teacher": teacher,
        "shards": shards,
    }


def _check_matches(folder: Path, stored: dict, wanted: dict) -> None:
    fix = f"delete {folder} to rebuild the cache, or choose another folder"
    for key in ("format", "k", "vocab_size", "seq_len", "num_blocks", "shard_blocks"):
        if stored.get(key) != wanted[key]:
            raise LogitCacheError(
                f"logit cache {folder} does not match this request: {key} is {stored.get(key)!r} in the "
                f"cache, {wanted[key]!r} requested; {fix}"
            )
    if stored["teacher"]["config_hash"] != wanted["teacher"]["config_hash"]:
        raise LogitCacheError(
            f"logit cache {folder} was built from another teacher ({stored['teacher']['name']!r}, config "
            f"hash {stored['teacher']['config_hash']}), not {wanted['teacher']['name']!r} (config hash "
            f"{wanted['teacher']['config_hash']}); {fix}"
        )
    for old, new in zip(stored["shards"], wanted["shards"]):
        if old != new:
            raise LogitCacheError(
                f"logit cache {folder}: blocks {new['start']}..{new['stop'] - 1} ({new['file']}) hold other "
                f"token ids than the cache was built from (the data or its order changed); {fix}"
            )


@torch.no_grad()
def _teacher_topk(
    teacher: torch.nn.Module, blocks: torch.Tensor, k: int, batch_size: int, vocab_size: int
) -> dict:
    device = next(teacher.parameters()).device
    out = {"logprobs": [], "indices": [], "lse": []}
    for start in range(0, len(blocks), batch_size):
        logits = teacher(input_ids=blocks[start : start + batch_size].to(device), use_cache=False).logits
        if logits.shape[-1] != vocab_size:  # a padded head would overflow int16 indices unnoticed
            raise ValueError(
                f"the teacher gives {logits.shape[-1]} logits per token but config.vocab_size={vocab_size}"
            )
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        top = logits.topk(k, dim=-1)
        out["logprobs"].append((top.values - lse.unsqueeze(-1)).half().cpu())
        out["indices"].append(top.indices.to(_index_dtype(vocab_size)).cpu())
        out["lse"].append(lse.cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def _probe_teacher(folder: Path, shard: dict, teacher: torch.nn.Module, block: torch.Tensor) -> None:
    """Re-run the teacher on the first block of an existing shard: other weights under the same config
    (a fine-tune, another seed) give other log-probs."""
    with safe_open(folder / shard["file"], framework="pt") as f:
        stored_logp = f.get_slice("logprobs")[0:1].float()
        indices = f.get_slice("indices")[0:1].long()
    with torch.no_grad():
        logits = teacher(input_ids=block[None].to(next(teacher.parameters()).device), use_cache=False).logits
        fresh_logp = F.log_softmax(logits.float(), dim=-1).cpu().gather(-1, indices)
    p = stored_logp.exp()
    diff = torch.where(p > 0, (fresh_logp - stored_logp).abs(), 0.0)
    gap = ((p * diff).sum(-1) / p.sum(-1)).mean().item()
    if not gap <= PROBE_TOL:
        raise LogitCacheError(
            f"logit cache {folder}: the teacher's log-probs on block {shard['start']} differ from the stored "
            f"ones by {gap:.3g} nats on average (tolerance {PROBE_TOL}): the cache was built from other "
            f"weights with the same config; delete {folder} to rebuild the cache, or choose another folder"
        )


def write_logit_cache(
    teacher: torch.nn.Module,
    blocks: torch.Tensor,
    folder: str | Path,
    *,
    k: int,
    shard_blocks: int = 64,
    batch_size: int = 4,
    teacher_name: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    max_over_processes: Callable[[int], int] | None = None,
) -> LogitCache:
    """Write (or finish writing) the cache of `teacher`'s top-k logits on `blocks` [num_blocks, seq_len].

    Resumable: existing shards are checked and kept, missing ones written. A folder holding a cache of
    other blocks, another k or another teacher is a `LogitCacheError`. `teacher_name` (default: the
    config's `_name_or_path`) is recorded for messages only; the config hash and a re-run of the teacher
    on one stored block decide whether the teacher matches.

    On several processes every one calls it with its `rank`, the `world_size` and a `barrier`: rank 0
    writes (or checks) the manifest, then each process writes shards rank, rank + world_size, ... with its
    own teacher, so the cache takes 1/world_size of the time and no process waits long at a barrier. The
    files are the ones a single process writes. A teacher sharded over the processes (FSDP2) has a collective
    forward: `max_over_processes(n)` (the largest `n` of any process) then makes every process run as many
    forwards as the busiest, the extra ones on two tokens.
    """
    if teacher.training:
        raise ValueError("the teacher is in training mode (dropout would randomise the cache): call .eval()")
    if blocks.ndim != 2 or blocks.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"blocks must be [num_blocks, seq_len] integer token ids, "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )
    vocab_size = teacher.config.vocab_size
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, vocab size {vocab_size}], got {k}")
    if shard_blocks < 1 or batch_size < 1:
        raise ValueError(f"shard_blocks and batch_size must be >= 1, got {shard_blocks} and {batch_size}")
    folder = Path(folder)
    hashes = [block_hash(b) for b in blocks]
    wanted = _plan(
        hashes, blocks.shape[1], k, vocab_size, shard_blocks, teacher_identity(teacher, teacher_name)
    )
    manifest_path = folder / MANIFEST
    if rank == 0 and not manifest_path.is_file():
        if folder.is_dir() and any(not p.name.startswith(TMP_PREFIX) for p in folder.iterdir()):
            raise LogitCacheError(
                f"{folder} is not empty and holds no logit cache ({MANIFEST}); choose another folder"
            )
        folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(manifest_path, wanted)
    barrier()  # from here on every process sees the manifest
    _check_matches(folder, json.loads(manifest_path.read_text()), wanted)

    mine = wanted["shards"][rank::world_size]
    existing = [s for s in mine if (folder / s["file"]).is_file()]
    for shard in existing:
        with safe_open(folder / shard["file"], framework="pt") as f:
            stored = f.get_tensor("block_hash").tolist()
        if stored != hashes[shard["start"] : shard["stop"]]:
            raise LogitCacheError(
                f"logit cache {folder}: {shard['file']} holds other blocks than its manifest entry (a file "
                f"copied from another cache?); delete {folder} to rebuild the cache, or choose another folder"
            )
    todo = [s for s in mine if not (folder / s["file"]).is_file()]
    if max_over_processes is not None:
        # agreed on before any forward: a collective between two of them would meet another process's forward
        forwards = bool(existing) + sum(-(-(s["stop"] - s["start"]) // batch_size) for s in todo)
        idle = max_over_processes(forwards) - forwards
        with torch.no_grad():
            for _ in range(idle):  # the others' forwards meet these
                teacher(input_ids=blocks[:1, :2].to(next(teacher.parameters()).device), use_cache=False)
    if existing:
        _probe_teacher(folder, existing[0], teacher, blocks[existing[0]["start"]])

    for shard in todo:
        target = folder / shard["file"]
        part = blocks[shard["start"] : shard["stop"]]
        tensors = _teacher_topk(teacher, part, k, batch_size, vocab_size)
        tensors["block_hash"] = torch.tensor(hashes[shard["start"] : shard["stop"]], dtype=torch.int64)
        tmp = target.with_name(TMP_PREFIX + target.name)
        # one metadata key: safetensors writes a metadata dict in hash order, so more would break
        # byte-identical reruns
        save_file(tensors, tmp, metadata={"format": FORMAT})
        _replace_atomic(tmp, target)
    barrier()  # every shard is written
    if rank == 0:
        for leftover in folder.glob(TMP_PREFIX + "*"):
            leftover.unlink()
    return LogitCache(folder)


class LogitCache:
    """Reader of a complete cache folder written by `write_logit_cache`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise LogitCacheError(f"{self.folder} holds no logit cache ({MANIFEST} is missing)")
        self.manifest = json.loads(path.read_text())
        self._by_hash: dict[int, int] | None = None
        if self.manifest.get("format") != FORMAT:
            raise LogitCacheError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        missing = [s["file"] for s in self.manifest["shards"] if not (self.folder / s["file"]).is_file()]
        if missing:
            raise LogitCacheError(
                f"logit cache {self.folder} is incomplete ({len(missing)} of {len(self.manifest['shards'])} "
                f"shards missing, first {missing[0]}): rerun write_logit_cache with the same arguments"
            )

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    @property
    def num_blocks(self) -> int:
        return self.manifest["num_blocks"]

    def lookup(self, input_ids: torch.Tensor) -> TopkLogits:
        """Top-k logits of the blocks whose token ids are `input_ids` [batch, seq_len], found by their hash
        (a training step knows its tokens, not their block numbers); a block the cache lacks is an error."""
        if self._by_hash is None:
            self._by_hash = {}
            for shard in self.manifest["shards"]:
                with safe_open(self.folder / shard["file"], framework="pt") as f:
                    for i, h in enumerate(f.get_tensor("block_hash").tolist()):
                        self._by_hash.setdefault(h, shard["start"] + i)
        ids = []
        for row in input_ids:
            found = self._by_hash.get(block_hash(row))
            if found is None:
                raise LogitCacheError(
                    f"logit cache {self.folder} holds no block with these token ids (the data changed since it "
                    f"was written); delete {self.folder} to rebuild it"
                )
            ids.append(found)
        return self.fetch(ids, input_ids.cpu())

    def fetch(self, block_ids: Sequence[int] | torch.Tensor, input_ids: torch.Tensor) -> TopkLogits:
        """Top-k logits of blocks `block_ids` (indices into the blocks the cache was written from), whose
        token ids `input_ids` [len(block_ids), seq_len] must be those the cache was built from."""
        block_ids = [int(b) for b in block_ids]
        if input_ids.shape != (len(block_ids), self.seq_len):
            raise ValueError(
                f"input_ids must be [{len(block_ids)}, {self.seq_len}] (one block per id), "
                f"got {tuple(input_ids.shape)}"
            )
        per_shard = self.manifest["shard_blocks"]
        values, indices, lse = [], [], []
        for row, block in enumerate(block_ids):
            if not 0 <= block < self.num_blocks:
                raise IndexError(f"block {block} is out of range: the cache holds {self.num_blocks} blocks")
            shard = self.manifest["shards"][block // per_shard]
            i = block - shard["start"]
            with safe_open(self.folder / shard["file"], framework="pt") as f:
                if f.get_slice("block_hash")[i : i + 1].item() != block_hash(input_ids[row]):
                    raise LogitCacheError(
                        f"block {block}: its token ids differ from those the logit cache {self.folder} was "
                        f"built from (data or block order changed since); rebuild the cache for this data"
                    )
                shard_lse = f.get_slice("lse")[i : i + 1]
                values.append(f.get_slice("logprobs")[i : i + 1].float() + shard_lse.unsqueeze(-1))
                indices.append(f.get_slice("indices")[i : i + 1].long())
                lse.append(shard_lse)
        return TopkLogits(torch.cat(values), torch.cat(indices), torch.cat(lse))


def kl_from_topk(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    teacher_lse: torch.Tensor,
    temperature: float = 1.0,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """KL(teacher || student) per token from a teacher's top-k logits, averaged over tokens (or per token
    with reduction="none"); computed in float32.

    student_logits [..., vocab]; topk_values, topk_indices [..., k] (teacher raw logits and token ids);
    teacher_lse [...] (logsumexp of the teacher's full logits).

    Both distributions are coarsened to k + 1 outcomes: the k teacher top-k tokens, and one "tail" bucket
    holding everything else (teacher: 1 - sum of its top-k probs, known exactly from the full lse; student:
    the logsumexp of its own logits outside those k tokens). The result is the exact KL of the coarsened
    distributions, which by the log-sum inequality is <= the full KL; the gap is
    tail_mass * KL(teacher's tail || student's tail), the mismatch *within* the tail, which the cache cannot
    see. With k == vocab there is no tail and this equals `losses.kl_teacher_student`.

    Only temperature 1 is supported: at T != 1 the teacher's normaliser logsumexp(z / T) depends on the
    tail logits, which the cache does not hold (a tail assumed uniform gives a bound, not an estimate).
    """
    if temperature != 1.0:
        raise ValueError(
            f"kl_from_topk supports temperature 1.0 only, got {temperature}: the teacher's normaliser at "
            f"another temperature needs its full logits; set stages.logits.temperature=1.0 or distil from "
            f"the live teacher"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    lead, vocab, k = student_logits.shape[:-1], student_logits.shape[-1], topk_indices.shape[-1]
    if (
        topk_values.shape != topk_indices.shape
        or topk_indices.shape[:-1] != lead
        or teacher_lse.shape != lead
    ):
        raise ValueError(
            f"expected student_logits [..., vocab], topk_values/topk_indices [..., k], teacher_lse [...] "
            f"with the same leading shape, got {tuple(student_logits.shape)}, {tuple(topk_values.shape)}, "
            f"{tuple(topk_indices.shape)}, {tuple(teacher_lse.shape)}"
        )
    if k > vocab:
        raise ValueError(f"k={k} teacher tokens but the student has a vocabulary of {vocab}")
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    idx = topk_indices.long()
    s_top = s_logp.gather(-1, idx)
    t_top = topk_values.float() - teacher_lse.float().unsqueeze(-1)
    t_p = t_top.exp()
    kl = torch.where(t_p > 0, t_p * (t_top - s_top), 0.0).sum(-1)
    if k < vocab:
        t_tail = (-torch.expm1(torch.logsumexp(t_top, dim=-1))).clamp_min(0.0)
        s_tail_logp = torch.logsumexp(s_logp.scatter(-1, idx, float("-inf")), dim=-1)
        kl = kl + torch.where(t_tail > 0, t_tail * (t_tail.log() - s_tail_logp), 0.0)
    return kl.mean() if reduction == "mean" else kl
