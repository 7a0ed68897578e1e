"""The model card (README.md) of a converted checkpoint, written with huggingface_hub's `ModelCard`.

`export` writes a first card from what the run knows; `linearize publish` rewrites it with the Hub
names (base model, licence) and the evaluation report, whose headline numbers also go into
`model-index` so the Hub shows them. `check_card` validates a card offline.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import linearize
from linearize.config import MIXER_SETTINGS
from linearize.errors import LinearizeError


class CardError(LinearizeError, ValueError):
    """A model card that the Hub would reject or that lacks what linearize promises in it."""


def ppl_results(tasks: dict) -> dict | None:
    """Perplexity per model in an eval report's tasks (results.json), the controls' run (which has the
    sliding window too) preferred."""
    window = tasks.get("controls", {}).get("window")
    if window:
        return window["ppl"]
    return tasks.get("ppl")


def recall_results(tasks: dict) -> dict | None:
    """Recall per model in an eval report's tasks, the controls' run preferred."""
    window = tasks.get("controls", {}).get("window")
    if window:
        return window["recall"]
    return tasks.get("recall")


def _slug(source: str) -> str:
    """A dataset id for model-index: a file's stem, else the source name made id-safe."""
    files = re.findall(r"([\w.-]+)\.(?:txt|jsonl|json|parquet|text)\b", source)
    return files[0] if files else re.sub(r"[^A-Za-z0-9_.-]+", "-", source).strip("-")[:64] or "local"


def eval_results(report: dict | None, evals: dict, model_name: str) -> list:
    """`EvalResult`s for model-index: the student's numbers whose metric has a standard name."""
    from huggingface_hub import EvalResult

    def result(dataset: str, name: str, metric: str, value: float, metric_name: str | None = None):
        return EvalResult(
            task_type="text-generation",
            dataset_type=_slug(dataset),
            dataset_name=name,
            metric_type=metric,
            metric_name=metric_name or metric,
            metric_value=round(float(value), 4),
        )

    found = []
    tasks = (report or {}).get("tasks", {})
    ppl = ppl_results(tasks)
    if ppl and "student" in ppl:
        source = ppl["meta"]["source"]
        found.append(result(source, f"held-out text ({source})", "perplexity", ppl["student"]["ppl"]))
    recall = recall_results(tasks)
    if recall and "student" in recall["mqar"]:
        found.append(result("mqar", "MQAR (synthetic)", "accuracy", recall["mqar"]["student"]["mean"]))
        found.append(
            result("passkey", "passkey (synthetic)", "accuracy", recall["passkey"]["student"]["mean"])
        )
    cloze = tasks.get("cloze")
    if cloze:
        found.append(
            result(
                "cloze",
                f"last-word cloze ({cloze['meta']['source']})",
                "accuracy",
                cloze["student"]["accuracy"],
            )
        )
    for name, res in tasks.items():
        if name.startswith("lm_eval:"):
            for sub, metrics in res["student"].items():
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and "stderr" not in key:
                        found.append(result(sub, sub, key.split(",")[0], value, key))
    if not found and evals:  # no report: the held-out perplexity logged during the conversion
        last = [k for k in evals if k.startswith("student")][-1:]
        for key in last:
            found.append(
                result("heldout", "held-out documents of the recipe's data", "perplexity", evals[key]["ppl"])
            )
    return [r for r in found if math.isfinite(r.metric_value)] if model_name else []


def _mixer_settings(plan: dict) -> str:
    """`feature_map hedgehog, feature_dim 128, ...`: the settings of the plan's mixer (a converted config's
    `linearize` dict); a key a plan written before it existed lacks is left out."""
    cls = MIXER_SETTINGS.get(plan["mixer"])
    names = [f.name for f in dataclasses.fields(cls)] if cls else []
    shown = [f"{n} {plan[n]}" for n in names if n in plan]
    return "settings: " + (", ".join(shown) if shown else "none")


def _layer_plan(plan: dict) -> str:
    if not plan.get("layer_ranking"):
        return ""
    kind = {r["layer"]: plan["mixer"] for r in plan["layer_ranking"]}
    kind.update(dict.fromkeys(plan["softmax_layers"], "softmax"))
    lines = "\n".join(
        f"| {r['layer']} | {r['loss']:.4g} | {kind[r['layer']]} |" for r in plan["layer_ranking"]
    )
    return f"""
## Layer plan `{plan["layers"]}`

Stage-1 alignment loss of each layer after stage 1 (highest first); the top {plan["auto_softmax"]} keep softmax.

| layer | loss | kept as |
|---|---|---|
{lines}
"""


