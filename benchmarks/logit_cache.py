"""Size and accuracy of the top-k logit cache (linearize/distill/logit_cache.py) against full logits.

For each k, the teacher's top-k cache of the training blocks is written to a temp folder; its size is
measured from the files on disk, and the KL(teacher || student) that stage 2 would compute from the cache
(`kl_from_topk`, k + 1 buckets) is compared per token with the KL from the full teacher logits, for two
students: the teacher with Gaussian noise on its weights, and the untrained converted student (every layer
swapped for the default linear mixer). A last row with k = vocab isolates the float16 rounding of the
stored log-probs. Sizes are then projected to a 152k vocabulary (Qwen).
"""

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from linearize.config import DataConfig, StudentConfig
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import load_teacher
from linearize.data import build_splits
from linearize.distill.logit_cache import LogitCache, kl_from_topk, write_logit_cache


def full_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token from full logits (`losses.kl_teacher_student` before its mean)."""
    s_logp, t_logp = F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


@torch.no_grad()
def logits_of(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    return torch.cat(
        [
            model(input_ids=blocks[i : i + batch_size], use_cache=False).logits.float()
            for i in range(0, len(blocks), batch_size)
        ]
    )


@torch.no_grad()
def noisy_copy(model: torch.nn.Module, scale: float, seed: int = 0) -> torch.nn.Module:
    """A copy with N(0, (scale * std of each weight)^2) added to every weight."""
    gen = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    for p in noisy.parameters():
        if p.numel() > 1:
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    return noisy


def cache_kl_per_token(cache: LogitCache, blocks: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    ids = list(range(len(blocks)))
    top = cache.fetch(ids, blocks)
    return kl_from_topk(student_logits, top.values, top.indices, top.lse, reduction="none")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="bundled:stories260K")
    p.add_argument("--ks", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument(
        "--seq-len", type=int, default=DataConfig().seq_len, help="tokens per block (recipe default)"
    )
    p.add_argument("--max-blocks", type=int, help="use only the first N training blocks")
    p.add_argument("--shard-blocks", type=int, default=64)
    p.add_argument("--noise", type=float, default=0.1, help="weight noise of the noisy-teacher student")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (see PITFALLS, CPU timing)")
    p.add_argument("--out", default="logit_cache.json", help="JSON file for the results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    teacher, tok = load_teacher(args.teacher)
    blocks = build_splits(DataConfig(seq_len=args.seq_len), tok).train[: args.max_blocks]
    tokens = blocks.numel()
    vocab = teacher.config.vocab_size
    t_logits = logits_of(teacher, blocks)
    students = {
        f"noisy teacher ({args.noise:g} std)": noisy_copy(teacher, args.noise),
        "converted, untrained": swap(copy.deepcopy(teacher), plan_for(StudentConfig(), teacher.config)),
    }
    s_logits = {name: logits_of(m, blocks) for name, m in students.items()}
    full_kl = {name: full_kl_per_token(s, t_logits) for name, s in s_logits.items()}

    print(f"teacher {args.teacher} (vocab {vocab}), {len(blocks)} blocks x {args.seq_len} = {tokens} tokens")
    for i, (name, kl) in enumerate(full_kl.items()):
        print(f"student {i} {name!r}: full KL {kl.mean():.4f} nats/token")
    print(
        f"{'k':>5s} {'MB / M tok':>10s} {'write s':>8s}  "
        + "  ".join(f"{'|dKL| ' + str(i):>10s} {'rel ' + str(i):>7s}" for i in range(len(students)))
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [*args.ks, vocab]:
            folder = Path(tmp) / f"k{k}"
            start = time.perf_counter()
            cache = write_logit_cache(teacher, blocks, folder, k=k, shard_blocks=args.shard_blocks)
            seconds = time.perf_counter() - start
            size = sum(f.stat().st_size for f in folder.iterdir())
            row = {
                "k": k,
                "bytes": size,
                "bytes_per_token": size / tokens,
                "write_s": seconds,
                "students": {},
            }
            for name in students:
                err = (cache_kl_per_token(cache, blocks, s_logits[name]) - full_kl[name]).abs().mean().item()
                row["students"][name] = {
                    "full_kl": full_kl[name].mean().item(),
                    "abs_err": err,
                    "rel_err": err / full_kl[name].mean().item(),
                }
            rows.append(row)
            errs = "  ".join(f"{s['abs_err']:10.2e} {s['rel_err']:7.2%}" for s in row["students"].values())
            label = f"{k}" if k != vocab else f"{k}*"
            print(f"{label:>5s} {row['bytes_per_token']:10.1f} {seconds:8.2f}  {errs}")
    print("MB / M tok: megabytes on disk per million tokens (= bytes per token), shards + manifest")
    print("* k = vocab: no tail bucket; the error is the float16 rounding of the stored log-probs alone")
    print(
        "columns: |dKL| i = mean over tokens of |KL_cache - KL_full| for student i; rel i = that / mean KL_full"
    )

    # Per token: k log-probs (float16, 2 B) + k indices (2 B when vocab <= 32768, else 4 B) + lse (float32,
    # 4 B); the manifest and safetensors headers add a few hundred bytes per shard. Nothing else grows with
    # the vocabulary: only the index dtype does.
    k32 = next((r for r in rows if r["k"] == 32), None)
    qwen = {"vocab": 151_936, "k": 32, "bytes_per_token": 32 * (2 + 4) + 4}
    qwen["mb_per_m_tokens"] = qwen["bytes_per_token"]
    qwen["full_bf16_logits_mb_per_m_tokens"] = 151_936 * 2
    print(
        f"projected, vocab 152k (Qwen), k=32: {qwen['bytes_per_token']} B/token = {qwen['mb_per_m_tokens']} MB per "
        f"million tokens (int32 indices; {32 * 4 + 4} B/token with int16 indices as here"
        + (f", measured {k32['bytes_per_token']:.1f} with headers" if k32 else "")
        + f"); full bf16 logits would be {qwen['full_bf16_logits_mb_per_m_tokens'] / 1e3:.0f} GB per million tokens."
    )
    print(
        "the size is independent of the vocabulary except for the index dtype (int16 up to 32768 tokens, int32 above)"
    )
    meta = {
        "teacher": args.teacher,
        "vocab": vocab,
        "blocks": len(blocks),
        "seq_len": args.seq_len,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "results": rows, "projection_qwen_k32": qwen}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from linearize.host import keep_freed_memory

    keep_freed_memory()  # as the `linearize` command does
    main()
