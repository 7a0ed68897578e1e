"""Perplexity: exp(mean next-token NLL) over every predicted token of held-out text.

Two ways to cut text into model inputs: `window` packs documents (BOS-separated) and cuts the stream
into fixed-length windows (what training saw); `document` scores each document alone, in windows when
longer. A window's first token is never predicted, so `tokens` counts (window length - 1) per window.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from linearize import teacher_text
from linearize.config import DataConfig, parse_pairs_into
from linearize.data import load_documents, pack, tokenize
from linearize.distributed import max_over_processes
from linearize.evals.context import STUDENT, TEACHER, WINDOW, window_scorer

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from linearize.evals.context import EvalContext, Scorer


def group_by_length(blocks: list[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of equal-length blocks (no padding needed)."""
    by_len: dict[int, list[list[int]]] = {}
    for b in blocks:
        by_len.setdefault(len(b), []).append(b)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            yield torch.tensor(group[i : i + batch_size])


def _batch_nll(logits_fn, ids: torch.Tensor) -> tuple[float, int]:
    logits = logits_fn(ids).float()
    target = ids[:, 1:].to(logits.device)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
    )
    return nll.item(), target.numel()


@torch.no_grad()
def block_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], blocks: list[list[int]], batch_size: int
) -> tuple[float, int]:
    """(summed next-token NLL, predicted tokens) of `blocks` under `logits_fn(ids) -> logits`."""
    total_nll, total_tokens = 0.0, 0
    for ids in group_by_length(blocks, batch_size):
        if ids.shape[1] < 2:
            continue
        nll, tokens = _batch_nll(logits_fn, ids)
        total_nll += nll
        total_tokens += tokens
    return total_nll, total_tokens


@torch.no_grad()
def split_block_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    blocks: list[list[int]],
    batch_size: int,
    device: torch.device,
) -> tuple[float, int]:
    """`block_nll` over every process of a sharded model, whose forward is collective: this process scores
    blocks rank, rank + world_size, ..., runs as many forwards as the process with the most (the extra ones on
    two tokens, unscored), and the sums are all-reduced."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    batches = [ids for ids in group_by_length(blocks[rank::world], batch_size) if ids.shape[1] >= 2]
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(max_over_processes(len(batches), device)):
        if i < len(batches):
            nll, tokens = _batch_nll(logits_fn, batches[i])
            sums += torch.tensor([nll, tokens], dtype=torch.float64, device=device)
        else:
            logits_fn(torch.tensor([blocks[0][:2]]))
    dist.all_reduce(sums)
    return sums[0].item(), int(sums[1].item())


def _summary(nll: float, tokens: int, blocks: int) -> dict:
    mean = nll / tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": tokens, "blocks": blocks}


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    docs: list[list[int]],
    seq_len: int,
    batch_size: int = 8,
    max_blocks: int = 0,
    split: bool = False,
    mask: Callable[[int, torch.device], torch.Tensor] | None = None,
) -> dict:
    """exp(mean next-token NLL) over `docs` packed into `seq_len` blocks (the last, shorter block too).

    Returns {"ppl", "nll", "tokens", "blocks"}; `tokens` counts predicted tokens (block length - 1 each).
    `split=True` (a model sharded over the processes, every process calling): each process scores its share
    of the blocks (see `split_block_nll`). `mask(seq_len, device)`: a [1, 1, T, T] boolean attention mask
    given to the model (e.g. `sliding_window_mask`, the zero-training baseline).
    """
    blocks = pack(docs, seq_len, keep_remainder=True)
    if max_blocks:
        blocks = blocks[:max_blocks]
    if not blocks:
        raise ValueError("no held-out tokens to evaluate: data.heldout / data.heldout_docs gave no documents")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def logits_fn(ids):
        ids = ids.to(device)
        extra = (
            {} if mask is None else {"attention_mask": mask(ids.shape[1], device).expand(len(ids), 1, -1, -1)}
        )
        return model(input_ids=ids, use_cache=False, **extra).logits

    if split:
        nll, tokens = split_block_nll(logits_fn, blocks, batch_size, device)
    else:
        nll, tokens = block_nll(logits_fn, blocks, batch_size)
    model.train(was_training)
    return _summary(nll, tokens, len(blocks))


def windows(docs: list[list[int]], seq_len: int, mode: str, max_blocks: int = 0) -> list[list[int]]:
    """Model inputs of `docs`: packed stream windows (`window`) or per-document windows (`document`)."""
    if mode == "window":
        blocks = pack(docs, seq_len, keep_remainder=True)
    else:
        blocks = [d[i : i + seq_len] for d in docs for i in range(0, len(d), seq_len)]
    blocks = [b for b in blocks if len(b) >= 2]
    return blocks[:max_blocks] if max_blocks else blocks


def heldout_texts(ctx: EvalContext) -> tuple[list[str], str]:
    """(documents, description) of the perplexity text the settings or the run's recipe name."""
    s = ctx.settings
    if s.ppl_data:
        return [d for src in s.ppl_data for d in load_documents(src)], ", ".join(s.ppl_data)
    recipe = ctx.recipe or {}
    data = parse_pairs_into(DataConfig, {}, base=recipe.get("data", {}), what="recipe.yaml data key")
    # teacher-written held-out text (teacher:<tokens>) is read from where the run found it; never generated here
    teacher, asked = recipe.get("teacher", {}), ", ".join(data.heldout)
    data = teacher_text.resolve(
        data, teacher.get("path", ""), teacher.get("dtype", "float32"), None, ctx.tokenizer
    )
    if data.heldout:
        docs = [d for src in data.heldout for d in load_documents(src, data.text_field, data.doc_separator)]
        return docs, asked
    sources = data.train if data.heldout_docs else ["bundled:tinystories_docs.txt"]
    n = data.heldout_docs or 49
    docs = [d for src in sources for d in load_documents(src, data.text_field, data.doc_separator)]
    return docs[-n:], f"last {n} documents of {', '.join(sources)} (held out of training)"


def scorer_perplexity(scorer: Scorer, blocks: list[list[int]], batch_size: int) -> dict:
    nll, tokens = block_nll(scorer.logits, blocks, batch_size)
    return _summary(nll, tokens, len(blocks))


def ppl_blocks(ctx: EvalContext) -> tuple[list[list[int]], dict]:
    """The perplexity windows and how they were made (for the report)."""
    s = ctx.settings
    texts, source = heldout_texts(ctx)
    seq_len = min(s.ppl_seq_len, ctx.context_length)
    blocks = windows(tokenize(texts, ctx.tokenizer, s.add_bos), seq_len, s.ppl_mode, s.ppl_max_blocks)
    meta = {
        "source": source,
        "documents": len(texts),
        "mode": s.ppl_mode,
        "seq_len": seq_len,
        "bos": "prepended to every document" if ctx.bos else "none",
        "counted": "every predicted token (a window's first token is context only)",
    }
    return blocks, meta


def ppl_task(ctx: EvalContext) -> dict:
    """Held-out perplexity of teacher and student on the same windows (and of the sliding-window teacher
    with `ppl_window`)."""
    blocks, meta = ppl_blocks(ctx)
    out = {"meta": meta}
    scorers = ctx.scorers + ([window_scorer(ctx)] if ctx.settings.ppl_window else [])
    for scorer in scorers:
        out[scorer.name] = scorer_perplexity(scorer, blocks, ctx.settings.batch_size)
    out["ratio"] = out[STUDENT]["ppl"] / out[TEACHER]["ppl"]
    if ctx.settings.ppl_window:
        out["ratio_to_window"] = out[STUDENT]["ppl"] / out[WINDOW]["ppl"]
    return out
