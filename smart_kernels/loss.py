"""``SMARTLoss``: SMART's smoothness-inducing adversarial regularizer R_s (Jiang et al., ACL 2020),
assembled from the fused ops, and ``bregman_loss`` for the momentum-teacher term.

    R_s = ℓ_s(f(x + δ), f(x)),  δ = S steps of projected ascent from δ₀ ~ N(0, σ²):
    δ ← Π_ε(δ + η · normalize(∂ℓ_s(f(x + δ), sg f(x)) / ∂δ))      (rule="paper")

The full objective is ``L + λ_s·R_s + μ·D_Breg`` with ``D_Breg = ℓ_s(f(x; θ), f(x; θ̃))`` against a
:class:`~smart_kernels.MomentumTeacher` θ̃. One training step (README, "SMART in a training step")::

    embed = model.get_input_embeddings()(input_ids)          # WORD embeddings only
    logits = model(inputs_embeds=embed, attention_mask=am).logits
    eval_fn = lambda e: model(inputs_embeds=e, attention_mask=am).logits
    loss = task_loss(logits, labels) + lambda_s * smart(eval_fn, embed, logits, mask=am)
    teacher_logits = teacher(input_ids=input_ids, attention_mask=am).logits
    loss = loss + mu * sk.bregman_loss(logits, teacher_logits)
    loss.backward(); optimizer.step(); teacher.update(model)

Perturb the word embeddings and feed them as ``inputs_embeds``: the model adds position / type
embeddings and LayerNorm itself. Feeding the output of the whole embeddings module back as
``inputs_embeds`` applies those twice (a bug of both public implementations).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from smart_kernels.ops._checks import check_choice, check_float_tensor, check_number
from smart_kernels.ops.perturb import NORM_CODES, RULE_CODES, SCOPE_CODES, init_noise, perturb_step
from smart_kernels.ops.sym_kl import REDUCTIONS, sym_kl

LOSSES = ("sym_kl", "mse")
GRAD_MODES = ("full", "stop_grad")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_bool_mask(name: str, mask: object, shape: torch.Size, what: str) -> torch.Tensor | None:
    """``mask`` (None, or a bool/int tensor of ``shape``) as a bool tensor; clear errors."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or None, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)} ({what}), got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    grad: str = "full",
) -> torch.Tensor:
    """Squared error between predictions [..., C] per row, ``sum_c (input - target)^2``, reduced
    like :func:`smart_kernels.sym_kl` (``batchmean``: over counted rows). ``grad`` is accepted
    for symmetry with sym_kl: for the squared error the gradient each side gets against the
    other detached, ``±2 (input - target)``, is the exact gradient, so both modes are one."""
    check_choice("grad", grad, GRAD_MODES)
    diff = input - target
    rows = (diff * diff).sum(-1)
    rows = rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = mask.sum().clamp(min=1).to(total.dtype) if mask is not None else max(rows.numel(), 1)
    if reduction == "mean":
        count = count * input.shape[-1]
    return total / count


def bregman_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    loss: str = "sym_kl",
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    backend: str | None = None,
) -> torch.Tensor:
    """SMART's momentum Bregman term ``D_Breg = ℓ_s(f(x; θ), f(x; θ̃))``: ``logits`` [..., C] of
    the model, ``teacher_logits`` of the teacher (detached here: the teacher is not trained).
    ``loss``: ``"sym_kl"`` (classification) or ``"mse"`` (regression; also used for logits
    with one column, as in :class:`SMARTLoss`: a softmax over one class is constant, its
    symmetric KL always 0); ``mask``: bool [...]. Teacher logits of another floating dtype
    (e.g. fp32 from a teacher run outside autocast, bf16 student logits) are cast to ``logits``'
    dtype."""
    check_choice("loss", loss, LOSSES)
    check_float_tensor("logits", logits)
    check_float_tensor("teacher_logits", teacher_logits)
    target = teacher_logits.detach().to(logits.dtype)
    if loss == "mse" or logits.shape[-1] == 1:
        return mse_loss(logits, target, reduction=reduction, mask=mask)
    return sym_kl(logits, target, reduction=reduction, mask=mask, backend=backend)


