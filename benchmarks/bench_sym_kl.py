"""sym_kl, sym_kl_full and kl benchmarks (forward, backward, forward + backward; gradients to
both inputs).

Providers: eager PyTorch in the formulation peers use (mt-dnn / smart-pytorch for sym_kl:
``kl_div(log_softmax(a), softmax(b).detach()) + kl_div(log_softmax(b), softmax(a).detach())``,
batchmean; ``F.kl_div(log_softmax(a), softmax(b))`` for kl), ``torch.compile`` of it, ours
(native, triton) and Liger-Kernel (sym_kl composed from ``log_softmax`` + ``LigerJSD(beta=0)``,
which is KL(P||Q) on log-probabilities, in both directions with stop-gradient targets).
``sym_kl_full`` is the exact gradient (``grad="full"``, the default of ``sk.sym_kl`` and
``SMARTLoss``): eager is the same two ``kl_div`` terms without ``.detach()``; Liger has no
exact-gradient formulation (its JSD differentiates only its input).
Minimal bytes: fwd reads both rows (2·N·V), bwd reads both and writes both gradients (4·N·V),
fwd+bwd 4·N·V (the issue's convention: a fused kernel that kept rows on chip would need no more).

    python benchmarks/bench_sym_kl.py [harness options]
                                       (= python -m benchmarks --op sym_kl,sym_kl_full,kl)
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smart_kernels as sk  # noqa: E402
from benchmarks.spec import Case, OpBench, Provider  # noqa: E402

GPU_CASES = [
    Case((32, 3), torch.float32),
    Case((4096, 32000), torch.float32),
    Case((8192, 50257), torch.bfloat16),
    Case((4096, 128256), torch.bfloat16),
]
GPU_QUICK = [GPU_CASES[0], GPU_CASES[1], Case((4096, 128256), torch.bfloat16)]
CPU_CASES = [
    Case((32, 3), torch.float32),
    Case((256, 32000), torch.float32),
    Case((64, 50257), torch.bfloat16),
]
SMOKE_CASES = [Case((4, 3), torch.float32), Case((3, 257), torch.bfloat16)]


def cases(device: torch.device, size: str) -> list[Case]:
    if size == "smoke":
        return SMOKE_CASES
    if device.type == "cuda":
        return GPU_QUICK if size == "quick" else GPU_CASES
    return CPU_CASES[:2] if size == "quick" else CPU_CASES


def make_inputs(case: Case, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)  # the same inputs for every provider
    a = torch.randn(case.shape, device=device, generator=gen) * 2
    b = torch.randn(case.shape, device=device, generator=gen) * 2
    return [a.to(case.dtype).requires_grad_(), b.to(case.dtype).requires_grad_()]


def min_bytes(case: Case, mode: str) -> int:
    element = torch.tensor([], dtype=case.dtype).element_size()
    passes = 2 if mode == "fwd" else 4
    return passes * case.numel * element


def mtdnn_sym_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mt-dnn / smart-pytorch formulation (stop-gradient targets), batchmean."""
    loss = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1).detach(), reduction="batchmean")
    return loss + F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1).detach(), reduction="batchmean")


def exact_sym_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(Q||P) + KL(P||Q) differentiated through both arguments of both terms, batchmean."""
    loss = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="batchmean")
    return loss + F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="batchmean")


def eager_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="batchmean")


def _ours(op: str, device: torch.device) -> list[Provider]:
    out = []
    for name, info in sk.backends().items():
        if name == "reference":
            continue
        reason = info.reason(device)
        if op in ("sym_kl", "sym_kl_full"):
            grad = "stop_grad" if op == "sym_kl" else "full"
            fn = lambda a, b, _n=name, _g=grad: sk.sym_kl(a, b, grad=_g, backend=_n)  # noqa: E731
        else:
            fn = lambda a, b, _n=name: sk.kl(a, b, backend=_n)  # noqa: E731
        out.append(Provider(f"ours-{name}", None if reason else fn, reason))
    return out


def _liger_sym_kl(device: torch.device) -> Provider:
    if importlib.util.find_spec("liger_kernel") is None:
        return Provider("liger", skip="liger_kernel not installed")
    if device.type != "cuda":
        return Provider("liger", skip="Liger-Kernel's Triton kernels need CUDA tensors")
    try:
        from liger_kernel.transformers.jsd import LigerJSD

        kl_pq = LigerJSD(beta=0.0)  # KL(P||Q) on (log Q = input, log P = target)
    except Exception as exc:  # an old Liger without beta=0
        return Provider("liger", skip=f"LigerJSD(beta=0) unavailable: {exc}")

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
        return kl_pq(la, lb.detach()) + kl_pq(lb, la.detach())

    return Provider(
        "liger", fn, modes=("full",),
        why_not="Liger computes the gradient inside its forward (and its backward only returns "
        "it): only fwd+bwd is comparable",
    )  # fmt: skip


def _compile(fn):
    return torch.compile(fn, dynamic=False)


def sym_kl_providers(device: torch.device) -> list[Provider]:
    return [
        Provider("eager", mtdnn_sym_kl),
        Provider("compile", _compile(mtdnn_sym_kl)),
        *_ours("sym_kl", device),
        _liger_sym_kl(device),
    ]


def sym_kl_full_providers(device: torch.device) -> list[Provider]:
    return [
        Provider("eager", exact_sym_kl),
        Provider("compile", _compile(exact_sym_kl)),
        *_ours("sym_kl_full", device),
        Provider("liger", skip="LigerJSD differentiates only its input (stop-gradient target): "
                 "no exact-gradient symmetric KL"),
    ]  # fmt: skip


def kl_providers(device: torch.device) -> list[Provider]:
    return [
        Provider("eager", eager_kl),
        Provider("compile", _compile(eager_kl)),
        *_ours("kl", device),
    ]


SYM_KL = OpBench("sym_kl", cases, make_inputs, sym_kl_providers, min_bytes)
SYM_KL_FULL = OpBench("sym_kl_full", cases, make_inputs, sym_kl_full_providers, min_bytes)
KL = OpBench("kl", cases, make_inputs, kl_providers, min_bytes)
OPS = [SYM_KL, SYM_KL_FULL, KL]

if __name__ == "__main__":
    from benchmarks.harness import main

    main(default_ops="sym_kl,sym_kl_full,kl")
