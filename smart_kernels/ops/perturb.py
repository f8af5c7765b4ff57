"""Adversarial perturbation ops: ``normalize``, ``perturb_step``, ``init_noise`` (DESIGN §3).

Validation, dispatch to a backend, and autograd for ``normalize``:
* native: ``torch.ops.smart_kernels.normalize / normalize_bwd / perturb_step / init_noise``
  (csrc/cpu/perturb.cpp, csrc/cuda/perturb.cu; the shared math is csrc/perturb_math.h);
* triton: ``torch.ops.smart_kernels.*_triton`` defined here (kernels in
  smart_kernels/triton/perturb.py);
* reference: smart_kernels/reference.py.
The autograd formula of ``normalize`` (registered here for the native and the triton op) calls
the matching ``normalize_bwd``. Every op has a fake, so all run under
``torch.compile(fullgraph=True)``. ``perturb_step`` and ``init_noise`` are never differentiated.
"""

from __future__ import annotations

import math

import torch

from smart_kernels import _backends, reference
from smart_kernels.ops._checks import (
    check_choice,
    check_float_tensor,
    check_number,
    check_row_mask,
    check_same,
)

NORM_CODES = {"inf": 0, "l2": 1, "l1": 2}  # csrc/perturb_math.h
SCOPE_CODES = {"token": 0, "sequence": 1}
RULE_CODES = {"paper": 0, "normalize_sum": 1}
OP = "perturb"  # the key for backend choice (_backends.GPU_PREFERENCE)


# --------------------------------------------------------------------------------------------
# Triton ops: the same contracts as the native schemas in csrc/smart_kernels.cpp.


@torch.library.custom_op("smart_kernels::normalize_triton", mutates_args=())
def _normalize_triton(x: torch.Tensor, norm: int, scope: int, eps: float) -> torch.Tensor:
    from smart_kernels.triton import perturb as kernels

    return kernels.normalize(x, norm, scope, eps)


@torch.library.custom_op("smart_kernels::normalize_bwd_triton", mutates_args=())
def _normalize_bwd_triton(
    grad_y: torch.Tensor, x: torch.Tensor, norm: int, scope: int, eps: float
) -> torch.Tensor:
    from smart_kernels.triton import perturb as kernels

    return kernels.normalize_bwd(grad_y, x, norm, scope, eps)


@torch.library.custom_op("smart_kernels::perturb_step_triton", mutates_args=())
def _perturb_step_triton(
    noise: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    step_size: float,
    radius: float,
    norm: int,
    scope: int,
    rule: int,
    eps: float,
) -> torch.Tensor:
    from smart_kernels.triton import perturb as kernels

    return kernels.perturb_step(noise, grad, mask, step_size, radius, norm, scope, rule, eps)


@torch.library.custom_op("smart_kernels::init_noise_triton", mutates_args=())
def _init_noise_triton(
    like: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor, std: float
) -> torch.Tensor:
    from smart_kernels.triton import perturb as kernels

    return kernels.init_noise(like, mask, seed, std)


# --------------------------------------------------------------------------------------------
# Fakes and the autograd of normalize (native and triton).


