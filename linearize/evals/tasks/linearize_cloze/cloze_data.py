"""Data of the `linearize_cloze` lm-eval task: the JSONL next to this file, resolved from here so the
task runs from any working directory. Imports only `datasets` (lm-eval loads this file by path)."""

from pathlib import Path

import datasets


def load(**_: object) -> datasets.DatasetDict:
    path = Path(__file__).with_name("linearize_cloze.jsonl")
    return datasets.load_dataset("json", data_files={"test": str(path)})
