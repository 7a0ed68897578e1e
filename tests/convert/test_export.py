import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize  # noqa: F401  (registers the converted classes with the Auto classes)
from linearize.config import Recipe, StudentConfig
from linearize.convert.export import BUNDLE, MAX_SHARD_SIZE, export
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import bundled_path


def converted(family: str, tmp_path, softmax_layers=()):
    """A tiny converted model with non-trivial feature maps, exported; returns (in-memory, folder)."""
    teacher = tiny_model(family)
    plan = plan_for(StudentConfig(softmax_layers=list(softmax_layers)), teacher.config)
    student = swap(teacher, plan)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".feature_map_" in n:
                p.add_(0.3 * torch.randn_like(p))
    tok = AutoTokenizer.from_pretrained(bundled_path("stories260K"))
    out = export(student, tok, plan, Recipe(), tmp_path / family)
    return student, out


def test_export_folder_contents(tmp_path):
    _, out = converted("llama", tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "recipe.yaml", "README.md", "COMPLETE", "linear_attn_chunked.py"} <= names
    assert set(BUNDLE) <= names
    assert any(n.endswith(".safetensors") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "linearize_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_linearize.LinearizeLlamaForCausalLM"
    assert config["layer_types"] == ["linear_attention"] * 3
    assert MAX_SHARD_SIZE == "5GB"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "linear-attention" in card
    assert not (tmp_path / ".tmp-llama").exists()


def test_exported_code_imports_neither_linearize_nor_fla_outside_fallbacks(tmp_path):
    _, out = converted("llama", tmp_path)
    from transformers.dynamic_module_utils import get_imports

    for name in (*BUNDLE, "linear_attn_chunked.py"):
        assert not {"linearize", "fla"} & set(get_imports(out / name)), name


@pytest.mark.parametrize("softmax_layers", [(), (1,)], ids=["all-linear", "hybrid"])
def test_reload_matches_in_memory_student(family, softmax_layers, tmp_path):
    student, out = converted(family, tmp_path, softmax_layers)
    ids = torch.randint(0, 512, (2, 37))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__.startswith("Linearize")
    with torch.no_grad():
        a = student(ids).logits
        b = loaded(ids).logits
    assert (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("softmax_layers", [(), (1,)], ids=["all-linear", "hybrid"])
def test_prefill_then_decode_equals_full_forward(family, softmax_layers, tmp_path):
    """Prefill in two chunks then one token at a time from the cache == one pass over everything."""
    _, out = converted(family, tmp_path, softmax_layers)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :20], use_cache=True)
        cache = first.cache
        second = model(ids[:, 20:30], cache=cache, use_cache=True)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 40)]
    got = torch.cat([first.logits, second.logits, *steps], dim=1)
    assert (got - full).abs().max().item() <= 1e-4


def test_greedy_generate_equals_argmax_of_full_forward(family, tmp_path):
    _, out = converted(family, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.randint(3, 512, (1, 7))
    seq = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    with torch.no_grad():
        logits = model(seq, use_cache=False).logits
    assert torch.equal(seq[0, 7:], logits[0, 6:-1].argmax(-1))


def test_linear_cache_does_not_grow_with_context(tmp_path):
    _, out = converted("llama", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()

    def state_bytes(n):
        with torch.no_grad():
            cache = model(torch.randint(0, 512, (1, n)), use_cache=True).cache
        return sum(cache.get_recurrent_state(i).numel() for i in range(3))

    assert state_bytes(16) == state_bytes(300)


REMOTE = textwrap.dedent("""
    import importlib.util, sys, torch
    assert importlib.util.find_spec("linearize") is None, "linearize must not be installed in this venv"
    sys.modules["fla"] = None  # and the torch fallback must not need fla
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378]])
    seq = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    with torch.no_grad():
        logits = model(seq, use_cache=False).logits
    assert torch.equal(seq[0, 5:], logits[0, 4:-1].argmax(-1))
    torch.save(model(ids, use_cache=False).logits, sys.argv[2])
""")


def bare_venv(root):
    """A virtualenv that sees this environment's torch and transformers but not linearize.

    Its .pth adds our site-packages to sys.path without processing the .pth files inside it, and the
    editable install of linearize lives in exactly such a .pth file.
    """
    import site
    import venv

    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    target = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(target) / "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_loads_with_remote_code_in_a_venv_without_linearize(tmp_path):
    student, out = converted("qwen3", tmp_path)
    python = bare_venv(tmp_path / "venv")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
    logits_path = tmp_path / "logits.pt"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": ""}
    proc = subprocess.run(
        [python, str(script), str(out), str(logits_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        expected = student(torch.tensor([[1, 403, 407, 261, 378]])).logits
    assert (torch.load(logits_path) - expected).abs().max().item() <= 1e-5
