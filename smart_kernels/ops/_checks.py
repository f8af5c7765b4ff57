"""Validation shared by the ops: runs before any kernel, raises ValueError/TypeError naming the
argument, and never synchronizes the device (only metadata is read)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def check_number(
    name: str, value: object, *, allow_none: bool = False, positive: bool = False
) -> None:
    """A finite real number >= 0 (> 0 if ``positive``; or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        extra = " or None" if allow_none else ""
        raise TypeError(f"{name}: expected a number{extra}, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


def check_unit_interval(name: str, value: object, what: str = "a float in [0, 1]") -> float:
    """A real number in [0, 1] (a decay / β), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
    return value


def check_float_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {t.dtype}"
        )


def check_same(name: str, x: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """``x`` (argument ``name``) has the shape, dtype and device of ``like`` (``like_name``)."""
    if x.shape != like.shape:
        raise ValueError(
            f"{name}: expected the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}"
        )
    if x.dtype != like.dtype:
        raise TypeError(f"{name}: expected the dtype of {like_name} ({like.dtype}), got {x.dtype}")
    if x.device != like.device:
        raise ValueError(
            f"{name}: expected the device of {like_name} ({like.device}), got {x.device}"
        )


def check_logits_pair(input: torch.Tensor, target: torch.Tensor) -> None:
    """input, target: logits [..., V] of one shape, dtype and device, V > 0."""
    check_float_tensor("input", input)
    check_float_tensor("target", target)
    if input.dim() == 0:
        raise ValueError("input: expected logits of shape [..., V], got a 0-d tensor")
    check_same("target", target, "input", input)
    if input.shape[-1] == 0:
        raise ValueError("input: the last dimension (V, the number of classes) must be > 0")


def check_row_mask(
    mask: object, like: torch.Tensor, like_name: str = "input", name: str = "mask"
) -> None:
    """mask (argument ``name``): None or a bool tensor of shape like.shape[:-1] on like's
    device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}")
    if mask.shape != like.shape[:-1]:
        raise ValueError(
            f"{name}: expected shape {tuple(like.shape[:-1])} (the leading dims of {like_name}), "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != like.device:
        raise ValueError(
            f"{name}: expected the device of {like_name} ({like.device}), got {mask.device}"
        )