def _report_section(report_md: str | None, evals: dict) -> str:
    if report_md:  # the eval report, its headings one level down and its plots under report/
        body = report_md.split("\n", 1)[1] if report_md.startswith("# ") else report_md
        body = re.sub(r"^(#+) ", r"#\1 ", body, flags=re.MULTILINE)
        body = re.sub(r"\]\(([\w.-]+\.png)\)", r"](report/\1)", body)
        return f"## Evaluation (`linearize eval`, teacher and student side by side)\n{body}\n"
    if not evals:
        return ""
    base = evals.get("teacher", {}).get("ppl")
    ratio = {name: f"{v['ppl'] / base:.2f}" if base else "–" for name, v in evals.items()}
    rows = "\n".join(f"| {n} | {v['ppl']:.3f} | {ratio[n]} | {v['tokens']} |" for n, v in evals.items())
    return f"""## Held-out perplexity (teacher and student, same tokens)

| model | perplexity | x teacher | tokens |
|---|---|---|---|
{rows}
"""


def model_card(
    recipe_yaml: str,
    recipe_name: str,
    plan: dict,
    conversion: dict,
    *,
    name: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    report: dict | None = None,
    report_md: str | None = None,
    deltas: dict | None = None,
) -> str:
    """README.md of a converted checkpoint: front matter (base model, licence, tags, model-index), what
    it is and how to load it, the distillation budget and hardware, the evaluation and the recipe."""
    from huggingface_hub import ModelCard, ModelCardData

    teacher = base_model or conversion.get("teacher_hub_id") or conversion["teacher"]
    tags = ["linearize", "linear-attention", f"mixer-{plan['mixer']}", plan["teacher_model_type"]]
    data = ModelCardData(
        base_model=base_model or conversion.get("teacher_hub_id"),
        base_model_relation="finetune" if (base_model or conversion.get("teacher_hub_id")) else None,
        license=license or conversion.get("teacher_license"),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags + (["deltas-only"] if deltas else []),
        model_name=name,
        eval_results=eval_results(report, conversion.get("evals", {}), name) or None,
    )
    tokens = conversion.get("tokens", {})
    budget = ", ".join(f"{stage}: {n:,} tokens" for stage, n in tokens.items()) or "not recorded"
    load = "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
    if deltas:
        usage = f"""This repository holds **only the parameters conversion added or changed**
({deltas["tensors"]} tensors, {deltas["bytes"] / 2**20:.1f} MiB; {deltas["fraction"]:.1%} of the full
checkpoint). Loading reads the base model `{deltas["base"]}` (from the Hub or its local cache) and lays the
deltas over it; `base_model_path=<folder>` points at a local copy instead:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{name or "<repo>"}", trust_remote_code=True)
```
"""
    else:
        usage = f"Load with `{load}` (or after `import linearize`); it generates with a constant-size cache."
    text = f"""---
{data.to_yaml()}
---

# {name or recipe_name}

Converted from `{teacher}` by linearize {linearize.__version__}
(recipe `{recipe_name}`): mixer `{plan["mixer"]}` ({_mixer_settings(plan)}), softmax kept in
layers {plan["softmax_layers"] or "none"}.

{usage}

## Distillation

Token budget per stage: {budget}. Hardware: {conversion.get("hardware", "not recorded")}.
{_layer_plan(plan)}
{_report_section(report_md, conversion.get("evals", {}))}
## Licence

{license or conversion.get("teacher_license") or "unknown"}, carried over from the teacher `{teacher}`.

## Recipe

```yaml
{recipe_yaml}```
"""
    return str(ModelCard(text))


def check_card(text: str) -> dict:
    """Validate a card offline: its front matter parses, names what the Hub needs, and its model-index
    round-trips through huggingface_hub. Returns the metadata; raises CardError naming the problem.

    (`ModelCard.validate` asks the Hub's API, which needs a network; these are the checks we can make
    without one.)"""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    try:
        data = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    except Exception as err:
        raise CardError(f"the card's metadata does not parse: {err}") from err
    for key in ("license", "library_name", "tags", "pipeline_tag"):
        if not data.get(key):
            raise CardError(f"the card has no {key!r} in its metadata")
    if data["library_name"] != "transformers":
        raise CardError(f"library_name is {data['library_name']!r}, expected 'transformers'")
    if "model-index" in data:
        name, results = model_index_to_eval_results(data["model-index"])
        if not name or not results:
            raise CardError("the card's model-index has no model name or no results")
        bad = [r.metric_type for r in results if not isinstance(r.metric_value, (int, float))]
        if bad:
            raise CardError(f"model-index metrics without a numeric value: {bad}")
    return data


def read_report(folder: Path) -> tuple[dict, str]:
    """(results.json, report.md) of an eval report folder."""
    import json

    return json.loads((folder / "results.json").read_text()), (folder / "report.md").read_text()
