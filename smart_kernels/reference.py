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


# ---- adversarial perturbation (DESIGN §3) -----------------------------------------------------

NORMS = ("inf", "l2", "l1")
SCOPES = ("token", "sequence")
RULES = ("paper", "normalize_sum")


def group_dims(scope: str) -> tuple[int, ...]:
    """The dims one normalization group spans: token = the last (H), sequence = the last two."""
    return (-1,) if scope == "token" else (-2, -1)


def _normalize_acc(x: torch.Tensor, norm: str, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    if norm == "l1":  # sign, NaN kept (torch.sign maps NaN to 0); zero gradient
        return torch.where(torch.isnan(x), x.detach(), torch.sign(x))
    if norm == "inf":
        return x / (x.abs().amax(dim=dims, keepdim=True) + eps)
    return x / (torch.linalg.vector_norm(x, dim=dims, keepdim=True) + eps)


def normalize(
    x: torch.Tensor, *, norm: str = "inf", scope: str = "token", eps: float = 1e-6
) -> torch.Tensor:
    """Reference ``sk.normalize``: per group, ``x / (max|x| + eps)`` (inf), ``x / (||x||_2 +
    eps)`` (l2) or ``sign(x)`` (l1, zero gradient); computed in the accumulation dtype, returned
    in x's dtype. Differentiable by autograd (ties of the max split as ``amax`` splits them)."""
    y = _normalize_acc(x.to(acc_dtype(x.dtype)), norm, group_dims(scope), eps)
    return y.to(x.dtype)


@torch.no_grad()
def perturb_step(
    noise: torch.Tensor,
    grad: torch.Tensor,
    *,
    step_size: float = 1e-3,
    radius: float | None = 1e-5,
    norm: str = "inf",
    scope: str = "token",
    rule: str = "paper",
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference ``sk.perturb_step`` (the new noise, outside autograd).

    ``paper``: ``Π(noise + step_size * normalize(grad))``, Π = clamp to [-radius, radius] (inf)
    or rescale the group to norm <= radius (l2, l1); ``radius=None``: no Π.
    ``normalize_sum``: ``normalize(noise + step_size * grad)``.
    mask (bool, noise.shape[:-1]): a False token gets 0 and is left out of every group norm.
    """
    acc = acc_dtype(noise.dtype)
    dims = group_dims(scope)
    d, g = noise.to(acc), grad.to(acc)
    keep = None if mask is None else mask.unsqueeze(-1)
    if keep is not None:
        d, g = d.masked_fill(~keep, 0.0), g.masked_fill(~keep, 0.0)
    if rule == "paper":
        s = d + step_size * _normalize_acc(g, norm, dims, eps)
        if radius is not None:
            if norm == "inf":
                s = s.clamp(-radius, radius)
            else:
                order = 2 if norm == "l2" else 1
                n = torch.linalg.vector_norm(s, ord=order, dim=dims, keepdim=True)
                s = s * torch.where(n > radius, radius / n, torch.ones_like(n))
    else:
        s = _normalize_acc(d + step_size * g, norm, dims, eps)
    if keep is not None:
        s = s.masked_fill(~keep, 0.0)
    return s.to(noise.dtype)


def init_noise(
    like: torch.Tensor,
    std: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reference ``sk.init_noise``: ``N(0, std^2)`` shaped like ``like`` (its dtype and device),
    zero where ``mask`` (bool, like.shape[:-1]) is False; drawn with ``torch.randn``."""
    acc = acc_dtype(like.dtype)
    noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=acc) * std
    if mask is not None:
        noise = noise.masked_fill(~mask.unsqueeze(-1), 0.0)
    return noise.to(like.dtype)


# ---- EMA teacher (DESIGN §3) ------------------------------------------------------------------


@torch.no_grad()
def ema_update_(
    teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float | torch.Tensor
) -> None:
    """Reference ``sk.ema_update_``: ``t <- decay * t + (1 - decay) * s`` pair by pair, in place,
    computed as ``lerp(t, s, 1 - decay)`` (ATen's fused form, exact at decay 0 and 1) in the
    teacher's accumulation dtype; non-floating pairs are copied."""
    for t, s in zip(teacher, student, strict=True):
        if not t.is_floating_point():
            t.copy_(s)
            continue
        t.copy_(ema(t, s, decay))


def ema(teacher: torch.Tensor, student: torch.Tensor, decay: float | torch.Tensor) -> torch.Tensor:
    """Reference ``sk.ema``: ``decay * teacher + (1 - decay) * student`` in teacher's dtype;
    differentiable (d/d teacher = decay * g, d/d student = (1 - decay) * g)."""
    acc = acc_dtype(teacher.dtype)
    weight = 1 - (decay.to(acc) if isinstance(decay, torch.Tensor) else decay)
    return torch.lerp(teacher.to(acc), student.to(acc), weight).to(teacher.dtype)
