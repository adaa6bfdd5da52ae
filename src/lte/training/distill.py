"""Knowledge distillation from the dense model (ours: a step past the paper).

A sparse model recovers best when it learns to match the dense model it came from, token by
token, rather than only the task labels: the teacher's full output distribution carries far more
signal per example than one label, and it keeps a small fine-tuning set from being over-fitted.

    loss = (1 - alpha) * task + alpha * distill (+ the LTE terms in stage 1)

`hidden_state_loss` (ours, opt-in) matches every layer's output as well: the mean over layers and
real tokens of |h_s - h_t|^2 / |h_t|^2, a far denser signal per example than the logits alone.

`distillation_loss` is T^2 * KL(teacher || student) at temperature T, averaged over real
positions, for any logits whose last dimension is a distribution (V vocabulary entries, or C
classes); one output (a regression head, e.g. STS-B) uses the squared error instead. The KL is
computed in chunks of positions, its gradient written chunk by chunk in the same pass, so a large
vocabulary never materialises fp32 copies of the whole [N, V] logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss", "hidden_state_loss"]

#: rows of one KL chunk off the GPU: at most this many bytes per fp32 [rows, V] buffer. Larger buffers come
#: as fresh pages from the OS at every allocation: with the demo's [512, 49152] logits one chunk of every row
#: took 0.25 s a step on a 2-core CPU, chunks of 85 rows 0.13-0.17 s (2026-12-07). On the GPU: 1024 rows.
CPU_CHUNK_BYTES = 16 * 2**20
GPU_CHUNK_ROWS = 1024


class _ChunkedKL(torch.autograd.Function):
    """Mean over rows of T^2 KL(softmax(t/T) || softmax(s/T)), rows [N, V], fp32 work memory O(chunk * V).

    The forward pass already holds both softmaxes of each chunk, so it writes the gradient
    T (p_s - p_t) / N there (in the student's dtype, [N, V], the size of the gradient backward must
    return anyway) instead of keeping the teacher's logits for a backward that would compute both
    softmaxes again.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk: int) -> torch.Tensor:
        n = student.shape[0]
        dtype = torch.promote_types(student.dtype, torch.float32)  # bf16/fp16 logits are summed in fp32
        total = torch.zeros((), dtype=dtype, device=student.device)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        scale = temperature / max(n, 1)  # d/ds of T^2 KL / n = T (p_s - p_t) / n
        for i in range(0, n, chunk):  # in place where a result is not needed again: fewer [c, V] buffers
            s_i, t_i = student[i:i + chunk].to(dtype), teacher[i:i + chunk].to(dtype)
            if temperature != 1.0:
                s_i, t_i = s_i / temperature, t_i / temperature
            log_s = F.log_softmax(s_i, dim=-1)  # [c, V]
            log_t = F.log_softmax(t_i, dim=-1)
            p_t = log_t.exp()
            total = total + log_t.sub_(log_s).mul_(p_t).sum()  # p_t (log_t - log_s)
            if grad is not None:
                grad[i:i + chunk] = log_s.exp_().sub_(p_t).mul_(scale).to(grad.dtype)  # (p_s - p_t) T / N
        ctx.save_for_backward(grad if grad is not None else student.new_empty(0))
        return total * (temperature ** 2) / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      token_mask: torch.Tensor | None = None, temperature: float = 1.0,
                      chunk_rows: int | None = None) -> torch.Tensor:
    """Distillation loss of `student_logits` against `teacher_logits` (same shape).

    `chunk_rows`: positions per chunk of the KL (default: `GPU_CHUNK_ROWS` on CUDA, else as many as fit
    `CPU_CHUNK_BYTES`); the gradient does not depend on it, the loss value only through fp32 summation order.

    Shapes: [B, C] (sequence classification), [B, 1] (regression: squared error), or [B, L, V]
    (language models: every position, masked by `token_mask` [B, L], e.g. the attention mask).
    The teacher gets no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the teacher must be the same model family "
                         "with the same head (the dense model the LTE model was converted from)")
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    teacher_logits = teacher_logits.detach()
    if student_logits.shape[-1] == 1:  # a regression head: match the teacher's output
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    v = student_logits.shape[-1]
    student = student_logits.reshape(-1, v)  # [N, V]
    teacher = teacher_logits.reshape(-1, v)
    if token_mask is not None and token_mask.numel() == student.shape[0]:
        keep = token_mask.reshape(-1).to(student.device).bool()
        student, teacher = student[keep], teacher[keep]
    if student.shape[0] == 0:
        return student_logits.sum() * 0.0
    if chunk_rows is None:
        chunk_rows = GPU_CHUNK_ROWS if student.is_cuda else max(1, CPU_CHUNK_BYTES // (4 * v))
    return _ChunkedKL.apply(student, teacher, float(temperature), int(chunk_rows))


def hidden_state_loss(student_states, teacher_states, token_mask: torch.Tensor | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """Relative squared error of each layer's hidden states against the teacher's, averaged.

    `student_states` / `teacher_states`: the models' `hidden_states` (L + 1 tensors [B, T, D], the
    embeddings first, which are skipped: they are the same in both). Per real token (`token_mask`
    [B, T], e.g. the attention mask): |h_s - h_t|^2 / (|h_t|^2 + eps); the result is the mean over
    tokens, then over layers. The teacher gets no gradient.
    """
    if student_states is None or teacher_states is None:
        raise ValueError("hidden-state distillation needs both models' hidden_states (output_hidden_states=True)")
    if len(student_states) != len(teacher_states) or len(student_states) < 2:
        raise ValueError(f"student has {len(student_states)} hidden states and the teacher {len(teacher_states)}: "
                         "the teacher must be the dense model the LTE model was converted from")
    per_layer = []
    for s, t in zip(student_states[1:], teacher_states[1:]):
        if s.shape != t.shape:
            raise ValueError(f"hidden states {tuple(s.shape)} and {tuple(t.shape)} differ")
        t = t.detach().float()
        rel = (s.float() - t).square().sum(-1) / (t.square().sum(-1) + eps)  # [B, T]
        if token_mask is not None and token_mask.shape == rel.shape:
            keep = token_mask.to(rel.device).bool()
            rel = rel[keep]
        per_layer.append(rel.mean() if rel.numel() else rel.sum() * 0.0)
    return torch.stack(per_layer).mean()
