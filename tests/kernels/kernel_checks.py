"""Helpers shared by the kernel tests: the error measure and the one-thread fixture."""

import pytest
import torch


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / (||b|| + tiny), in float64; any NaN/inf fails."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() + 1e-300)).item()


@pytest.fixture(autouse=True)
def one_thread():
    """These are many tiny per-token ops: with OpenMP's active wait on a loaded 2-core machine, two threads ran
    the float64 reference ~50x slower than one (see PITFALLS, CPU timing). Autouse where imported."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
