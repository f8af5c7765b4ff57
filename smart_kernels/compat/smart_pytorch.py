"""A drop-in for `smart-pytorch <https://pypi.org/project/smart-pytorch/>`_ 0.0.4 on
smart_kernels' fused ops: replace ``from smart_pytorch import ...`` with
``from smart_kernels.compat.smart_pytorch import ...``.

Same names, signatures, defaults and semantics as smart-pytorch::

    SMARTLoss(eval_fn, loss_fn, loss_last_fn=None, norm_fn=inf_norm, num_steps=1,
              step_size=1e-3, epsilon=1e-6, noise_var=1e-5)      # forward(embed, state)
    kl_loss(input, target, reduction="batchmean")
    sym_kl_loss(input, target, reduction="sum", alpha=1.0)
    js_loss(input, target, reduction="sum", alpha=1.0)
    inf_norm(x)

The losses take logits [..., V] and reduce as ``F.kl_div`` does over the *elements*:
``"sum"``; ``"batchmean"`` = sum / ``input.shape[0]`` (the first dim, also for [B, T, V]);
``"mean"`` = sum / ``input.numel()``; ``"none"`` = the elementwise [..., V] terms.

Where the kernels apply (a row-reducing reduction; input and target of one shape, floating dtype
and device; V > 0) the loss runs on :func:`smart_kernels.kl` / :func:`smart_kernels.sym_kl`;
otherwise (``reduction="none"``, broadcasting shapes, mixed dtypes, ...) it runs smart-pytorch's
own PyTorch formula, so that every call gives what smart-pytorch gives, errors included.

Differences from smart-pytorch (deliberate):

* float16 / bfloat16 logits: the kernels compute in float32 and return a float32 loss, where
  smart-pytorch computes and returns in the logits' dtype (under autocast both are float32).
* ``SMARTLoss.forward`` raises ``ValueError`` for a ``num_steps`` that is not a whole number
  >= 0 (smart-pytorch's loop would never end). The ascent steps run under ``enable_grad`` (so a
  call under ``no_grad`` works), and the final noise is detached (smart-pytorch also
  back-propagates into its noise; nobody reads that gradient).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smart_kernels.ops._checks import FLOAT_DTYPES
from smart_kernels.ops.perturb import init_noise, perturb_step
from smart_kernels.ops.sym_kl import kl, sym_kl

__all__ = ["SMARTLoss", "inf_norm", "js_loss", "kl_loss", "sym_kl_loss"]

_ROW_REDUCTIONS = ("sum", "batchmean", "mean")


def inf_norm(x: Tensor) -> Tensor:
    """``max |x|`` over the last dim, kept: [..., H] -> [..., 1] (smart-pytorch's ``inf_norm``).

    As ``SMARTLoss``'s ``norm_fn`` (the default) it selects the fused ascent step."""
    return torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Losses


def _kernel_pair(input: object, target: object, reduction: object) -> bool:
    """Whether the kernels compute exactly what ``F.kl_div`` would for these arguments."""
    return (
        isinstance(reduction, str)
        and reduction in _ROW_REDUCTIONS
        and isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dtype in FLOAT_DTYPES
        and target.dtype == input.dtype
        and target.shape == input.shape
        and target.device == input.device
        and input.dim() >= 1
        and input.shape[-1] > 0
    )


def _reduced(fn: Callable[..., Tensor], input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """``fn(input, target, reduction=...)`` (a row kernel) reduced as ``F.kl_div`` reduces.

    ``batchmean`` divides by ``input.shape[0]`` and ``mean`` by ``input.numel()``; the kernels'
    own reductions are used where they coincide (rows = shape[0] for 2-D input; rows * V =
    numel), else the sum is divided here (empty input: NaN, as in PyTorch)."""
    if reduction == "batchmean":
        if input.dim() == 2 and input.shape[0] > 0:
            return fn(input, target, reduction="batchmean")
        return fn(input, target, reduction="sum") / input.shape[0]
    if reduction == "mean" and input.numel() == 0:
        return fn(input, target, reduction="sum") / 0
    return fn(input, target, reduction=reduction)


def _is_one(alpha: object) -> bool:
    return isinstance(alpha, numbers.Real) and not isinstance(alpha, Tensor) and float(alpha) == 1.0


def kl_loss(input: Tensor, target: Tensor, reduction: str = "batchmean") -> Tensor:
    """``KL(softmax(target) || softmax(input))`` = ``F.kl_div(log_softmax(input),
    softmax(target), reduction)``, with gradients into both input and target.

    input, target: logits [..., V]. Returns a scalar, or [..., V] for ``reduction="none"``.
    Kernel: :func:`smart_kernels.kl` (d/d input = P - Q, d/d target = Q (log Q - log P - KL)).
    """
    if _kernel_pair(input, target, reduction):
        return _reduced(kl, input, target, reduction)
    return F.kl_div(F.log_softmax(input, dim=-1), F.softmax(target, dim=-1), reduction=reduction)


def _sym_kl_stop_grad(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    return sym_kl(input, target, reduction=reduction, grad="stop_grad")


def sym_kl_loss(
    input: Tensor, target: Tensor, reduction: str = "sum", alpha: float = 1.0
) -> Tensor:
    """``alpha * KL(sg Q || P) + KL(sg P || Q)`` with ``P = softmax(input)``,
    ``Q = softmax(target)`` (``sg``: detached), as smart-pytorch: each side's gradient is taken
    against the other detached (d/d input = alpha (P - Q), d/d target = Q - P).

    input, target: logits [..., V]. Returns a scalar, or [..., V] for ``reduction="none"``.
    Kernels: alpha == 1 runs one fused :func:`smart_kernels.sym_kl` (``grad="stop_grad"``);
    another alpha (a number or a tensor) runs :func:`smart_kernels.kl` twice.
    ``reduction="none"`` (elementwise output) runs smart-pytorch's PyTorch formula.
    """
    if _kernel_pair(input, target, reduction):
        if _is_one(alpha):
            return _reduced(_sym_kl_stop_grad, input, target, reduction)
        return alpha * _reduced(kl, input, target.detach(), reduction) + _reduced(
            kl, target, input.detach(), reduction
        )
    return alpha * F.kl_div(
        F.log_softmax(input, dim=-1), F.softmax(target.detach(), dim=-1), reduction=reduction
    ) + F.kl_div(
        F.log_softmax(target, dim=-1), F.softmax(input.detach(), dim=-1), reduction=reduction
    )


def js_loss(input: Tensor, target: Tensor, reduction: str = "sum", alpha: float = 1.0) -> Tensor:
    """smart-pytorch's Jensen-Shannon loss ``alpha * (KL(M || P) + KL(M || Q))`` with the
    detached mixture ``M = (P + Q) / 2`` (``F.kl_div`` reductions; PyTorch ops, no kernel).

    input, target: logits [..., V]. Returns a scalar, or [..., V] for ``reduction="none"``.
    """
    mean_proba = 0.5 * (F.softmax(input.detach(), dim=-1) + F.softmax(target.detach(), dim=-1))
    return alpha * (
        F.kl_div(F.log_softmax(input, dim=-1), mean_proba, reduction=reduction)
        + F.kl_div(F.log_softmax(target, dim=-1), mean_proba, reduction=reduction)
    )


# --------------------------------------------------------------------------------------------
# SMARTLoss


def _is_inf_norm(fn: object) -> bool:
    """Ours or smart-pytorch's own ``inf_norm`` (same math): both select the fused step."""
    if fn is inf_norm:
        return True
    return (
        getattr(fn, "__module__", None) == "smart_pytorch.smart_pytorch"
        and getattr(fn, "__name__", None) == "inf_norm"
    )


def _finite_real(value: object, *, positive: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    value = float(value)
    return math.isfinite(value) and (value > 0 if positive else value >= 0)


def _num_steps(value: object) -> int:
    if (
        isinstance(value, numbers.Real)
        and math.isfinite(float(value))
        and float(value) >= 0
        and float(value).is_integer()
    ):
        return int(value)
    raise ValueError(
        f"num_steps: expected a whole number >= 0, got {value!r} (smart-pytorch would loop forever)"
    )


class SMARTLoss(nn.Module):
    """smart-pytorch's ``SMARTLoss`` on the fused ops.

    Args:
        eval_fn: ``eval_fn(embed) -> state``: the model from (perturbed) embeddings [..., H] to
            its output (logits [B, C], [B, T, V], ...).
        loss_fn: ``loss_fn(state_perturbed, state_detached) -> scalar`` for the ascent steps,
            e.g. :func:`sym_kl_loss`, :func:`kl_loss`, :func:`js_loss` or ``F.mse_loss``.
        loss_last_fn: the final loss (default: ``loss_fn``), with gradients into both sides.
        norm_fn: the norm the ascent step divides by, ``[..., H] -> [..., 1]``; the default
            :func:`inf_norm` runs the fused step :func:`smart_kernels.perturb_step`
            (``rule="normalize_sum"``, ``norm="inf"``, ``scope="token"``); any other callable
            runs smart-pytorch's formula ``step / (norm_fn(step) + epsilon)`` in PyTorch.
        num_steps: ascent steps (a whole number >= 0).
        step_size: the ascent step on the noise gradient.
        epsilon: added to the norm.
        noise_var: the initial noise's *standard deviation* (smart-pytorch's name; the noise is
            ``randn_like(embed) * noise_var``).
        fused_noise: keyword-only, not in smart-pytorch. False (default): the initial noise is
            ``torch.randn_like(embed) * noise_var``, the very draw smart-pytorch makes, so with
            one ``torch.manual_seed`` both give the same losses and gradients. True: one fused
            :func:`smart_kernels.init_noise` kernel (its own Philox stream: other numbers).

    ``forward(embed, state)``: embed [..., H] (with its graph), ``state = eval_fn(embed)``.
    Returns ``loss_last_fn(eval_fn(embed + noise), state)`` after ``num_steps`` steps of
    ``noise <- normalize(noise + step_size * d loss_fn(eval_fn(embed + noise), sg state) /
    d noise)``; each step differentiates only w.r.t. the noise (no parameter gradients
    accumulate). The fused step computes in float32 (float64 for float64 embeddings) and rounds
    once, where smart-pytorch rounds each op in the embeddings' dtype.
    """

    def __init__(
        self,
        eval_fn: Callable[[Tensor], Tensor],
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        loss_last_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        norm_fn: Callable[[Tensor], Tensor] = inf_norm,
        num_steps: int = 1,
        step_size: float = 1e-3,
        epsilon: float = 1e-6,
        noise_var: float = 1e-5,
        *,
        fused_noise: bool = False,
    ) -> None:
        super().__init__()
        _num_steps(num_steps)
        self.eval_fn = eval_fn
        self.loss_fn = loss_fn
        self.loss_last_fn = loss_last_fn if loss_last_fn is not None else loss_fn
        self.norm_fn = norm_fn
        self.num_steps = num_steps
        self.step_size = step_size
        self.epsilon = epsilon
        self.noise_var = noise_var
        self.fused_noise = fused_noise

    def _initial_noise(self, embed: Tensor) -> Tensor:
        if self.fused_noise and embed.dim() >= 1 and _finite_real(self.noise_var):
            return init_noise(embed, float(self.noise_var))
        return torch.randn_like(embed) * self.noise_var

    def _fused_step(self, embed: Tensor) -> bool:
        return (
            _is_inf_norm(self.norm_fn)
            and embed.dim() >= 1
            and embed.dtype in FLOAT_DTYPES
            and _finite_real(self.step_size)
            and _finite_real(self.epsilon, positive=True)
        )

    def forward(self, embed: Tensor, state: Tensor) -> Tensor:
        num_steps = _num_steps(self.num_steps)
        noise = self._initial_noise(embed)
        fused = self._fused_step(embed)
        base, target = embed.detach(), state.detach()
        for _ in range(num_steps):
            noise = noise.detach().requires_grad_()
            with torch.enable_grad():
                loss = self.loss_fn(self.eval_fn(base + noise), target)
                (grad,) = torch.autograd.grad(loss, noise)
            if fused:
                noise = perturb_step(
                    noise.detach(), grad, step_size=float(self.step_size), radius=None,
                    norm="inf", scope="token", rule="normalize_sum", eps=float(self.epsilon),
                )  # fmt: skip
            else:
                with torch.no_grad():
                    step = noise + self.step_size * grad
                    noise = step / (self.norm_fn(step) + self.epsilon)
        return self.loss_last_fn(self.eval_fn(embed + noise.detach()), state)
