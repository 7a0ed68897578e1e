"""Recall: synthetic associative recall (MQAR) and passkey retrieval, generated from a seed.

MQAR is built from token ids directly, so it works for any vocabulary (512 tokens included):
`[BOS] k1 v1 ... kn vn  f f ... f  kq1 vq1 ... kqn vqn` — n key-value pairs, filler tokens up to the
sequence length, then every key once more in a shuffled order. Keys, values and filler come from three
disjoint thirds of the non-special vocabulary. A query is right when the argmax next-token prediction
at the queried key is its value. Accuracy is reported per (pairs, length) cell.

Passkey is built from tokenised text: an instruction, filler sentences with "The pass key is N.
Remember it. N is the pass key." inserted at a depth, then "What is the pass key? The pass key is"
and the number. A prompt is right when every token of the number is the argmax prediction given the
ones before (= greedy decoding reproduces the number). Accuracy per (depth, length) cell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transformers import PreTrainedTokenizerBase

    from linearize.evals.context import EvalContext, Scorer

INTRO = "There is an important number hidden inside a lot of irrelevant text. Find it and remember it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {n}. Remember it. {n} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def token_pools(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> tuple[list[int], list[int], list[int]]:
    """Key, value and filler ids: three disjoint thirds of the vocabulary without special tokens."""
    special = set(tokenizer.all_special_ids)
    usable = [i for i in range(vocab_size) if i not in special]
    third = len(usable) // 3
    return usable[:third], usable[third : 2 * third], usable[2 * third :]


def mqar_batch(
    pairs: int,
    length: int,
    samples: int,
    pools: tuple[list[int], list[int], list[int]],
    bos: list[int],
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [samples, length], query positions [samples, pairs], value ids [samples, pairs])."""
    keys_pool, values_pool, filler_pool = (torch.tensor(p) for p in pools)
    fill = length - len(bos) - 4 * pairs
    rows, positions, targets = [], [], []
    for _ in range(samples):
        keys = keys_pool[torch.randperm(len(keys_pool), generator=gen)[:pairs]]
        values = values_pool[torch.randint(len(values_pool), (pairs,), generator=gen)]
        filler = filler_pool[torch.randint(len(filler_pool), (fill,), generator=gen)]
        order = torch.randperm(pairs, generator=gen)
        context = torch.stack([keys, values], 1).flatten()
        queries = torch.stack([keys[order], values[order]], 1).flatten()
        rows.append(torch.cat([torch.tensor(bos, dtype=torch.long), context, filler, queries]))
        start = len(bos) + 2 * pairs + fill
        positions.append(start + 2 * torch.arange(pairs))
        targets.append(values[order])
    return torch.stack(rows), torch.stack(positions), torch.stack(targets)


def mqar(ctx: EvalContext, scorers: Sequence[Scorer]) -> dict:
    s = ctx.settings
    pools = token_pools(ctx.tokenizer, ctx.teacher.model.config.vocab_size)
    lengths = sorted({min(n, ctx.context_length) for n in s.mqar_lengths})
    out = {"pairs": s.mqar_pairs, "lengths": lengths, "samples": s.mqar_samples}
    cells = {}
    for pi, pairs in enumerate(s.mqar_pairs):
        for li, length in enumerate(lengths):
            if len(ctx.bos) + 4 * pairs > length or 2 * pairs > len(pools[0]):
                continue
            cells[(pairs, length)] = mqar_batch(
                pairs, length, s.mqar_samples, pools, ctx.bos, ctx.generator(1000 * pi + li)
            )
    for scorer in scorers:
        grid = [[None] * len(lengths) for _ in s.mqar_pairs]
        right = total = 0
        for (pairs, length), (ids, pos, values) in cells.items():
            correct = 0
            for i in range(0, len(ids), s.batch_size):
                pred = scorer.logits(ids[i : i + s.batch_size]).argmax(-1).cpu()
                correct += (
                    (pred.gather(1, pos[i : i + s.batch_size]) == values[i : i + s.batch_size]).sum().item()
                )
            grid[s.mqar_pairs.index(pairs)][lengths.index(length)] = correct / values.numel()
            right, total = right + correct, total + values.numel()
        out[scorer.name] = {"accuracy": grid, "mean": right / total if total else None}
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passkey_prompt(
    tokenizer: PreTrainedTokenizerBase, length: int, depth: float, number: str, bos: list[int]
) -> tuple[list[int], int] | None:
    """(ids, answer start) of one passkey prompt of exactly `length` tokens, or None if it cannot fit."""
    question = _ids(tokenizer, QUESTION)
    joint = _ids(tokenizer, QUESTION + " " + number)
    answer = joint[len(question) :] if joint[: len(question)] == question else _ids(tokenizer, " " + number)
    intro, key, sentence = (
        _ids(tokenizer, INTRO),
        _ids(tokenizer, KEY.format(n=number)),
        _ids(tokenizer, FILLER),
    )
    fill = length - len(bos) - len(intro) - len(key) - len(question) - len(answer)
    if fill < 0:
        return None
    filler = (sentence * (fill // len(sentence) + 1))[:fill]
    at = min(fill, round(depth * fill / len(sentence)) * len(sentence))  # at a sentence boundary
    ids = bos + intro + filler[:at] + key + filler[at:] + question + answer
    return ids, len(ids) - len(answer)


def passkey(ctx: EvalContext, scorers: Sequence[Scorer]) -> dict:
    s = ctx.settings
    lengths = sorted({min(n, ctx.context_length) for n in s.passkey_lengths})
    depths = s.passkey_depths
    cells = {}
    for di, depth in enumerate(depths):
        for li, length in enumerate(lengths):
            gen = ctx.generator(50_000 + 1000 * di + li)
            prompts = []
            for _ in range(s.passkey_samples):
                n = torch.randint(
                    10 ** (s.passkey_digits - 1), 10**s.passkey_digits, (1,), generator=gen
                ).item()
                made = passkey_prompt(ctx.tokenizer, length, depth, str(n), ctx.bos)
                if made is not None:
                    prompts.append(made)
            if prompts:
                cells[(di, li)] = prompts
    out = {"depths": depths, "lengths": lengths, "samples": s.passkey_samples, "digits": s.passkey_digits}
    for scorer in scorers:
        grid = [[None] * len(lengths) for _ in depths]
        right = total = 0
        for (di, li), prompts in cells.items():
            correct = 0
            for i in range(0, len(prompts), s.batch_size):
                chunk = prompts[i : i + s.batch_size]
                ids = torch.tensor([p for p, _ in chunk])
                pred = scorer.logits(ids).argmax(-1).cpu()
                for row, (_, start) in enumerate(chunk):
                    correct += bool(torch.equal(pred[row, start - 1 : -1], ids[row, start:]))
            grid[di][li] = correct / len(prompts)
            right, total = right + correct, total + len(prompts)
        out[scorer.name] = {"accuracy": grid, "mean": right / total if total else None}
    return out


def recall_scores(ctx: EvalContext, scorers: Sequence[Scorer]) -> dict:
    return {"mqar": mqar(ctx, scorers), "passkey": passkey(ctx, scorers)}


def recall_task(ctx: EvalContext) -> dict:
    """MQAR and passkey accuracy of teacher and student on the same generated samples."""
    return recall_scores(ctx, ctx.scorers)
