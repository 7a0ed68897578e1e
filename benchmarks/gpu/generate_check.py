"""Greedy generate() of an export with its cache, checked against full forwards over the same tokens.

    python benchmarks/gpu/generate_check.py --model out/run/final [--device cuda] [--out generate.json]

Each generated token must be the arg-max of a full (cache-free) forward over the prompt and the tokens
before it; exits 1 when one is not, naming the first position.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def check(model_path: str, device: str, new_tokens: int, prompt: str) -> dict:
    """Generate with the cache, then score every prefix with full forwards; the record of both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import linearize  # noqa: F401  (registers the converted classes)

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - t0
        logits = model(out).logits[0, ids.shape[1] - 1 : -1].float()
    want = logits.argmax(-1)
    got = out[0, ids.shape[1] :]
    # a flip between two near-equal logits is rounding, not a cache bug: count it apart
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    mism = [i for i in range(len(got)) if got[i] != want[i]]
    real = [i for i in mism if margin[i] > 1e-2 * max(1.0, abs(float(top2[i, 0])))]
    return dict(
        model=model_path,
        device=device,
        dtype=str(next(model.parameters()).dtype),
        new_tokens=int(len(got)),
        tokens_per_s=len(got) / seconds,
        mismatches=mism,
        mismatches_beyond_ties=real,
        ok=not real,
        text=tok.decode(out[0], skip_special_tokens=True),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prompt", default="Once upon a time, in a small village,")
    p.add_argument("--out", help="JSON file for the record")
    args = p.parse_args(argv)
    res = check(args.model, args.device, args.new_tokens, args.prompt)
    print(json.dumps({k: v for k, v in res.items() if k != "text"}))
    print(res["text"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    if not res["ok"]:
        sys.exit(
            f"error: generate() with the cache differs from full forwards at new tokens {res['mismatches_beyond_ties']}"
        )


if __name__ == "__main__":
    main()
