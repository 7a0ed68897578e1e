"""The report: results.json (every number), report.md (tables) and PNG plots, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from linearize.convert.card import ppl_results, recall_results

MODELS = ("teacher", "student", "sliding_window")


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


CANNOT = 0.05  # a recall task on which the teacher's mean accuracy is below this is one it cannot do
TASK_NAMES = {"mqar": "MQAR", "passkey": "passkey retrieval"}


def teacher_cannot(task: dict) -> bool:
    """The teacher's mean accuracy on a recall task is below CANNOT: the task measures nothing here."""
    mean = task.get("teacher", {}).get("mean")
    return mean is not None and mean < CANNOT


def _ratio(student, teacher) -> str:
    return f"{student / teacher:.2f}" if student is not None and teacher else "–"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def header(info: dict) -> str:
    plan = info.get("student_plan", {})
    lines = [
        "# linearize evaluation report\n",
        f"- student: `{info['model']}` — mixer `{plan.get('mixer')}`, feature map `{plan.get('feature_map')}`, "
        f"softmax layers {plan.get('softmax_layers') or 'none'}",
        f"- teacher: `{info['teacher']}`",
        f"- device: {info['device']} ({info['device_name']}), torch {info['torch']}, {info['cpu_threads']} CPU "
        f"thread{'s' if info['cpu_threads'] != 1 else ''} (training and evaluation alike), {info['date']}",
    ]
    recipe = info.get("recipe")
    if recipe:
        stages = recipe.get("stages", {})
        budget = info.get("token_budget_per_process", {})
        desc = ", ".join(
            f"{name}: {s.get('steps')} steps, {budget.get(name, 0):,} tokens per process"
            for name, s in stages.items()
        )
        lines.append(f"- recipe `{recipe.get('name')}` (seed {recipe.get('seed')}): {desc}")
    else:
        lines.append("- recipe: unknown (the model folder has no recipe.yaml)")
    run_eval = info.get("run_eval")
    if run_eval:
        lines.append(
            "- held-out perplexity logged during conversion (eval.json): "
            + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in run_eval.items())
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    parts = [header(results["info"])]
    training = results["info"].get("training")
    if training:
        last = {r["stage"]: r for r in training if r.get("loss") is not None}
        parts.append(
            "## Training\n\n"
            + ", ".join(f"stage {s}: last loss {r['loss']:.4g} at step {r['step']}" for s, r in last.items())
            + " (the run's metrics.jsonl).\n\n![loss](loss.png)\n"
        )
    ppl = ppl_results(tasks)
    if ppl:
        meta = ppl["meta"]
        base = ppl["teacher"]["ppl"]
        rows = [[m, ppl[m]["ppl"], _ratio(ppl[m]["ppl"], base), ppl[m]["tokens"]] for m in MODELS if m in ppl]
        parts.append(
            "## Perplexity\n\n"
            f"{meta['source']}; {meta['mode']} mode, windows of {meta['seq_len']} tokens; BOS {meta['bos']}; "
            f"tokens counted: {meta['counted']}.\n\n"
            + _table(["model", "perplexity", "x teacher", "tokens"], rows)
            + "\n![perplexity](ppl.png)\n"
        )
    recall = recall_results(tasks)
    if recall:
        models = [m for m in MODELS if m in recall["mqar"]]
        rows = [["MQAR (mean accuracy)", *(recall["mqar"][m]["mean"] for m in models)]]
        rows.append(["passkey (mean accuracy)", *(recall["passkey"][m]["mean"] for m in models)])
        mq = recall["mqar"]
        cells = [
            [f"{pairs} pairs, {length} tokens", *(mq[m]["accuracy"][pi][li] for m in models)]
            for pi, pairs in enumerate(mq["pairs"])
            for li, length in enumerate(mq["lengths"])
            if mq["teacher"]["accuracy"][pi][li] is not None
        ]
        unable = [kind for kind in ("mqar", "passkey") if teacher_cannot(recall[kind])]
        notes = "".join(
            f"\n**The teacher itself cannot do {TASK_NAMES[kind]}** (mean accuracy "
            f"{_fmt(recall[kind]['teacher']['mean'], 3)}, below {CANNOT:g}): a student's number there says "
            "nothing about the conversion, so it is not plotted.\n"
            for kind in unable
        )
        plots = "".join(
            f"\n![{TASK_NAMES[kind]}](recall_{kind}.png)\n"
            for kind in ("mqar", "passkey")
            if kind not in unable
        )
        parts.append(
            "## Recall\n\n"
            f"MQAR: {mq['samples']} generated sequences per cell, every key queried once, argmax next token. "
            f"Passkey: {recall['passkey']['digits']}-digit number at depths {recall['passkey']['depths']}, "
            f"lengths {recall['passkey']['lengths']} tokens, {recall['passkey']['samples']} prompts per cell, "
            "right when greedy decoding writes the whole number.\n\n"
            + _table(["task", *models], rows + cells)
            + notes
            + plots
        )
    cloze = tasks.get("cloze")
    if cloze:
        rows = [[m, cloze[m]["accuracy"], cloze[m]["token_ppl"]] for m in ("teacher", "student")]
        rows.append(
            [
                "ratio",
                _ratio(cloze["student"]["accuracy"], cloze["teacher"]["accuracy"]),
                _ratio(cloze["student"]["token_ppl"], cloze["teacher"]["token_ppl"]),
            ]
        )
        parts.append(
            "## Cloze (last word)\n\n"
            f"{cloze['meta']['passages']} passages from the {cloze['meta']['source']}; {cloze['meta']['scoring']}. "
            "Perplexity is per token of the last words (a word of several tokens has the product of theirs).\n\n"
            + _table(["model", "accuracy", "last-word perplexity per token"], rows)
        )
    speed = tasks.get("speed")
    if speed:
        rows = []
        for t, s in zip(speed["teacher"]["rows"], speed["student"]["rows"]):
            rows.append(
                [
                    t["context"],
                    t["prefill_s"] * 1e3,
                    s["prefill_s"] * 1e3,
                    t["decode_tokens_per_s"],
                    s["decode_tokens_per_s"],
                    t["cache_bytes_after_decode"] / 1024,
                    s["cache_bytes_after_decode"] / 1024,
                ]
            )
        rss = speed.get("process_peak_rss_bytes")
        parts.append(
            "## Speed and memory\n\n"
            f"Device {speed['device']}"
            + (f", {speed['threads']} torch thread(s)" if speed.get("threads") else "")
            + f"; decode = {speed['decode_tokens']} tokens after the prefill. Memory: {speed['memory_note']}"
            + (f" (peak RSS {rss / 2**20:.0f} MiB)" if rss else "")
            + ".\n\n"
            + _table(
                [
                    "context",
                    "teacher prefill ms",
                    "student prefill ms",
                    "teacher decode tok/s",
                    "student decode tok/s",
                    "teacher cache KiB",
                    "student cache KiB",
                ],
                rows,
            )
            + f"\nCache growth from the shortest to the longest context: teacher "
            f"{speed['teacher']['cache_growth_bytes'] / 1024:.1f} KiB, student "
            f"{speed['student']['cache_growth_bytes'] / 1024:.1f} KiB.\n\n![speed](speed.png)\n"
        )
    window = tasks.get("controls", {}).get("window")
    if window:
        parts.append(
            "## Controls\n\n"
            f"Sliding-window baseline: the teacher with a {window['window']}-token window and {window['sinks']} "
            f"sink tokens, no training (its numbers are the `sliding_window` rows above).\n\n"
            f"**Verdict: {window['verdict']}.**\n"
        )
    branches = tasks.get("controls", {}).get("branches")
    if branches:
        names = [n for n in ("student", "window_only", "linear_only", "no_attention") if n in branches]
        rows = [
            [n, branches[n]["ppl"], _ratio(branches[n]["ppl"], branches["student"]["ppl"]),
             branches[n]["mqar"], branches[n]["passkey"]]
            for n in names
        ]  # fmt: skip
        meta = branches["meta"]
        parts.append(
            ("" if window else "## Controls\n\n")
            + "Hybrid branches: the student with one branch switched off (window only, linear only) and with "
            f"no attention (o_proj(0)); perplexity on {meta['source']} ({meta['mode']} mode, "
            f"{meta['seq_len']}-token windows), MQAR and passkey as above.\n\n"
            + _table(["model", "perplexity", "x student", "MQAR", "passkey"], rows)
            + f"\n**Verdict: {branches['verdict']}.**\n"
        )
    for name, res in tasks.items():
        if name.startswith("lm_eval:"):
            metrics = sorted({k for sub in res["teacher"].values() for k in sub})
            rows = [
                [sub, k, res["teacher"][sub].get(k), res["student"].get(sub, {}).get(k)]
                for sub in res["teacher"]
                for k in metrics
                if k in res["teacher"][sub]
            ]
            parts.append(
                f"## {name}\n\nlm-evaluation-harness {res['lm_eval_version']}, limit {res['limit'] or 'none'}.\n\n"
                + _table(["task", "metric", "teacher", "student"], rows)
            )
    return "\n".join(parts)


