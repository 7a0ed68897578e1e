"""Distillation losses on full-vocabulary logits, computed a few rows at a time.

A [batch, seq, vocab] float32 copy of the logits is 805 MB for SmolLM2 at 8 x 512 tokens, and autograd
through `log_softmax` keeps several of them: on a CPU the passes over those copies cost as much as the rest
of a stage-2 step. Each loss here works through the rows in chunks that stay in cache, in float32, and
computes its gradient in the same pass; only that gradient (in the logits' dtype) is kept for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 20
"""float32 elements of logits per chunk (4 MB): rows = CHUNK_ELEMENTS // vocab, at least one."""


def row_chunks(rows: int, vocab: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class _GradientKept(torch.autograd.Function):
    """A loss whose gradient with respect to the logits was computed in the forward pass: backward scales
    the kept gradient by the incoming one."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def kl_teacher_student(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens, scaled by temperature**2 (Hinton et al.).

    Logits [batch, seq, vocab] (any float dtype; the teacher's carry no gradient); computed in float32.
    The gradient with respect to the student's logits, T / n (softmax(s / T) sum(p_t) - p_t) with p_t the
    teacher's softmax at temperature T over n tokens (autograd's form: sum(p_t) is 1 up to rounding), is
    computed chunk by chunk in the forward pass.
    """
    t = temperature
    vocab = student_logits.shape[-1]
    s_rows = student_logits.detach().reshape(-1, vocab)
    t_rows = teacher_logits.detach().reshape(-1, vocab)
    n = s_rows.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    grad = torch.empty_like(s_rows) if student_logits.requires_grad else None
    for rows in row_chunks(n, vocab):
        s = s_rows[rows].float()
        z = t_rows[rows].float()
        if t != 1.0:
            s, z = s / t, z / t
        s_logp = F.log_softmax(s, dim=-1)
        t_logp = F.log_softmax(z, dim=-1)
        t_p = t_logp.exp()
        total += (t_p * (t_logp - s_logp)).sum()
        if grad is not None:
            q = s_logp.exp_()
            grad[rows] = ((q * t_p.sum(-1, keepdim=True) - t_p) * (t / n)).to(grad.dtype)
    loss = total / n * t * t
    if grad is None:
        return loss
    return _GradientKept.apply(student_logits, loss, grad.view_as(student_logits))


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[:, 1:] from logits[:, :-1] (float32, chunk by chunk, its
    gradient (softmax - one-hot) / n computed in the forward pass)."""
    batch, seq, vocab = logits.shape
    n = batch * (seq - 1)
    rows_of = logits.detach()
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    grad = torch.zeros_like(logits) if logits.requires_grad else None  # the last position predicts nothing
    for b in range(batch):
        for rows in row_chunks(seq - 1, vocab):
            logp = F.log_softmax(rows_of[b, rows].float(), dim=-1)
            picked = input_ids[b, rows.start + 1 : rows.stop + 1].unsqueeze(-1)
            total -= logp.gather(-1, picked).sum()
            if grad is not None:
                g = logp.exp_()
                g.scatter_add_(-1, picked, torch.full(picked.shape, -1.0, dtype=g.dtype, device=g.device))
                grad[b, rows] = (g / n).to(grad.dtype)
    loss = total / n
    if grad is None:
        return loss
    return _GradientKept.apply(logits, loss, grad)
