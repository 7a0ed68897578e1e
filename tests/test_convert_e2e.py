"""`linearize convert` with no argument: the bundled teacher, both stages, evaluation, export."""

import json
import os
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize  # noqa: F401


def test_default_convert_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "linearize", "convert", f"output_dir={tmp_path}/run"],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - began
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout, f"wall {wall:.0f}s")
    out = proc.stdout
    # each held-out perplexity is printed as soon as it is measured, and the final table has the baseline
    for name, before in (
        ("teacher", "[attention] done"),
        ("teacher, sliding window + 4 sinks, no training", "[attention] done"),
        ("student, untrained", "[attention] done"),
        ("student after stage attention", "[logits] done"),
        ("student after stage logits", "held-out perplexity "),
    ):
        assert out.index(f"[eval] held-out perplexity, {name}: ") < out.index(before), name
        assert f"\n{name}  " in out  # a row of the final table
    assert "Removed shared tensor" not in proc.stderr and "Generating train split" not in proc.stderr
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["sliding_window"]["ppl"] < results["student_untrained"]["ppl"]
    teacher, trained = results["teacher"]["ppl"], results["student_after_logits"]["ppl"]
    assert results["student_untrained"]["ppl"] > 4 * teacher  # the swap alone is far off
    assert trained <= 2.5 * teacher, results
    out = tmp_path / "run" / "final"
    assert (out / "recipe.yaml").is_file() and "held-out perplexity" in (
        out / "README.md"
    ).read_text().lower()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    seq = model.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    with torch.no_grad():
        logits = model(seq, use_cache=False).logits
    assert torch.equal(seq[0, ids.shape[1] :], logits[0, ids.shape[1] - 1 : -1].argmax(-1))
    print(tok.decode(seq[0]))