class SMARTLoss(nn.Module):
    """SMART's adversarial smoothness regularizer ``R_s`` on the word embeddings.

    Args:
        eval_fn: ``eval_fn(embed, **eval_kwargs) -> logits``: the model from (perturbed) word
            embeddings [B, T, H] to logits [B, C] (sequence level) or [B, T, C] (token level).
            Under DDP, call the module inside the wrapper (``ddp_model.module``): the backward
            of the task forward all-reduces every gradient (README, "Distributed training").
        loss: ``"sym_kl"`` (classification), ``"mse"`` (regression) or a callable
            ``loss(input, target) -> scalar``. Logits with a last dim of 1 use ``"mse"`` even
            when ``"sym_kl"`` is asked for (a softmax over one class is constant).
        num_steps: ascent steps S (>= 0).
        step_size: η; noise_std: σ of the initial noise; radius: ε of the projection (None: none).
        norm: ``"inf"``, ``"l2"`` or ``"l1"``; scope: ``"token"`` or ``"sequence"``.
        rule: ``"paper"`` (projected normalized-gradient ascent) or ``"normalize_sum"``
            (mt-dnn / smart-pytorch).
        grad: ``"full"`` (exact gradients of ℓ_s into both f(x + δ) and f(x)) or ``"stop_grad"``
            (each side against the other detached; mt-dnn's symmetric KL); used in the ascent
            steps too.
        reduction: of ℓ_s over rows: ``"batchmean"``, ``"sum"`` or ``"mean"``.
        eps: added to the norms in ``normalize``.
        backend: kernel backend of the fused ops (None: auto).

    ``forward(embed, logits, *, mask=None, loss_mask=None, **eval_kwargs)``:
        embed: word embeddings [B, T, H] that produced ``logits`` (with their graph);
        logits: ``eval_fn(embed)`` [B, C] or [B, T, C], with gradients to the model;
        mask: bool/int [B, T] (e.g. the attention mask): padding gets no noise and is left out
            of the norms; for token-level logits it is also the default ``loss_mask``.
        loss_mask: bool/int ``logits.shape[:-1]``: the rows of ℓ_s that count, in the ascent
            steps and in R_s (e.g. the tokens that carry a label, where every attended token
            still gets noise). Default: ``mask`` for token-level logits, else every row.
        Returns the scalar ``R_s``: the noise is initialised and moved by ``num_steps`` ascent
        steps, each differentiating only w.r.t. the noise (no parameter gradients accumulate),
        then ``ℓ_s(f(embed + δ), logits)`` is returned with gradients into the model. Nothing
        synchronizes the host; works under autocast and with a compiled model.
    """

    def __init__(
        self,
        eval_fn: Callable[..., torch.Tensor],
        *,
        loss: str | LossFn = "sym_kl",
        num_steps: int = 1,
        step_size: float = 1e-3,
        noise_std: float = 1e-5,
        radius: float | None = 1e-5,
        norm: str = "inf",
        scope: str = "token",
        rule: str = "paper",
        grad: str = "full",
        reduction: str = "batchmean",
        eps: float = 1e-6,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not callable(eval_fn):
            raise TypeError(f"eval_fn: expected a callable, got {type(eval_fn).__name__}")
        if isinstance(eval_fn, DistributedDataParallel) and getattr(eval_fn, "static_graph", 0):
            raise ValueError(
                "eval_fn: a DDP module with static_graph=True expects one forward per backward; "
                "the adversarial forwards would corrupt its gradients: pass eval_fn=model.module"
            )
        if not callable(loss):
            check_choice("loss", loss, LOSSES)
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps: expected an int >= 0, got {num_steps!r}")
        check_number("step_size", step_size)
        check_number("noise_std", noise_std)
        check_number("radius", radius, allow_none=True)
        check_number("eps", eps, positive=True)  # > 0: an all-zero group would be 0/0
        check_choice("norm", norm, tuple(NORM_CODES))
        check_choice("scope", scope, tuple(SCOPE_CODES))
        check_choice("rule", rule, tuple(RULE_CODES))
        check_choice("grad", grad, GRAD_MODES)
        check_choice("reduction", reduction, tuple(r for r in REDUCTIONS if r != "none"))
        self.eval_fn = eval_fn
        self.loss = loss
        self.num_steps = num_steps
        self.step_size = step_size
        self.noise_std = noise_std
        self.radius = radius
        self.norm = norm
        self.scope = scope
        self.rule = rule
        self.grad = grad
        self.reduction = reduction
        self.eps = eps
        self.backend = backend
        self._warned_dtypes: set[torch.dtype] = set()

    def perturbation_scale(self) -> float:
        """The largest |δ| element the configuration allows, roughly: ``radius`` (paper rule),
        ``noise_std + num_steps * step_size`` without projection, ~1 for ``normalize_sum``
        (its δ is a normalized direction), ``noise_std`` without ascent steps."""
        if self.num_steps == 0:
            return self.noise_std
        if self.rule == "normalize_sum":
            return 1.0
        if self.radius is not None:
            return self.radius
        return self.noise_std + self.num_steps * self.step_size

    def _warn_if_rounded_away(self, dtype: torch.dtype) -> None:
        """Once per dtype: δ far below the resolution of low-precision embeddings is rounded
        away by ``embed + δ`` (R_s ≈ 0, SMART silently off). A static check: no host sync."""
        if dtype not in (torch.float16, torch.bfloat16) or dtype in self._warned_dtypes:
            return
        self._warned_dtypes.add(dtype)
        resolution = torch.finfo(dtype).eps
        scale = self.perturbation_scale()
        if scale < 0.1 * resolution:
            warnings.warn(
                f"SMARTLoss: embed is {dtype}, whose relative resolution is {resolution:.3g}; "
                f"a perturbation of at most ~{scale:.3g} is rounded away from embeddings of "
                f"magnitude above ~{scale / resolution:.3g} (R_s ≈ 0). Keep the word "
                "embeddings in float32 (float32 weights under autocast) or raise radius.",
                stacklevel=3,
            )

    def extra_repr(self) -> str:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "fn")
        return (
            f"loss={loss}, num_steps={self.num_steps}, step_size={self.step_size}, "
            f"noise_std={self.noise_std}, radius={self.radius}, norm={self.norm}, "
            f"scope={self.scope}, rule={self.rule}, grad={self.grad}"
        )

    def divergence(
        self, input: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None, grad: str
    ) -> torch.Tensor:
        """ℓ_s(input, target) over the rows ``rows`` (bool input.shape[:-1], None: all) as
        configured (``grad`` and ``rows`` apply to the built-in losses)."""
        if callable(self.loss):
            return self.loss(input, target)
        if self.loss == "mse" or input.shape[-1] == 1:
            return mse_loss(input, target, reduction=self.reduction, mask=rows, grad=grad)
        return sym_kl(
            input, target, reduction=self.reduction, grad=grad, mask=rows, backend=self.backend
        )

    def forward(
        self,
        embed: torch.Tensor,
        logits: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        **eval_kwargs,
    ) -> torch.Tensor:
        check_float_tensor("embed", embed)
        check_float_tensor("logits", logits)
        if embed.dim() < 2:
            raise ValueError(f"embed: expected [..., T, H], got shape {tuple(embed.shape)}")
        self._warn_if_rounded_away(embed.dtype)
        mask = _as_bool_mask("mask", mask, embed.shape[:-1], "embed's leading dims")
        rows = _as_bool_mask("loss_mask", loss_mask, logits.shape[:-1], "logits' leading dims")
        if rows is None and mask is not None and mask.shape == logits.shape[:-1]:
            rows = mask  # token-level logits: padding rows do not count
        step = dict(
            step_size=self.step_size, radius=self.radius, norm=self.norm, scope=self.scope,
            rule=self.rule, eps=self.eps, mask=mask, backend=self.backend,
        )  # fmt: skip
        noise = init_noise(embed, self.noise_std, mask=mask, backend=self.backend)
        target = logits.detach()
        base = embed.detach()
        for _ in range(self.num_steps):
            noise.requires_grad_()
            # The ascent needs only d loss / d noise: autograd.grad accumulates no parameter
            # gradient, and the clean logits are a constant here.
            with torch.enable_grad():
                adv = self.eval_fn(base + noise, **eval_kwargs)
                inner = self.divergence(adv, target, rows, self.grad)
                (g,) = torch.autograd.grad(inner, noise)
            noise = perturb_step(noise.detach(), g, **step)
        adv = self.eval_fn(embed + noise, **eval_kwargs)
        return self.divergence(adv, logits, rows, self.grad)