def _plots(results: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    colors = {"teacher": "tab:blue", "student": "tab:orange", "sliding_window": "tab:gray"}
    ppl = ppl_results(tasks)
    if ppl:
        models = [m for m in MODELS if m in ppl]
        fig, ax = plt.subplots(figsize=(6, 4))
        base = ppl["teacher"]["ppl"]
        bars = ax.bar(models, [ppl[m]["ppl"] for m in models], color=[colors[m] for m in models])
        ax.bar_label(
            bars, labels=[f"{ppl[m]['ppl']:.2f} ({ppl[m]['ppl'] / base:.2f}x teacher)" for m in models]
        )
        ax.set_ylim(0, max(ppl[m]["ppl"] for m in models) * 1.15)
        ax.set_title(
            f"Held-out perplexity ({ppl['meta']['mode']} mode, {ppl['meta']['seq_len']}-token windows)"
        )
        ax.set_xlabel("model")
        ax.set_ylabel("perplexity (lower is better)")
        fig.tight_layout()
        fig.savefig(folder / "ppl.png", dpi=110)
        plt.close(fig)
    recall = recall_results(tasks)
    if recall:
        for kind, rows_key, ylabel in (
            ("mqar", "pairs", "key-value pairs"),
            ("passkey", "depths", "depth of the key"),
        ):
            data = recall[kind]
            if teacher_cannot(data):
                continue
            models = [m for m in MODELS if m in data]
            fig, axes = plt.subplots(
                1, len(models), figsize=(4.5 * len(models) + 1, 4.2), squeeze=False, layout="constrained"
            )
            for ax, m in zip(axes[0], models):
                grid = [[float("nan") if v is None else v for v in row] for row in data[m]["accuracy"]]
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
                ax.set_xticks(range(len(data["lengths"])), data["lengths"])
                ax.set_yticks(range(len(data[rows_key])), data[rows_key])
                for i, row in enumerate(grid):
                    for j, v in enumerate(row):
                        if v == v:
                            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
                ax.set_title(f"{m} (mean {_fmt(data[m]['mean'], 2)})")
                ax.set_xlabel("sequence length (tokens)")
                ax.set_ylabel(ylabel)
            fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
            fig.suptitle(f"{'MQAR' if kind == 'mqar' else 'Passkey'} accuracy")
            fig.savefig(folder / f"recall_{kind}.png", dpi=110)
            plt.close(fig)
    training = results["info"].get("training")
    if training:
        stages = list(dict.fromkeys(r["stage"] for r in training))
        fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            rows = [r for r in training if r["stage"] == stage and r.get("loss") is not None]
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:orange")
            ax.set_title(f"stage {stage}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("training loss")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "loss.png", dpi=110)
        plt.close(fig)
    speed = tasks.get("speed")
    if speed:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for m in ("teacher", "student"):
            rows = speed[m]["rows"]
            x = [r["context"] for r in rows]
            axes[0].plot(x, [r["prefill_s"] * 1e3 for r in rows], "o-", color=colors[m], label=m)
            axes[1].plot(x, [r["decode_tokens_per_s"] for r in rows], "o-", color=colors[m], label=m)
            axes[2].plot(
                x,
                [r["cache_bytes_after_decode"] / 2**10 for r in rows],
                "o-",
                color=colors[m],
                label=f"{m} cache",
            )
            if "peak_allocated_bytes" in rows[0]:
                axes[2].plot(
                    x,
                    [r["peak_allocated_bytes"] / 2**10 for r in rows],
                    "s--",
                    color=colors[m],
                    label=f"{m} peak",
                )
        titles = (
            ("Prefill time", "time (ms)"),
            ("Decode speed", "tokens/s"),
            ("Cache memory after decoding", "memory (KiB)"),
        )
        for ax, (title, ylabel) in zip(axes, titles):
            ax.set_title(f"{title} ({speed['device']})")
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "speed.png", dpi=110)
        plt.close(fig)


def write_report(results: dict, out: Path) -> Path:
    """Write results.json, report.md and the plots into `out`, atomically (temp folder, then rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    (tmp / "report.md").write_text(markdown(results))
    _plots(results, tmp)
    old = out.parent / f".old-{out.name}-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
