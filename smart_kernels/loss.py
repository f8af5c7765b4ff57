"""``SMARTLoss``: SMART's smoothness-inducing adversarial regularizer R_s (Jiang et al., ACL 2020),
assembled from the fused ops, and ``bregman_loss`` for the momentum-teacher term.

    R_s = ℓ_s(f(x + δ), f(x)),  δ = S steps of projected ascent from δ₀ ~ N(0, σ²):
    δ ← Π_ε(δ + η · normalize(∂ℓ_s(f(x + δ), sg f(x)) / ∂δ))      (rule="paper")

The full objective is ``L + λ_s·R_s + μ·D_Breg`` with ``D_Breg = ℓ_s(f(x; θ), f(x; θ̃))`` against a
:class:`~smart_kernels.MomentumTeacher` θ̃. One training step (README, "SMART in a training step")::

    smart = SMARTLoss(lambda e, **kw: model(inputs_embeds=e, **kw).logits)   # once
    embed = model.get_input_embeddings()(input_ids)          # WORD embeddings only
    logits = model(inputs_embeds=embed, attention_mask=am).logits
    loss = task_loss(logits, labels) + lambda_s * smart(embed, logits, mask=am, attention_mask=am)
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

from smart_kernels import _backends
from smart_kernels.ops._checks import (
    check_choice,
    check_float_tensor,
    check_number,
    check_row_mask,
    check_same,
)
from smart_kernels.ops.perturb import NORM_CODES, RULE_CODES, SCOPE_CODES, init_noise, perturb_step
from smart_kernels.ops.sym_kl import REDUCTIONS, sym_kl

LOSSES = ("sym_kl", "mse")
GRAD_MODES = ("full", "stop_grad")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_bool_mask(
    name: str, mask: object, like: torch.Tensor, like_name: str
) -> torch.Tensor | None:
    """``mask`` (argument ``name``: None, or a bool/int tensor of shape ``like.shape[:-1]`` on
    like's device) as a bool tensor; an integer mask (e.g. an attention mask) is ``!= 0``."""
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"{name}: expected a bool or integer tensor, got {mask.dtype}")
        mask = mask != 0
    check_row_mask(mask, like, like_name, name)
    return mask


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
    check_choice("reduction", reduction, REDUCTIONS)
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
    symmetric KL always 0); ``mask``: bool/int [...] (``logits.shape[:-1]``), the rows that
    count; ``reduction``: ``"batchmean"`` (over counted rows), ``"sum"``, ``"mean"`` or
    ``"none"`` (per row), as :func:`smart_kernels.sym_kl`; ``backend``: of the fused sym_kl
    (None: auto). Teacher logits of another floating dtype (e.g. fp32 from a teacher run
    outside autocast, bf16 student logits) are cast to ``logits``' dtype; their shape and device
    must be those of ``logits``."""
    check_choice("loss", loss, LOSSES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_float_tensor("logits", logits)
    check_float_tensor("teacher_logits", teacher_logits)
    if logits.dim() == 0:
        raise ValueError("logits: expected shape [..., C], got a 0-d tensor")
    target = teacher_logits.detach().to(logits.dtype)
    check_same("teacher_logits", target, "logits", logits)
    mask = _as_bool_mask("mask", mask, logits, "logits")
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

    ``forward(embed, logits, *, mask=None, loss_mask=None, **eval_kwargs)`` returns the scalar
    ``R_s`` (see :meth:`forward`): the noise is initialised and moved by ``num_steps`` ascent
    steps, each differentiating only w.r.t. the noise (no parameter gradients accumulate), then
    ``ℓ_s(f(embed + δ), logits)`` is returned with gradients into the model. Nothing
    synchronizes the host; works under autocast and with a compiled model.

    In train mode ``eval_fn`` draws fresh dropout masks, so R_s also measures the difference
    the dropout makes between the clean and the perturbed forward; mt-dnn (the paper's code) and
    smart-pytorch do the same. Under low-precision autocast the paper's δ (1e-5) is mostly
    rounded away by the first matmul after the embeddings (a warning says so): run SMART in
    float32 or raise ``radius`` / ``noise_std``.
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
        _backends.check_name(backend)
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
        self._warned_dtypes: set[tuple[torch.dtype, bool]] = set()

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

    def _warn_if_rounded_away(self, dtype: torch.dtype, autocast: bool = False) -> None:
        """Once per dtype (and autocast or not): δ far below the resolution of low-precision
        embeddings is rounded away by ``embed + δ``, and under low-precision autocast by the
        first matmul after the embeddings, whose inputs (normalized activations of magnitude
        ~1) are rounded to that dtype (R_s ≈ 0 or mostly rounding noise). A static check on the
        configuration: no host sync."""
        key = (dtype, autocast)
        if dtype not in (torch.float16, torch.bfloat16) or key in self._warned_dtypes:
            return
        self._warned_dtypes.add(key)
        resolution = torch.finfo(dtype).eps
        scale = self.perturbation_scale()
        if scale >= 0.1 * resolution:
            return
        if autocast:
            what = (
                f"under {dtype} autocast the matmuls round their inputs to a relative resolution "
                f"of {resolution:.3g}, so a perturbation of at most ~{scale:.3g} mostly "
                "vanishes after the embeddings (R_s is then mostly rounding noise). Run the "
                "SMART forwards in float32 (outside autocast) or raise radius / noise_std."
            )
        else:
            what = (
                f"embed is {dtype}, whose relative resolution is {resolution:.3g}; a "
                f"perturbation of at most ~{scale:.3g} is rounded away from embeddings of "
                f"magnitude above ~{scale / resolution:.3g} (R_s ≈ 0). Keep the word "
                "embeddings in float32 or raise radius / noise_std."
            )
        warnings.warn(f"SMARTLoss: {what}", stacklevel=5)  # the caller of smart(...)

    def _eval(self, x: torch.Tensor, like: torch.Tensor, eval_kwargs: dict) -> torch.Tensor:
        """eval_fn(x, **eval_kwargs), checked to be logits of ``like``'s shape. An exception
        from eval_fn gets a note with the shapes (a call with embed and logits swapped fails
        inside the model)."""
        try:
            out = self.eval_fn(x, **eval_kwargs)
        except Exception as error:
            if hasattr(error, "add_note") and not isinstance(error, torch.OutOfMemoryError):
                error.add_note(
                    f"SMARTLoss: this came from eval_fn(embed + noise) with embed of shape "
                    f"{tuple(x.shape)} and logits of shape {tuple(like.shape)}; forward takes "
                    "(embed, logits): the word embeddings first, then the logits eval_fn "
                    "computed from them"
                )
            raise
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"eval_fn: expected it to return a logits tensor, got {type(out).__name__} "
                "(for a Hugging Face model return its .logits)"
            )
        if out.shape != like.shape:
            raise ValueError(
                f"logits: expected the shape of eval_fn(embed) {tuple(out.shape)}, got "
                f"{tuple(like.shape)} (pass the logits computed from this embed)"
            )
        return out

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
            value = self.loss(input, target)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(f"loss: a callable loss must return a 0-d tensor, got {got}")
            return value
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
        """R_s for one batch.

        Args:
            embed: word embeddings [B, T, H] that produced ``logits`` (with their graph).
            logits: ``eval_fn(embed, **eval_kwargs)``: [B, C] or [B, T, C], with gradients to
                the model.
            mask: bool/int [B, T] (e.g. the attention mask): padding gets no noise and is left
                out of the norms; for token-level logits also the default ``loss_mask``.
            loss_mask: bool/int ``logits.shape[:-1]``: the rows of ℓ_s that count, in the ascent
                steps and in R_s (e.g. the tokens that carry a label, where every attended token
                still gets noise). Default: ``mask`` for token-level logits, else every row.
            **eval_kwargs: passed to ``eval_fn`` (e.g. ``attention_mask=``).

        Returns:
            The scalar R_s = ℓ_s(f(embed + δ), logits), with gradients into the model (the
            ascent steps differentiate only w.r.t. the noise). No host synchronization.
        """
        check_float_tensor("embed", embed)
        check_float_tensor("logits", logits)
        if embed.dim() < 2:
            raise ValueError(f"embed: expected [..., T, H], got shape {tuple(embed.shape)}")
        if logits.dim() == 0:
            raise ValueError("logits: expected [B, C] or [B, T, C], got a 0-d tensor")
        self._warn_if_rounded_away(embed.dtype)
        device_type = embed.device.type
        if torch.is_autocast_enabled(device_type):
            self._warn_if_rounded_away(torch.get_autocast_dtype(device_type), autocast=True)
        mask = _as_bool_mask("mask", mask, embed, "embed")
        rows = _as_bool_mask("loss_mask", loss_mask, logits, "logits")
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
                adv = self._eval(base + noise, logits, eval_kwargs)
                inner = self.divergence(adv, target, rows, self.grad)
                (g,) = torch.autograd.grad(inner, noise)
            noise = perturb_step(noise.detach(), g, **step)
        adv = self._eval(embed + noise, logits, eval_kwargs)
        return self.divergence(adv, logits, rows, self.grad)
