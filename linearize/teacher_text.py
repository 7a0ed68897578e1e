"""Teacher-written text: the teacher samples its own documents once, to disk, for every recipe on it.

`data.train: [teacher:1M]` asks for about a million tokens of text written by the teacher, as
`data.sampling` says: each sample starts from the opening words of a local document (TinyStories by
default), wrapped in an instruction and the teacher's chat template when it has one, and continued by the
teacher with temperature / top-p sampling. Distilling on the teacher's own distribution instead of a few
hundred stories read 80 times measures conversion rather than memorisation, and is what the strongest
recent conversions report helps generation quality.

The text lives in one folder per (teacher, sampling settings, split) under `data.sampling.cache_dir`, as
`part-NNNNN.jsonl` files ({"text": ...} per line, one file per batch) and a `manifest.json` listing them with
their token counts. Every recipe with the same teacher and sampling settings reads the same folder: a request
for more tokens extends it, one for fewer reads the first parts. A killed generation resumes at its next
part with the same text it would have written (each batch has its own seed). Held-out text
(`data.heldout: [teacher:...]`) comes from the last `heldout_prompts` openings, which never seed training
text.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from linearize.config import DataConfig, SamplingConfig, teacher_text_tokens
from linearize.data import DataError, load_documents

SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"


def teacher_fingerprint(teacher_path: str) -> str:
    """What identifies a teacher: for a folder, its config.json and the names and sizes of its weight files;
    otherwise (a Hub id, `bundled:NAME`) the name itself."""
    folder = Path(teacher_path).expanduser()
    if not (folder / "config.json").is_file():
        return teacher_path
    weights = sorted(
        f"{p.name}:{p.stat().st_size}" for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")
    )
    return json.dumps([(folder / "config.json").read_text(), weights])


def text_folder(cfg: SamplingConfig, teacher_path: str, split: str) -> Path:
    """The folder of one (teacher, sampling settings, split), named by a hash of what decides the text's
    distribution. Not in it: `batch_size` and `cache_dir`, and the dtype the teacher is loaded in (a bf16 and
    an fp32 teacher write the same kind of text, and no two machines sample the same tokens anyway; the
    manifest records each part's dtype), so every recipe and machine on one teacher reads one folder."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("batch_size", "cache_dir")}
    key = json.dumps([teacher_fingerprint(teacher_path), settings, split], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(teacher_path.rstrip("/")).name) or "teacher"
    return Path(cfg.cache_dir).expanduser() / f"{name}-{split}-{digest}"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"parts": []}


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def openings(cfg: SamplingConfig, split: str) -> list[str]:
    """The first `prompt_words` words of each prompt document, the last `heldout_prompts` of them reserved for
    held-out text; in a fixed shuffled order (seeded by `cfg.seed`)."""
    docs = [d for src in cfg.prompts for d in load_documents(src)]
    words = [" ".join(d.split()[: cfg.prompt_words]) for d in docs]
    words = [w for w in words if w]
    if len(words) <= cfg.heldout_prompts:
        raise DataError(
            f"data.sampling.prompts hold {len(words)} documents, not more than data.sampling.heldout_prompts="
            f"{cfg.heldout_prompts}: give more prompt documents or hold out fewer"
        )
    chosen = words[-cfg.heldout_prompts :] if split == "heldout" else words[: -cfg.heldout_prompts]
    random.Random(cfg.seed).shuffle(chosen)
    return chosen


def uses_chat(cfg: SamplingConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.chat == "always" and not has_template:
        raise DataError("data.sampling.chat=always, but the teacher's tokenizer has no chat template")
    return cfg.chat == "always" or (cfg.chat == "auto" and has_template)


def render(
    cfg: SamplingConfig, tokenizer: PreTrainedTokenizerBase, opening: str, index: int, chat: bool
) -> str:
    """Sample `index`'s prompt: an instruction in the chat template, or the opening alone."""
    if not chat:
        return opening
    instruction = cfg.instructions[index % len(cfg.instructions)].format(opening=opening)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def nucleus_sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator, k: int = 256
) -> torch.Tensor:
    """One token per row of `logits` [B, V], sampled at `temperature` from the top-p nucleus (the tokens
    transformers' `TopPLogitsWarper` keeps). The nucleus is looked for among the `k` likeliest tokens, and only
    a row whose nucleus is wider is sorted whole: on a CPU, transformers' full-vocabulary sort and multinomial
    cost as much as the forward itself ([96, 49152]: 0.18 s and 0.13 s; the top 256: 0.01 s)."""
    probs = (logits.float() / temperature).softmax(-1)
    k = min(k, probs.shape[-1]) if top_p < 1 else probs.shape[-1]
    top, index = probs.topk(k, dim=-1)
    # a token stays when the tokens likelier than it hold less than top_p (the likeliest always stays)
    keep = (top.cumsum(-1) - top) < top_p
    wide = keep[:, -1] & (k < probs.shape[-1])
    if wide.any():
        top_w, index_w = probs[wide].sort(dim=-1, descending=True)
        keep_w = (top_w.cumsum(-1) - top_w) < top_p
        choice = torch.multinomial(top_w * keep_w, 1, generator=generator)
        picked_wide = index_w.gather(1, choice)
    choice = torch.multinomial(top * keep, 1, generator=generator)
    picked = index.gather(1, choice)
    if wide.any():
        picked[wide] = picked_wide
    return picked[:, 0]


