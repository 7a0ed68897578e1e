"""The chunked losses equal autograd through the plain float32 formulas, value and gradient, whatever the
chunking (chunks that end inside a batch row included)."""

import pytest
import torch
import torch.nn.functional as F

from linearize.distill import losses


def plain_kl(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    s_logp = F.log_softmax(s.float() / temperature, -1)
    t_logp = F.log_softmax(t.float() / temperature, -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature**2


def plain_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("chunk_elements", [50, 1 << 20])  # 50: one row per chunk; 1 << 20: one chunk
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_and_its_gradient_match_autograd(monkeypatch, chunk_elements, temperature):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    student = (torch.randn(3, 7, 40) * 3).requires_grad_()
    teacher = torch.randn(3, 7, 40) * 3
    want = plain_kl(student, teacher, temperature)
    (want_grad,) = torch.autograd.grad(want, student)
    got = losses.kl_teacher_student(student, teacher, temperature)
    (got_grad,) = torch.autograd.grad(2.5 * got, student)  # the incoming gradient scales the kept one
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_grad, 2.5 * want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_elements", [80, 1 << 20])  # 80: two rows per chunk over 6 predicted rows
def test_cross_entropy_and_its_gradient_match_autograd(monkeypatch, chunk_elements):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 40) * 3).requires_grad_()
    ids = torch.randint(0, 40, (3, 7))
    want = plain_ce(logits, ids)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = losses.next_token_ce(logits, ids)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    assert not got_grad[:, -1].any()  # the last position predicts nothing


def test_bf16_logits_get_a_bf16_gradient_and_no_gradient_is_kept_without_grad():
    torch.manual_seed(0)
    student = (torch.randn(2, 5, 30) * 3).bfloat16().requires_grad_()
    teacher = (torch.randn(2, 5, 30) * 3).bfloat16()
    loss = losses.kl_teacher_student(student, teacher)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad.dtype == torch.bfloat16
    no_grad = losses.kl_teacher_student(student.detach(), teacher)
    assert no_grad.grad_fn is None and no_grad.item() == pytest.approx(loss.item())
