"""``sym_kl`` and ``kl``: validation, autograd, dispatch to a backend, reduction.

The kernels work on rows [N, V] and return per-row values plus per-row statistics [N, 6] that
the backward reuses:
* native: ``torch.ops.smart_kernels.sym_kl_fwd/_bwd`` (csrc/cpu, csrc/cuda) under the
  differentiable ``torch.ops.smart_kernels.sym_kl`` whose autograd is C++
  (csrc/autograd/sym_kl.cpp) to keep the eager call cheap;
* triton: ``torch.ops.smart_kernels.sym_kl_fwd_triton/_bwd_triton`` (defined here), with the
  autograd formula registered here.
The forward kernels also reduce (out = sum(rows) * scale, or the rows for "none") and return the
0-d ``scale`` that the backward applies to every row's gradient.
Every op has a fake (meta) implementation, so both run under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from smart_kernels import _backends, reference
from smart_kernels.ops._checks import check_choice, check_logits_pair, check_row_mask

REDUCTIONS = ("batchmean", "sum", "mean", "none")
REDUCTION_CODES = {"none": 0, "sum": 1, "batchmean": 2, "mean": 3}  # csrc/checks.h
STATS_PER_ROW = 6  # csrc/acc_type.h
GRAD_MODES = {"full": 0, "stop_grad": 1}
KL_MODE = 2


# --------------------------------------------------------------------------------------------
# Triton ops (defined in Python; the kernels are imported on first use). Same contract as the
# native sym_kl_fwd / sym_kl_bwd (csrc/smart_kernels.cpp).


@torch.library.custom_op("smart_kernels::sym_kl_fwd_triton", mutates_args=())
def _sym_kl_fwd_triton(
    input: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    mode: int,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from smart_kernels.triton import sym_kl as kernels

    return kernels.sym_kl_fwd(input, target, mask, mode, reduction)


@torch.library.custom_op("smart_kernels::sym_kl_bwd_triton", mutates_args=())
def _sym_kl_bwd_triton(
    grad_out: torch.Tensor,
    scale: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    mode: int,
    need_input: bool,
    need_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from smart_kernels.triton import sym_kl as kernels

    return kernels.sym_kl_bwd(
        grad_out, scale, input, target, mask, stats, mode, need_input, need_target
    )


# --------------------------------------------------------------------------------------------
# Fake implementations (native and triton ops) and the triton autograd formula.


def _fwd_fake(input, target, mask, mode, reduction):
    acc = reference.acc_dtype(input.dtype)
    n = input.shape[0]
    out_shape = (n,) if reduction == REDUCTION_CODES["none"] else ()
    return (
        input.new_empty(out_shape, dtype=acc),
        input.new_empty((n, STATS_PER_ROW), dtype=acc),
        input.new_empty((), dtype=acc),
    )


def _bwd_fake(grad_out, scale, input, target, mask, stats, mode, need_input, need_target):
    ga = input.new_empty(input.shape if need_input else (0,))
    gb = input.new_empty(input.shape if need_target else (0,))
    return ga, gb


def _sym_kl_fake(input, target, mask, mode, reduction):
    acc = reference.acc_dtype(input.dtype)
    shape = input.shape[:-1] if reduction == REDUCTION_CODES["none"] else ()
    return input.new_empty(shape, dtype=acc)


def _triton_setup_context(ctx, inputs, output):
    input, target, mask, mode, _ = inputs
    _, stats, scale = output
    ctx.save_for_backward(input, target, mask, stats, scale)
    ctx.mode = mode


def _triton_backward(ctx, grad_out, _grad_stats, _grad_scale):
    if torch.is_grad_enabled():  # backward(create_graph=True): the kernels' gradient is final
        raise RuntimeError(
            "smart_kernels sym_kl/kl (triton backend): double backward (create_graph=True) is "
            'not supported; use backend="reference" for higher-order gradients'
        )
    input, target, mask, stats, scale = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ga, gb = _sym_kl_bwd_triton(
        grad_out, scale, input, target, mask, stats, ctx.mode, need_input, need_target
    )
    return (ga if need_input else None, gb if need_target else None, None, None, None)


torch.library.register_fake("smart_kernels::sym_kl_fwd_triton")(_fwd_fake)
torch.library.register_fake("smart_kernels::sym_kl_bwd_triton")(_bwd_fake)
torch.library.register_autograd(
    "smart_kernels::sym_kl_fwd_triton", _triton_backward, setup_context=_triton_setup_context
)
if _backends._NATIVE_ERROR is None:
    # autograd of the native op is C++ (csrc/autograd/sym_kl.cpp): only fakes here
    torch.library.register_fake("smart_kernels::sym_kl_fwd")(_fwd_fake)
    torch.library.register_fake("smart_kernels::sym_kl_bwd")(_bwd_fake)
    torch.library.register_fake("smart_kernels::sym_kl")(_sym_kl_fake)


# --------------------------------------------------------------------------------------------
# Public entry points.


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with a contiguous last dim (a view when the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


def _run(
    input: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    mode: int,
    reduction: str,
    backend: str | None,
) -> torch.Tensor:
    caller = "kl" if mode == KL_MODE else "sym_kl"
    name = _backends.choose("sym_kl", backend, input.device, caller)
    code = REDUCTION_CODES[reduction]
    if name == "native":
        return torch.ops.smart_kernels.sym_kl(input, target, mask, mode, code)
    if name == "triton":
        flat_mask = None if mask is None else mask.reshape(-1)
        out, _, _ = _sym_kl_fwd_triton(_rows(input), _rows(target), flat_mask, mode, code)
        return out.view(input.shape[:-1]) if reduction == "none" else out
    if mode == KL_MODE:
        return reference.kl(input, target, reduction=reduction, mask=mask)
    grad = "full" if mode == 0 else "stop_grad"
    return reference.sym_kl(input, target, reduction=reduction, grad=grad, mask=mask)


def sym_kl(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "batchmean",
    grad: str = "full",
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric KL divergence ``KL(P||Q) + KL(Q||P)`` between ``P = softmax(input)`` and
    ``Q = softmax(target)``, row by row over the last dim.

    Args:
        input, target: logits [..., V] (float16/bfloat16/float32/float64, same shape, dtype
            and device). Each leading index is a row.
        reduction: ``"batchmean"`` (sum / counted rows), ``"sum"``, ``"mean"`` (sum / (counted
            rows * V), as ``F.kl_div``) or ``"none"`` (per-row values, shape [...]).
        grad: ``"full"`` (exact gradients) or ``"stop_grad"`` (mt-dnn / smart-pytorch:
            d/d input = P - Q, d/d target = Q - P; the value is the same).
        mask: optional bool [...]; a False row contributes 0, gets zero gradient and is not
            counted. No counted row gives 0.
        backend: ``None`` (auto), ``"reference"``, ``"native"`` or ``"triton"``.

    Returns:
        A scalar (or [...] for ``reduction="none"``) in float32 (float64 for float64 inputs).
        Gradients are computed only for inputs that require them, in their dtype.

    A vocabulary position where both logits are -inf contributes 0; any other non-finite input
    propagates to the result.
    """
    check_logits_pair(input, target)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("grad", grad, tuple(GRAD_MODES))
    check_row_mask(mask, input)
    return _run(input, target, mask, GRAD_MODES[grad], reduction, backend)


def kl(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``KL(Q||P)`` with ``P = softmax(input)``, ``Q = softmax(target)`` over the last dim:
    ``F.kl_div(log_softmax(input), softmax(target))`` with target's gradient kept.

    Gradients: d/d input = P - Q, d/d target = Q * (log Q - log P - KL(Q||P)).
    input, target: logits [..., V]; ``reduction``, ``mask``, ``backend`` and the result's shape
    and dtype are as in :func:`sym_kl`.
    """
    check_logits_pair(input, target)
    check_choice("reduction", reduction, REDUCTIONS)
    check_row_mask(mask, input)
    return _run(input, target, mask, KL_MODE, reduction, backend)
