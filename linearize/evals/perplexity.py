"""Held-out perplexity: documents packed into blocks, next-token loss over every predicted token."""

from __future__ import annotations

import math

import torch

from linearize.distill.data import pack


@torch.no_grad()
def perplexity(model, docs: list[list[int]], seq_len: int, batch_size: int = 8, max_blocks: int = 0) -> dict:
    """exp(mean next-token NLL) over `docs` packed into `seq_len` blocks (the last, shorter block too).

    Returns {"ppl", "nll", "tokens", "blocks"}; `tokens` counts predicted tokens (block length - 1 each).
    """
    blocks = pack(docs, seq_len, keep_remainder=True)
    if max_blocks:
        blocks = blocks[:max_blocks]
    if not blocks:
        raise ValueError("no held-out tokens to evaluate: data.heldout / data.heldout_docs gave no documents")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    by_len: dict[int, list[list[int]]] = {}
    for b in blocks:
        by_len.setdefault(len(b), []).append(b)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            ids = torch.tensor(group[i : i + batch_size], device=device)
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    mean = total_nll / total_tokens
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens, "blocks": len(blocks)}
