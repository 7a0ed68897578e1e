import subprocess
import sys

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
