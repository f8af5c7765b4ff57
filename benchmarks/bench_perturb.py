"""perturb_step benchmarks: one projected ascent step on the embedding noise (forward only: the
op is never differentiated), token scope (``perturb_step``) and sequence scope
(``perturb_step_seq``), paper rule, inf norm (SMART's defaults).

Providers: eager PyTorch (the reference formula: ``clamp(noise + step * grad / (max|grad| +
eps), -radius, radius)`` in fp32), ``torch.compile`` of it, ours (native, triton).
Minimal bytes: 3 passes (read noise, read grad, write the new noise).

    python -m benchmarks --op perturb_step,perturb_step_seq [harness options]
    python benchmarks/bench_perturb.py [harness options]    (the same)
"""

from __future__ import annotations

import os
import sys

import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smart_kernels as sk  # noqa: E402
from benchmarks.spec import Case, OpBench, Provider  # noqa: E402
from smart_kernels import reference  # noqa: E402

GPU_CASES = [Case((32, 128, 768), torch.float32), Case((8, 2048, 4096), torch.bfloat16)]
CPU_CASES = [Case((8, 128, 768), torch.float32), Case((2, 512, 1024), torch.bfloat16)]
SMOKE_CASES = [Case((2, 3, 5), torch.float32), Case((2, 4, 33), torch.bfloat16)]
STEP = dict(step_size=1e-3, radius=1e-5, norm="inf", rule="paper", eps=1e-6)


def cases(device: torch.device, size: str) -> list[Case]:
    if size == "smoke":
        return SMOKE_CASES
    return GPU_CASES if device.type == "cuda" else CPU_CASES


def make_inputs(case: Case, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(case.shape, device=device, generator=gen) * 1e-5
    grad = torch.randn(case.shape, device=device, generator=gen)
    return [noise.to(case.dtype), grad.to(case.dtype)]


def min_bytes(case: Case, mode: str) -> int:
    return 3 * case.numel * torch.tensor([], dtype=case.dtype).element_size()


def _providers(scope: str):
    def eager(noise: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return reference.perturb_step(noise, grad, scope=scope, **STEP)

    def build(device: torch.device) -> list[Provider]:
        out = [Provider("eager", eager), Provider("compile", torch.compile(eager, dynamic=False))]
        for name, info in sk.backends().items():
            if name == "reference":
                continue
            reason = info.reason(device)
            fn = lambda n, g, _b=name: sk.perturb_step(n, g, scope=scope, backend=_b, **STEP)  # noqa: E731
            out.append(Provider(f"ours-{name}", None if reason else fn, reason))
        return out

    return build


PERTURB_TOKEN = OpBench(
    "perturb_step", cases, make_inputs, _providers("token"), min_bytes, modes=("fwd",)
)
PERTURB_SEQUENCE = OpBench(
    "perturb_step_seq", cases, make_inputs, _providers("sequence"), min_bytes, modes=("fwd",)
)
OPS = [PERTURB_TOKEN, PERTURB_SEQUENCE]

if __name__ == "__main__":
    from benchmarks.harness import main

    main(default_ops="perturb_step,perturb_step_seq")
