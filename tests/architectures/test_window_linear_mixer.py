"""The window_linear mixer (LoLCATs' sliding-window softmax + linear attention) in converted models."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import linearize  # noqa: F401  (registers the converted classes with the Auto classes)
from linearize.architectures.mixers import LinearMixer, SoftmaxMixer, WindowLinearMixer, mixers, mode
from linearize.config import Recipe, RecipeError, StudentConfig
from linearize.convert.export import export
from linearize.convert.swap import plan_for, swap
from linearize.convert.teachers import bundled_path

WINDOW = 8  # shorter than the test sequences, so the linear branch carries real weight


def window_student(family, softmax_layers=(), window=WINDOW):
    """A tiny window_linear student with non-trivial feature maps and window factors; returns (student, plan)."""
    teacher = tiny_model(family)
    plan = plan_for(
        StudentConfig(mixer="window_linear", window=window, softmax_layers=list(softmax_layers)),
        teacher.config,
    )
    student = swap(teacher, plan)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".feature_map_" in n or n.endswith("window_factor_logit"):
                p.add_(0.3 * torch.randn_like(p))
    return student, plan


def exported(family, tmp_path, softmax_layers=()):
    student, plan = window_student(family, softmax_layers)
    tok = AutoTokenizer.from_pretrained(bundled_path("stories260K"))
    out = export(student, tok, plan, Recipe(), tmp_path / family)
    return student, out


def test_swap_builds_window_mixers_with_new_parameters():
    student, _ = window_student("llama", softmax_layers=[1])
    layers = student.model.layers
    assert isinstance(layers[0].self_attn, WindowLinearMixer) and isinstance(
        layers[1].self_attn, SoftmaxMixer
    )
    attn = layers[0].self_attn
    assert attn.window == WINDOW and attn.window_factor_logit.shape == (4,)
    assert set(attn.new_parameter_names()) == {
        "feature_map_q.weight",
        "feature_map_k.weight",
        "window_factor_logit",
    }
    fresh = plan_for(StudentConfig(mixer="window_linear"), tiny_model("llama").config)
    mixer = swap(tiny_model("llama"), fresh).model.layers[0].self_attn
    assert mixer.window == 64 and torch.allclose(torch.sigmoid(mixer.window_factor_logit), torch.tensor(0.5))


def test_recipe_validates_window_fields():
    with pytest.raises(RecipeError, match="student.window must be an integer >= 1"):
        StudentConfig(mixer="window_linear", window=0)
    with pytest.raises(RecipeError, match="window_factor_init must lie in the open interval"):
        StudentConfig(mixer="window_linear", window_factor_init=1.0)


@pytest.mark.parametrize("softmax_layers", [(), (1,)], ids=["all-window", "hybrid"])
def test_reload_and_decode_match_the_full_forward(family, softmax_layers, tmp_path):
    """Reloaded == in memory; prefill in two chunks then token by token from the cache == one pass, over
    40 tokens with W = 8 (tokens leave the window into the linear state)."""
    student, out = exported(family, tmp_path, softmax_layers)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.number_of_conv_states == 5
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        expected = student(ids).logits
        full = model(ids, use_cache=False).logits
        first = model(ids[:, :20], use_cache=True)
        cache = first.cache
        second = model(ids[:, 20:30], cache=cache, use_cache=True)
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 40)]
    assert (full - expected).abs().max().item() <= 1e-5
    got = torch.cat([first.logits, second.logits, *steps], dim=1)
    assert (got - full).abs().max().item() <= 1e-4


def test_left_padded_batch_generates_like_each_prompt_alone(family, tmp_path):
    _, out = exported(family, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.manual_seed(2)
    prompts = [torch.randint(3, 512, (n,)) for n in (14, 5, 11)]  # the 5-token prompt has 9 pads > W
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    new = 10
    batched = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False
    )
    for row, p in zip(batched, prompts):
        alone = model.generate(p[None], max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert torch.equal(row[width:], alone[0, len(p) :])


def test_padded_prefill_has_no_nan_and_ignores_pads(tmp_path):
    """A padded query whose whole window is padding gives finite values; real tokens' logits do not
    depend on what the pads hold."""
    _, out = exported("llama", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    real = torch.randint(3, 512, (1, 6))
    mask = torch.cat([torch.zeros(1, 12, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a = model(torch.cat([torch.zeros(1, 12, dtype=torch.long), real], 1), attention_mask=mask).logits
        b = model(torch.cat([torch.randint(3, 512, (1, 12)), real], 1), attention_mask=mask).logits
        alone = model(real).logits
    assert torch.isfinite(a).all()
    assert (a[:, 12:] - b[:, 12:]).abs().max().item() <= 1e-5
    assert (a[:, 12:] - alone).abs().max().item() <= 1e-4


def test_window_cache_does_not_grow_with_context(tmp_path):
    _, out = exported("llama", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()

    def state_bytes(n):
        with torch.no_grad():
            cache = model(torch.randint(0, 512, (1, n)), use_cache=True).cache
        return sum(cache.get_recurrent_state(layer, i).nbytes for layer in range(3) for i in range(5))

    assert state_bytes(64) == state_bytes(1024)


REMOTE = """
import importlib.util, sys, torch
assert importlib.util.find_spec("linearize") is None, "linearize must not be installed in this venv"
sys.modules["fla"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.randint(3, 512, (1, 13), generator=torch.Generator().manual_seed(0))
seq = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
with torch.no_grad():
    logits = model(seq, use_cache=False).logits
assert torch.equal(seq[0, 13:], logits[0, 12:-1].argmax(-1))
torch.save((ids, model(ids, use_cache=False).logits), sys.argv[2])
"""


def bare_venv(root):
    """A virtualenv that sees this environment's torch and transformers but not linearize (as in
    tests/convert/test_export.py: the .pth lists our site-packages without processing their .pth files,
    and the editable install of linearize lives in one)."""
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
    from transformers.dynamic_module_utils import get_imports

    student, out = exported("qwen3", tmp_path)
    for name in ("window_linear_chunked.py", "window_linear_step.py"):
        assert set(get_imports(out / name)) - sys.stdlib_module_names <= {"torch"}, name
    python = bare_venv(tmp_path / "venv")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
    result = tmp_path / "logits.pt"
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": ""}
    proc = subprocess.run(
        [python, str(script), str(out), str(result)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids, logits = torch.load(result)
    with torch.no_grad():
        expected = student(ids).logits
    assert (logits - expected).abs().max().item() <= 1e-5


def test_branch_controls(family):
    student, _ = window_student(family)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        base = student(ids).logits
        out = {}
        for name in ("window_only", "linear_only", "no_attention"):
            with mode(student, name):
                out[name] = student(ids).logits
            assert torch.isfinite(out[name]).all()
            assert (out[name] - base).abs().max().item() > 1e-4, name
        assert (out["window_only"] - out["linear_only"]).abs().max().item() > 1e-4
        # no_attention: every window layer outputs o_proj(0)
        layer = student.model.layers[0].self_attn
        hidden = torch.randn(2, 5, student.config.hidden_size)
        with mode(student, "no_attention"):
            got, _ = layer(
                hidden, position_embeddings=student.model.rotary_emb(hidden, torch.arange(5)[None])
            )
        assert torch.equal(got, layer.o_proj(torch.zeros(2, 5, layer.num_heads * layer.head_dim)))
        # linear_only is the linear mixer's attention over all keys with the same feature maps
        m = mixers(student)[0]
        pos = student.model.rotary_emb(hidden, torch.arange(5)[None])
        with mode(student, "linear_only"):
            got, _ = m(hidden, position_embeddings=pos)
        linear = LinearMixer.student_forward(m, hidden, pos, None)
        assert (got - linear).abs().max().item() <= 1e-6


def test_branch_modes_refused_by_other_mixers():
    teacher = tiny_model("llama")
    student = swap(teacher, plan_for(StudentConfig(), teacher.config))
    with pytest.raises(
        ValueError, match="mode 'window_only' needs a window_linear mixer; layer 0 is LinearMixer"
    ):
        with mode(student, "window_only"):
            pass


def test_attention_stage_halves_the_alignment_loss_on_the_bundled_teacher():
    from linearize.config import DataConfig
    from linearize.convert.teachers import load_teacher
    from linearize.distill.data import build_splits
    from linearize.distill.stages import attention_stage

    torch.manual_seed(0)
    teacher, tok = load_teacher("bundled:stories260K")
    splits = build_splits(DataConfig(seq_len=128), tok)
    blocks = splits.train[:4]
    student = swap(teacher, plan_for(StudentConfig(mixer="window_linear", window=16), teacher.config))
    loss_fn = attention_stage(student)
    params = [p for p in student.parameters() if p.requires_grad]
    assert any(p.shape == (teacher.config.num_attention_heads,) for p in params)  # the window factors train
    opt = torch.optim.AdamW(params, lr=1e-2)
    with torch.no_grad():
        first = loss_fn(student, blocks).item()
    for step in range(12):
        loss_fn(student, blocks[step % 2 * 2 : step % 2 * 2 + 2]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        last = loss_fn(student, blocks).item()
    assert last <= 0.5 * first, (first, last)
