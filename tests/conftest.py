"""Shared fixtures: tiny random models of every supported family (a few thousand parameters)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

FAMILIES = ["llama", "llama3_rope", "qwen2", "qwen3", "mistral"]


def student_config(**fields):
    """A StudentConfig from flat fields: mixer, layers and impl as they are, the rest the mixer's settings."""
    from linearize.config import StudentConfig

    top = {k: fields.pop(k) for k in ("mixer", "layers", "impl") if k in fields}
    return StudentConfig(**top, settings=fields)


def tiny_config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "llama3_rope":  # Llama 3.1 rope scaling
        return LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if family == "qwen2":  # q/k/v biases
        return Qwen2Config(**common)
    if family == "qwen3":  # q/k RMSNorm
        return Qwen3Config(**common)
    if family == "mistral":  # sliding window smaller than the test sequences
        return MistralConfig(**common, sliding_window=16)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa")
    if family == "qwen2":  # random init leaves biases at zero: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps a process-wide state (precision, device); tests with different recipes need a fresh one."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


SMOLLM2_ASSET = Path(__file__).resolve().parents[2] / "shared" / "assets" / "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, materialized once from the GGUF in ../shared/assets.

    The folder is cached where the assets README says (~/.cache/linearize-assets); the first run takes
    about a minute. Skipped only where the checkout has no ../shared beside it (CI always has it).
    """
    script = SMOLLM2_ASSET / "materialize.py"
    if not script.exists():
        pytest.skip(f"needs {script} (the shared assets beside the checkout)")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"materialize.py failed:\n{out.stdout}\n{out.stderr}"
    return Path(out.stdout.strip().splitlines()[-1])