@torch.no_grad()
def sample_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SamplingConfig,
    prompts: list[str],
    seed: int,
    bos: bool,
) -> list[tuple[str, int]]:
    """(prompt + continuation text, tokens) per prompt; a continuation ends after its first end token.
    `bos`: the prompts are read after the tokenizer's BOS (as the data pipeline reads documents).

    A plain decode loop on transformers' cache rather than `generate()`, for `nucleus_sample`; left padding is
    masked out and the positions count real tokens only, so a padded row reads as it would alone."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if bos and tokenizer.bos_token_id is not None:
        ids = [[tokenizer.bos_token_id, *x] for x in ids]
    width = max(len(x) for x in ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    done = torch.zeros(len(ids), dtype=torch.bool, device=device)
    new = []
    for _ in range(cfg.max_new_tokens):
        token = nucleus_sample(logits, cfg.temperature, cfg.top_p, generator).masked_fill(done, pad)
        new.append(token)
        if eos is not None:
            done |= token == eos
        if bool(done.all()) or len(new) == cfg.max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).logits[:, -1]
    results = []
    skip = 1 if bos and tokenizer.bos_token_id is not None else 0
    for prompt_ids, row in zip(ids, torch.stack(new, dim=1).tolist()):
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        # decoded with the prompt (the first continuation token's leading space survives), without the BOS
        text = tokenizer.decode(prompt_ids[skip:] + row, skip_special_tokens=False)
        results.append((text, len(prompt_ids) + len(row)))
    return results


@contextmanager
def exclusive(lock: Path, log: Callable[[str], None]) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (one writer per text folder: a second `convert` or `generate` on the
    same teacher waits, then reads what the first wrote)."""
    with lock.open("w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[teacher text] {lock.parent} is being written by another process; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_parts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SamplingConfig,
    folder: Path,
    manifest: dict,
    dtype: str,
    tokens: int,
    log: Callable[[str], None],
) -> None:
    """Append part files to `folder` (and `manifest`) until it holds `tokens` tokens."""
    split = manifest["settings"]["split"]
    have = sum(p["tokens"] for p in manifest["parts"])
    if have >= tokens:
        return
    pool = openings(cfg, split)
    chat = uses_chat(cfg, tokenizer)
    log(f"[teacher text] {split}: {have:,} of {tokens:,} tokens in {folder}; generating the rest")
    began, written = time.perf_counter(), 0
    model.eval()
    while have < tokens:
        index = len(manifest["parts"])
        first = sum(p["samples"] for p in manifest["parts"])
        prompts = [
            render(cfg, tokenizer, pool[(first + i) % len(pool)], first + i, chat)
            for i in range(cfg.batch_size)
        ]
        # a part's seed depends on its index only: resumed with the same batch size, a run writes what an
        # unbroken one would
        samples = sample_batch(model, tokenizer, cfg, prompts, cfg.seed * 1_000_003 + index, bos=not chat)
        name = f"part-{index:05d}.jsonl"
        write_atomically(folder / name, "".join(json.dumps({"text": t}) + "\n" for t, _ in samples))
        count = sum(n for _, n in samples)
        manifest["parts"].append({"file": name, "samples": len(samples), "tokens": count, "dtype": dtype})
        write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))
        have += count
        written += count
        rate = written / (time.perf_counter() - began)
        log(f"[teacher text] {split}: {have:,} / {tokens:,} tokens ({rate:,.0f} tokens/s)")


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: SamplingConfig,
    teacher_path: str,
    dtype: str,
    split: str,
    tokens: int,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """At least `tokens` tokens of teacher-written text for `split`; returns the part files that hold them
    (the first parts of the folder, generating the missing ones)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    folder = text_folder(cfg, teacher_path, split)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if sum(p["tokens"] for p in manifest["parts"]) < tokens:
        with exclusive(folder / ".lock", log):
            # read again under the lock: another process may have written the text meanwhile
            manifest = read_manifest(folder)
            manifest["settings"] = {"teacher": teacher_path, "split": split, **asdict(cfg)}
            write_parts(model, tokenizer, cfg, folder, manifest, dtype, tokens, log)
    parts, total = [], 0
    for part in manifest["parts"]:
        if total >= tokens:
            break
        parts.append(folder / part["file"])
        total += part["tokens"]
    return parts


def needs_teacher_text(cfg: DataConfig) -> bool:
    return any(teacher_text_tokens(s) for s in [*cfg.train, *cfg.heldout])


def pending(cfg: DataConfig, teacher_path: str, dtype: str) -> list[str]:
    """The `teacher:` sources of `cfg` not yet on disk in full."""
    missing = []
    for split, sources in (("train", cfg.train), ("heldout", cfg.heldout)):
        for source in sources:
            tokens = teacher_text_tokens(source)
            folder = text_folder(cfg.sampling, teacher_path, split)
            if tokens and sum(p["tokens"] for p in read_manifest(folder)["parts"]) < tokens:
                missing.append(source)
    return missing


def resolve(
    cfg: DataConfig,
    teacher_path: str,
    dtype: str,
    model: nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    log: Callable[[str], None] = print,
) -> DataConfig:
    """`cfg` with every `teacher:<tokens>` source replaced by the part files holding that text, generated
    first where missing (with `model`, the teacher loaded in `dtype`; None: refuse, naming `linearize
    generate`)."""
    if not needs_teacher_text(cfg):
        return cfg
    missing = pending(cfg, teacher_path, dtype)
    if missing and model is None:
        raise DataError(
            f"the teacher-written text {', '.join(missing)} is not generated yet and cannot be written here "
            "(several processes); write it first with `linearize generate` and the same recipe"
        )

    def files(split: str, sources: list[str]) -> list[str]:
        out = []
        for source in sources:
            tokens = teacher_text_tokens(source)
            if tokens is None:
                out.append(source)
            else:
                parts = generate(model, tokenizer, cfg.sampling, teacher_path, dtype, split, tokens, log)
                out += [str(p) for p in parts]
        return out

    return DataConfig(
        **{**vars(cfg), "train": files("train", cfg.train), "heldout": files("heldout", cfg.heldout)}
    )