def _like_first(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _like_second(grad_y, x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_normalize(ctx, inputs, output):
    x, norm, scope, eps = inputs
    ctx.save_for_backward(x)
    ctx.args = (norm, scope, eps)


def _make_normalize_backward(bwd_op):
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' gradient is final
            raise RuntimeError(
                "smart_kernels normalize (kernel backends): double backward (create_graph=True) "
                'is not supported; use backend="reference" for higher-order gradients'
            )
        (x,) = ctx.saved_tensors
        return bwd_op(grad_y.contiguous(), x, *ctx.args), None, None, None

    return backward


for _name in ("normalize_triton", "normalize_bwd_triton", "perturb_step_triton"):
    torch.library.register_fake(f"smart_kernels::{_name}")(
        _like_second if _name == "normalize_bwd_triton" else _like_first
    )
torch.library.register_fake("smart_kernels::init_noise_triton")(_like_first)
torch.library.register_autograd(
    "smart_kernels::normalize_triton",
    _make_normalize_backward(_normalize_bwd_triton),
    setup_context=_setup_normalize,
)
if _backends._NATIVE_ERROR is None:
    for _name in ("normalize", "perturb_step", "init_noise"):
        torch.library.register_fake(f"smart_kernels::{_name}")(_like_first)
    torch.library.register_fake("smart_kernels::normalize_bwd")(_like_second)
    torch.library.register_autograd(
        "smart_kernels::normalize",
        _make_normalize_backward(torch.ops.smart_kernels.normalize_bwd),
        setup_context=_setup_normalize,
    )


# --------------------------------------------------------------------------------------------
# Validation (before any kernel; never reads device memory).


def _check_embeddings(name: str, x: object, scope: str) -> None:
    check_float_tensor(name, x)
    need = 2 if scope == "sequence" else 1
    if x.dim() < need:
        dims = "[..., T, H]" if scope == "sequence" else "[..., H]"
        raise ValueError(
            f"{name}: scope={scope!r} needs a tensor of shape {dims}, got {tuple(x.shape)}"
        )


def _contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.contiguous()


# --------------------------------------------------------------------------------------------
# Public entry points.


def normalize(
    x: torch.Tensor,
    *,
    norm: str = "inf",
    scope: str = "token",
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Normalize ``x`` per group: ``x / (max|x| + eps)`` (``"inf"``), ``x / (||x||_2 + eps)``
    (``"l2"``) or ``sign(x)`` (``"l1"``).

    Args:
        x: [..., H] (token scope: each row of H is a group) or [..., T, H] (sequence scope: each
            [T, H] slice is a group); float16/bfloat16/float32/float64.
        norm: ``"inf"``, ``"l2"`` or ``"l1"``.
        scope: ``"token"`` or ``"sequence"``.
        eps: added to the norm (> 0: an all-zero group then normalizes to zeros, not NaN).
        backend: ``None`` (auto), ``"reference"``, ``"native"`` or ``"triton"``.

    Returns:
        A tensor of x's shape and dtype (computed in fp32, fp64 for fp64). Differentiable: for
        ``"inf"`` the gradient flows through the max (ties split evenly, as ``amax``); ``"l1"``
        has zero gradient. Kernel backends give first-order gradients only.
    """
    check_choice("scope", scope, tuple(SCOPE_CODES))
    _check_embeddings("x", x, scope)
    check_choice("norm", norm, tuple(NORM_CODES))
    check_number("eps", eps, positive=True)
    name = _backends.choose(OP, backend, x.device, "normalize")
    if x.numel() == 0:
        return x * 0  # empty (a group may even be empty): nothing to normalize, graph kept
    if name == "reference":
        return reference.normalize(x, norm=norm, scope=scope, eps=eps)
    args = (_contig(x), NORM_CODES[norm], SCOPE_CODES[scope], float(eps))
    if name == "native":
        return torch.ops.smart_kernels.normalize(*args)
    return _normalize_triton(*args)


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
    backend: str | None = None,
) -> torch.Tensor:
    """One projected ascent step on the embedding noise, in one fused pass; returns the new noise.

    ``rule="paper"`` (SMART): ``Π(noise + step_size * normalize(grad))``, where Π clamps each
    element to [-radius, radius] (``norm="inf"``) or rescales the group to norm <= radius
    (``"l2"``, ``"l1"``); ``radius=None`` skips Π. ``rule="normalize_sum"`` (mt-dnn /
    smart-pytorch): ``normalize(noise + step_size * grad)`` (``radius`` is not used).
    A group whose gradient is all zero gets no NaN (``normalize`` of zeros is zeros, eps > 0):
    with the paper rule it keeps its noise, projected.

    Args:
        noise: [..., H] or [..., T, H] (see :func:`normalize` for the scopes).
        grad: the gradient of the loss w.r.t. the noise: noise's shape, dtype and device.
        step_size, radius: numbers >= 0 (radius may be None); eps: > 0, added to the norms.
        mask: optional bool [...] = noise.shape[:-1], one flag per token (e.g. an attention
            mask): a False token gets zero noise and is left out of the group's norm.
        backend: ``None`` (auto), ``"reference"``, ``"native"`` or ``"triton"``.

    Returns:
        The new noise, noise's shape and dtype (computed in fp32, fp64 for fp64); never part of
        the autograd graph.
    """
    check_choice("scope", scope, tuple(SCOPE_CODES))
    _check_embeddings("noise", noise, scope)
    check_float_tensor("grad", grad)
    check_same("grad", grad, "noise", noise)
    check_choice("norm", norm, tuple(NORM_CODES))
    check_choice("rule", rule, tuple(RULE_CODES))
    check_number("step_size", step_size)
    check_number("radius", radius, allow_none=True)
    check_number("eps", eps, positive=True)
    check_row_mask(mask, noise, "noise")
    name = _backends.choose(OP, backend, noise.device, "perturb_step")
    noise, grad = noise.detach(), grad.detach()
    if noise.numel() == 0:
        return torch.empty_like(noise, memory_format=torch.contiguous_format)
    if name == "reference":
        return reference.perturb_step(
            noise, grad, step_size=step_size, radius=radius, norm=norm, scope=scope, rule=rule,
            eps=eps, mask=mask,
        )  # fmt: skip
    args = (
        _contig(noise), _contig(grad), None if mask is None else _contig(mask), float(step_size),
        math.inf if radius is None else float(radius), NORM_CODES[norm], SCOPE_CODES[scope],
        RULE_CODES[rule], float(eps),
    )  # fmt: skip
    if name == "native":
        return torch.ops.smart_kernels.perturb_step(*args)
    return _perturb_step_triton(*args)


def init_noise(
    like: torch.Tensor,
    std: float = 1e-5,
    *,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Gaussian noise ``N(0, std^2)`` shaped like ``like``, zero where ``mask`` is False.

    Args:
        like: [..., H]: the noise takes its shape, dtype and device (float16/bfloat16/
            float32/float64).
        std: the standard deviation (>= 0).
        mask: optional bool [...] = like.shape[:-1]: False tokens get zero noise.
        generator: a ``torch.Generator`` on like's device: the noise is reproducible from its
            state (one 64-bit seed is drawn from it per call, on the device: no host sync).
        backend: ``None`` (auto), ``"reference"`` (``torch.randn``), ``"native"`` (Philox4x32-10
            + Box-Muller, the same numbers on CPU and CUDA) or ``"triton"`` (the same generator,
            the same numbers up to the last bits of log / cos / sin).

    Returns:
        The noise (like's shape and dtype); does not require grad.
    """
    check_float_tensor("like", like)
    if like.dim() == 0:
        raise ValueError("like: expected a tensor of shape [..., H], got a 0-d tensor")
    check_number("std", std)
    check_row_mask(mask, like, "like")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            kind = type(generator).__name__
            raise TypeError(f"generator: expected a torch.Generator, got {kind}")
        if generator.device.type != like.device.type:
            raise ValueError(
                f"generator: expected a generator on {like.device.type} (like's device), "
                f"got one on {generator.device}"
            )
    name = _backends.choose(OP, backend, like.device, "init_noise")
    if name == "reference" or like.numel() == 0:
        return reference.init_noise(like.detach(), std, mask=mask, generator=generator)
    seed = torch.randint(
        0, 2**63 - 1, (), generator=generator, device=like.device, dtype=torch.int64
    )
    args = (like.detach(), None if mask is None else _contig(mask), seed, float(std))
    if name == "native":
        return torch.ops.smart_kernels.init_noise(*args)
    return _init_noise_triton(*args)
