"""Cloze: LAMBADA-style last-word prediction on passages cut from local text.

A passage is a document's text up to the last word of one of its sentences (more than `MIN_WORDS`,
at most `MAX_WORDS` words); the target is that word (letters only, its punctuation dropped). A passage is right
when every token of " word" is the argmax prediction given the context and the word's earlier tokens
(= greedy decoding writes the word). The same passages, as {"text": passage}, are the JSONL of the
shipped lm-eval task `linearize_cloze` (`tasks/linearize_cloze`), scored there by lm-eval's `acc`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from linearize.data import load_documents
from linearize.evals import EvalError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from linearize.evals.context import EvalContext, Scorer

MIN_WORDS = 20
MAX_WORDS = 120  # longer passages keep their last MAX_WORDS words (LAMBADA passages are ~80 words)
_SENTENCE_END = re.compile(r"(?<= )([A-Za-z]+)[.!?]")


def passages(texts: list[str], count: int, seed: int) -> list[str]:
    """`count` passages (or all there are) sampled with `seed`; each ends with its target word."""
    found = []
    for text in texts:
        text = re.sub(r"[ \t]+", " ", text.strip())
        for m in _SENTENCE_END.finditer(text):
            passage = text[: m.end(1)]
            words = passage.split(" ")
            if len(words) > MIN_WORDS:
                found.append(" ".join(words[-MAX_WORDS:]))
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed)).tolist()
    return [found[i] for i in order[:count]]


def split_passage(passage: str) -> tuple[str, str]:
    """(context, target word) exactly as the lm-eval task splits it (on the last space)."""
    context, _, word = passage.rpartition(" ")
    return context, word


def encode(
    tokenizer: PreTrainedTokenizerBase, passage: str, bos: list[int], max_len: int
) -> tuple[list[int], int] | None:
    """(ids, first target position) with the context cut from the left to fit `max_len`, or None when
    the tokenizer merges the word with its context (no clean boundary)."""
    context, word = split_passage(passage)
    ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + " " + word, add_special_tokens=False)["input_ids"]
    if full[: len(ctx_ids)] != ctx_ids:
        return None
    target = full[len(ctx_ids) :]
    keep = max_len - len(bos) - len(target)
    ids = bos + ctx_ids[-keep:] + target
    return ids, len(ids) - len(target)


def cloze_texts(ctx: EvalContext) -> list[str]:
    docs = load_documents(ctx.settings.cloze_data)
    return docs[-ctx.settings.cloze_docs :]


@torch.no_grad()
def cloze_scores(ctx: EvalContext, scorers: list[Scorer], items: list[tuple[list[int], int]]) -> dict:
    out = {}
    for scorer in scorers:
        right, nll, words, tokens = 0, 0.0, 0, 0
        for i in range(0, len(items), ctx.settings.batch_size):
            chunk = items[i : i + ctx.settings.batch_size]
            width = max(len(ids) for ids, _ in chunk)
            # right padding needs no mask: a causal model's logits at real positions never see it
            ids = torch.tensor([p + [0] * (width - len(p)) for p, _ in chunk])
            logp = torch.log_softmax(scorer.logits(ids), -1).cpu()
            for row, (p, start) in enumerate(chunk):
                target = ids[row, start : len(p)]
                pred = logp[row, start - 1 : len(p) - 1]
                right += bool(torch.equal(pred.argmax(-1), target))
                nll -= pred.gather(1, target[:, None]).sum().item()
                words += 1
                tokens += len(target)
        # per token of the final words: a word's own perplexity (exp of its whole NLL) multiplies its
        # tokens' and reads as nonsense (398,195 for the bundled teacher's 2-3-token words)
        out[scorer.name] = {
            "accuracy": right / words,
            "token_ppl": math.exp(nll / tokens),
            "word_nll": nll / words,
            "passages": words,
            "tokens": tokens,
        }
    return out


def cloze_items(ctx: EvalContext) -> tuple[list[tuple[list[int], int]], dict]:
    s = ctx.settings
    texts = passages(cloze_texts(ctx), s.cloze_passages, s.seed)
    items = [e for e in (encode(ctx.tokenizer, p, ctx.bos, ctx.context_length) for p in texts) if e]
    meta = {
        "source": f"last {s.cloze_docs} documents of {s.cloze_data}",
        "passages": len(items),
        "skipped_no_token_boundary": len(texts) - len(items),
        "bos": "prepended" if ctx.bos else "none",
        "scoring": "greedy: every token of the final word is the argmax prediction",
    }
    return items, meta


def cloze_task(ctx: EvalContext) -> dict:
    """Last-word accuracy and the perplexity per token of the last words, teacher and student, same passages."""
    items, meta = cloze_items(ctx)
    if not items:
        raise EvalError(
            f"cloze: none of the {ctx.settings.cloze_passages} passages from {meta['source']} ends in a word the "
            "tokenizer splits at a token boundary; give other cloze_data"
        )
    return {"meta": meta, **cloze_scores(ctx, ctx.scorers, items)}


def write_jsonl(path: Path, texts: list[str]) -> None:
    """The lm-eval task's data: one {"text": passage} per line."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
