"""Exact pure-PyTorch definitions of every op: the specification, the test oracle (in float64)
and the fallback backend. Differentiable through plain autograd.

Notation per row of logits: ``P = softmax(input)``, ``Q = softmax(target)``,
``d = log P - log Q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_probs(input: torch.Tensor, target: torch.Tensor, compute_dtype: torch.dtype | None):
    dt = compute_dtype or acc_dtype(input.dtype)
    a, b = input.to(dt), target.to(dt)
    # A vocabulary entry that is -inf in both rows is masked out: it contributes 0.
    both_masked = (a == float("-inf")) & (b == float("-inf"))
    # A row pair masked out entirely contributes 0 with zero gradient (not softmax's NaN).
    dead_row = both_masked.all(dim=-1, keepdim=True)
    a = torch.where(dead_row, 0.0, a)
    b = torch.where(dead_row, 0.0, b)
    both_masked = both_masked & ~dead_row
    return F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1), both_masked


def sym_kl_rows(
    input: torch.Tensor,
    target: torch.Tensor,
    grad: str = "full",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-row ``KL(P||Q) + KL(Q||P) = sum_j (P_j - Q_j) d_j``.

    input, target: [..., V]. Returns [...] in the accumulation dtype (or ``compute_dtype``).
    ``grad="full"``: exact gradients. ``grad="stop_grad"`` (mt-dnn / smart-pytorch): the same
    value with ``d/d input = P - Q`` and ``d/d target = Q - P``.
    """
    logp, logq, both = _log_probs(input, target, compute_dtype)
    p, q = logp.exp(), logq.exp()
    if grad == "full":
        d = torch.where(both, 0.0, logp - logq)
        return ((p - q) * d).sum(-1)
    if grad == "stop_grad":
        # KL(sg Q || P) + KL(sg P || Q): same value, gradients P - Q and Q - P.
        kl_qp = torch.where(both, 0.0, q.detach() * (logq.detach() - logp))
        kl_pq = torch.where(both, 0.0, p.detach() * (logp.detach() - logq))
        return (kl_qp + kl_pq).sum(-1)
    raise ValueError(f"grad: expected 'full' or 'stop_grad', got {grad!r}")


def kl_rows(
    input: torch.Tensor, target: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Per-row ``KL(Q||P) = sum_j Q_j (log Q_j - log P_j)`` (= ``F.kl_div(log P, Q)`` per row).

    input, target: [..., V]. Returns [...] in the accumulation dtype (or ``compute_dtype``).
    """
    logp, logq, _ = _log_probs(input, target, compute_dtype)
    # Q_j = 0 contributes 0 (0 log 0 = 0, as F.kl_div); zeroing d first keeps gradients finite.
    d = torch.where(logq == float("-inf"), 0.0, logq - logp)
    return (logq.exp() * d).sum(-1)


def reduce_rows(
    rows: torch.Tensor, mask: torch.Tensor | None, reduction: str, num_classes: int
) -> torch.Tensor:
    """Reduce per-row values [...] (masked rows already 0) as DESIGN §3 says.

    ``batchmean``: sum / counted rows; ``sum``; ``mean``: sum / (counted rows * V);
    ``none``: the rows themselves. No rows counted gives 0, not NaN. Never syncs the device.
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = mask.sum() if mask is not None else rows.numel()
    if reduction == "mean":
        count = count * num_classes
    if isinstance(count, int):
        return total / max(count, 1)
    return total / count.clamp(min=1).to(total.dtype)


def _drop_masked_rows(input, target, mask):
    """Zero the logits of masked rows, so that their content (even inf/NaN) cannot reach the
    value or the gradients: a masked row contributes 0 and gets a zero gradient."""
    if mask is None:
        return input, target
    keep = mask.unsqueeze(-1)
    return input.masked_fill(~keep, 0.0), target.masked_fill(~keep, 0.0)


def sym_kl(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "batchmean",
    grad: str = "full",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``sk.sym_kl``; see ``smart_kernels.sym_kl`` for the contract."""
    input, target = _drop_masked_rows(input, target, mask)
    rows = sym_kl_rows(input, target, grad)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    return reduce_rows(rows, mask, reduction, input.shape[-1])


def kl(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``sk.kl``; see ``smart_kernels.kl`` for the contract."""
    input, target = _drop_masked_rows(input, target, mask)
    rows = kl_rows(input, target)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    return reduce_rows(rows, mask, reduction, input.shape[-1])
