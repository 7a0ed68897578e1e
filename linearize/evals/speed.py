"""Speed and memory vs context: prefill time, decode tokens/s and cache memory, teacher vs student.

For each context length: prefill a random prompt with a cache (median of `speed_repeats` timed runs),
then decode `decode_tokens` tokens one at a time from that cache (greedy; time per token -> tokens/s).
Memory is measured two ways and labelled as such:
- `cache_bytes`: sum of `nbytes` of every tensor the returned cache holds (the teacher's KV cache, the
  student's recurrent states plus any softmax layers' KV), after prefill and after decoding. Exact on
  every device.
- on CUDA, `peak_allocated_bytes`: torch.cuda.max_memory_allocated over the prefill (weights included);
  on CPU there is no per-call peak, so only the process's peak RSS for the whole run is reported.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers.cache_utils import Cache

    from linearize.evals.context import EvalContext


def tensor_bytes(obj: object, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from a cache object (layers, lists, dicts, attributes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, torch.device)):
        return sum(tensor_bytes(x, seen) for x in vars(obj).values())
    return 0


def cache_bytes(cache: Cache | None) -> int:
    return tensor_bytes(getattr(cache, "layers", cache))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@torch.no_grad()
def measure(
    model: torch.nn.Module, length: int, decode_tokens: int, repeats: int, gen: torch.Generator
) -> dict:
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, length), generator=gen).to(device)
    times = []
    peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        began = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        _sync(device)
        times.append(time.perf_counter() - began)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
    cache = out.cache
    after_prefill = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    began = time.perf_counter()
    for _ in range(decode_tokens):
        step = model(input_ids=token, cache=cache, use_cache=True)
        cache = step.cache
        token = step.logits[:, -1:].argmax(-1)
    _sync(device)
    decode_s = time.perf_counter() - began
    row = {
        "context": length,
        "prefill_s": statistics.median(times),
        "prefill_tokens_per_s": length / statistics.median(times),
        "decode_tokens_per_s": decode_tokens / decode_s,
        "cache_bytes_after_prefill": after_prefill,
        "cache_bytes_after_decode": cache_bytes(cache),
    }
    if peak is not None:
        row["peak_allocated_bytes"] = peak
    return row


def speed_task(ctx: EvalContext) -> dict:
    """Prefill/decode speed and cache memory per context length, teacher (KV cache) vs student."""
    s = ctx.settings
    device = ctx.student.device
    limit = ctx.context_length - s.decode_tokens
    lengths = sorted({min(n, limit) for n in s.speed_lengths if n >= 1})
    out = {
        "lengths": lengths,
        "decode_tokens": s.decode_tokens,
        "device": str(device),
        "memory_note": "cache_bytes: sum of tensor nbytes held by the returned cache; "
        + (
            "peak_allocated_bytes: torch.cuda.max_memory_allocated during prefill (weights included)"
            if device.type == "cuda"
            else "CPU: no per-call peak; process_peak_rss_bytes is the whole process's peak RSS"
        ),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    for scorer in ctx.scorers:
        measure(scorer.model, lengths[0], 2, 1, ctx.generator(7))  # warm-up
        rows = [measure(scorer.model, n, s.decode_tokens, s.speed_repeats, ctx.generator(7)) for n in lengths]
        growth = rows[-1]["cache_bytes_after_decode"] - rows[0]["cache_bytes_after_decode"]
        out[scorer.name] = {"rows": rows, "cache_growth_bytes": growth}
    if device.type == "cpu":
        out["process_peak_rss_bytes"] = peak_rss_bytes()
    return out
