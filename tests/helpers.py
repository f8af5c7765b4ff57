"""Shared test helpers: which backends run here, and error measures against the fp64 oracle."""

from __future__ import annotations

import torch

import smart_kernels as sk


def backends_for(device: str) -> list[str]:
    dev = torch.device(device)
    return [name for name, info in sk.backends().items() if info.reason(dev) is None]


CPU_BACKENDS = backends_for("cpu")
KERNEL_BACKENDS_CPU = [b for b in CPU_BACKENDS if b != "reference"]
# The kernel backends that run on CUDA here ([] without a visible GPU): the GPU tests' backends.
GPU_BACKENDS = [
    b for b in ("native", "triton") if torch.cuda.is_available() and b in backends_for("cuda")
]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(max |ref|, 1e-2) (0 for empty tensors).

    The floor makes an all-zero reference (V = 1: loss and gradients are exactly 0) compare at
    an absolute 1e-7 for a 1e-5 tolerance, instead of dividing by zero.
    """
    if x.numel() == 0:
        return 0.0
    scale = ref.double().abs().max().item()
    return max_err(x, ref) / max(scale, 1e-2)


def logits(*shape: int, dtype=torch.float32, device="cpu", scale: float = 2.0) -> torch.Tensor:
    """Random logits: never zeros, spread like a classifier's."""
    return (torch.randn(*shape, dtype=torch.float64, device=device) * scale).to(dtype)
