"""Which backends can run here, and which one an op uses.

Backends: ``"reference"`` (plain PyTorch, always), ``"native"`` (the compiled extension
``smart_kernels._C``: C++ on CPU tensors, CUDA C++ on CUDA tensors) and ``"triton"``.
An explicit backend that cannot run raises ``RuntimeError`` saying why; it never falls back.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "native", "triton")
ENV_VAR = "SMART_KERNELS_BACKEND"

# The GPU backend each op uses under auto selection, by measurement (benchmarks/results/).
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "sym_kl": ("native", "triton"),
    # normalize, perturb_step, init_noise: Triton ran at 97% of copy bandwidth on an H100 where
    # the CUDA C++ step ran at 64% (benchmarks/results/NVIDIA_H100_80GB_HBM3/)
    "perturb": ("triton", "native"),
    "ema": ("native", "triton"),
}

try:
    from smart_kernels import _C  # noqa: F401  (loading it registers torch.ops.smart_kernels.*)

    _NATIVE_ERROR: str | None = None
except Exception as exc:  # a missing or broken build must not break `import smart_kernels`
    _NATIVE_ERROR = f"smart_kernels._C failed to load ({type(exc).__name__}: {exc})"

# Every op of csrc/smart_kernels.cpp: a _C built from older sources (a pull without a rebuild)
# lacks some, and is then refused as a whole rather than half used.
NATIVE_OPS = (
    "has_cuda", "sym_kl_fwd", "sym_kl_bwd", "sym_kl", "normalize", "normalize_bwd",
    "perturb_step", "init_noise", "ema_update_", "ema",
)  # fmt: skip
if _NATIVE_ERROR is None:
    _missing = [op for op in NATIVE_OPS if not hasattr(torch.ops.smart_kernels, op)]
    if _missing:
        _NATIVE_ERROR = (
            f"smart_kernels._C is stale (built before {', '.join(_missing)} existed): rebuild "
            "with `make setup` or `pip install --no-build-isolation --no-deps -e .`"
        )

NATIVE_CUDA: bool = _NATIVE_ERROR is None and bool(torch.ops.smart_kernels.has_cuda())
TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class BackendInfo:
    """Availability of one backend: per device kind, ``None`` if usable, else the reason."""

    name: str
    cpu: str | None
    cuda: str | None

    @property
    def available(self) -> bool:
        return self.cpu is None or self.cuda is None

    def reason(self, device: torch.device) -> str | None:
        if device.type == "cuda":
            return self.cuda
        if device.type == "cpu":
            return self.cpu
        if self.name == "reference":
            return None  # plain PyTorch runs wherever PyTorch does
        return f"no {self.name} kernels for {device.type} tensors"


def _info(name: str) -> BackendInfo:
    no_gpu = None if torch.cuda.is_available() else "no CUDA device visible"
    if name == "reference":
        return BackendInfo(name, None, no_gpu)
    if name == "native":
        if _NATIVE_ERROR is not None:
            return BackendInfo(name, _NATIVE_ERROR, _NATIVE_ERROR)
        cuda = no_gpu if NATIVE_CUDA else "smart_kernels._C was not built with CUDA"
        return BackendInfo(name, None, cuda)
    if not TRITON_INSTALLED:
        return BackendInfo(name, "triton not installed", "triton not installed")
    cpu = None if triton_interpret() else "triton on CPU tensors needs TRITON_INTERPRET=1"
    return BackendInfo(name, cpu, no_gpu)


def backends() -> dict[str, BackendInfo]:
    """Every backend and, per device kind, ``None`` if it can run there or the reason it cannot.

    Example: ``{name: (b.cpu, b.cuda) for name, b in sk.backends().items()}``.
    """
    return {name: _info(name) for name in BACKENDS}


def check_name(backend: object, name: str = "backend") -> None:
    """``backend`` is None or one of BACKENDS (for constructors that store it: a typo fails at
    construction, not at the first call). Whether it can run is checked per call."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name}: expected one of {BACKENDS} or None, got {backend!r}")


def choose(op: str, backend: str | None, device: torch.device, caller: str | None = None) -> str:
    """The backend ``op`` (a kernel family of GPU_PREFERENCE) runs with for tensors on
    ``device``; raises if ``backend`` can't run, naming ``caller`` (default: ``op``)."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend is None:
        if device.type == "cuda":
            for name in GPU_PREFERENCE.get(op, ()):
                if _info(name).reason(device) is None:
                    return name
            return "reference"
        if device.type == "cpu" and _NATIVE_ERROR is None:
            return "native"
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS} or None")
    reason = _info(backend).reason(device)
    if reason is not None:
        raise RuntimeError(
            f"{caller or op}: {source} cannot run on {device.type} tensors: {reason}"
        )
    return backend
