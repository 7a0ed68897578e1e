import ast
import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "linearize" / "kernels"
OPS = ["linear_attn", "window_linear", "gated_linear_attn", "gated_slot_attn", "gated_delta"]


def test_importing_linearize_and_every_op_loads_neither_triton_nor_fla():
    """Triton/fla are imported only inside the GPU paths, so CPU users and `import linearize` stay light."""
    code = (
        "import sys, linearize\n"
        + "".join(f"import linearize.kernels.{op}\n" for op in OPS)
        + "print(' '.join(m for m in ('triton', 'fla', 'modeling_linearize') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


# files copied verbatim into checkpoints that run without linearize, and what each may import
EXPORTED_MODULES = {"torch", "math"}
EXPORTED_EXTRA = {"window_linear": {"typing"}}


@pytest.mark.parametrize("name", ["chunked.py", "step.py"])
@pytest.mark.parametrize("op", OPS)
def test_exported_files_import_only_torch(op, name):
    allowed = EXPORTED_MODULES | EXPORTED_EXTRA.get(op, set())
    tree = ast.parse((KERNELS / op / name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {op}/{name}"
            mods = [node.module]
        else:
            continue
        assert all(m in allowed or m.startswith("torch.") for m in mods), mods
