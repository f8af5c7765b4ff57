"""The build and its fallbacks: import without the extension, build flags, both CPU kernel ISAs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import KERNEL_BACKENDS_CPU

import smart_kernels as sk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_works_without_the_extension():
    """A missing or broken _C: import still works, backends() says why, auto uses reference."""
    code = """
import sys
sys.modules["smart_kernels._C"] = None  # any import of it now fails
import torch, smart_kernels as sk
info = sk.backends()["native"]
assert info.cpu is not None and "failed to load" in info.cpu, info
a, b = torch.randn(3, 5), torch.randn(3, 5)
ref = sk.sym_kl(a, b, backend="reference")
assert torch.equal(sk.sym_kl(a, b), ref)
try:
    sk.sym_kl(a, b, backend="native")
except RuntimeError as e:
    assert "failed to load" in str(e)
else:
    raise AssertionError("native should refuse")
print("ok")
"""
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def run_setup(cuda_flag: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "setup.py", "--name"],
        cwd=ROOT,
        env={**os.environ, "SMART_KERNELS_CUDA": cuda_flag},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_setup_rejects_bad_cuda_flag():
    proc = run_setup("maybe")
    assert proc.returncode != 0
    assert "SMART_KERNELS_CUDA must be auto, 0 or 1" in proc.stderr + proc.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch can build CUDA kernels")
def test_setup_cuda_1_fails_loudly_without_cuda():
    proc = run_setup("1")
    assert proc.returncode != 0
    assert "CUDA kernels cannot be built" in proc.stderr + proc.stdout


def test_native_has_cuda_flag_matches_build():
    if "native" not in KERNEL_BACKENDS_CPU:
        pytest.skip("native backend not built")
    assert isinstance(torch.ops.smart_kernels.has_cuda(), bool)
    assert (sk.backends()["native"].cuda == "smart_kernels._C was not built with CUDA") == (
        not torch.ops.smart_kernels.has_cuda()
    )


@pytest.mark.skipif("native" not in KERNEL_BACKENDS_CPU, reason="native backend not built")
def test_baseline_cpu_kernels_match_oracle():
    """The CPU kernels exist per ISA (AVX2+FMA and baseline): force the baseline and check it."""
    code = """
import torch, smart_kernels as sk
from smart_kernels import reference
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for mode in ("full", "stop_grad"):
        a = (torch.randn(5, 3001, dtype=torch.float64) * 2).to(dtype).requires_grad_()
        b = (torch.randn(5, 3001, dtype=torch.float64) * 2).to(dtype).requires_grad_()
        out = sk.sym_kl(a, b, grad=mode, backend="native")
        out.backward()
        a64 = a.detach().double().requires_grad_()
        b64 = b.detach().double().requires_grad_()
        ref = reference.sym_kl(a64, b64, grad=mode)
        ref.backward()
        tol = 1e-5 if dtype != torch.bfloat16 else 1e-2
        assert abs(out.item() - ref.item()) <= tol * abs(ref.item()), (dtype, out, ref)
        err = (a.grad.double() - a64.grad).abs().max() / a64.grad.abs().max()
        assert err <= tol, (dtype, mode, err)
print("ok")
"""
    for isa in ("base", "auto"):
        proc = run_py(code, SMART_KERNELS_CPU_ISA=isa)
        assert proc.returncode == 0, (isa, proc.stderr)


@pytest.mark.skipif("native" not in KERNEL_BACKENDS_CPU, reason="native backend not built")
def test_baseline_perturb_kernels_match_oracle():
    """normalize / perturb_step per ISA: the baseline copy and the AVX2 one match the oracle."""
    code = """
import torch, smart_kernels as sk
from smart_kernels import reference
torch.manual_seed(0)
for shape, scope in (((3, 5, 1000), "token"), ((2, 20, 1000), "sequence")):
    for dtype in (torch.float32, torch.bfloat16):
        noise = (torch.randn(shape, dtype=torch.float64) * 1e-5).to(dtype)
        grad = torch.randn(shape, dtype=torch.float64).to(dtype)
        mask = torch.rand(shape[:-1]) > 0.3
        for norm in ("inf", "l2", "l1"):
            y = sk.normalize(grad, norm=norm, scope=scope, backend="native")
            cases = [(y, reference.normalize(grad, norm=norm, scope=scope),
                      reference.normalize(grad.double(), norm=norm, scope=scope))]
            for rule in ("paper", "normalize_sum"):
                kw = dict(norm=norm, scope=scope, rule=rule, radius=6e-4, mask=mask)
                out = sk.perturb_step(noise, grad, backend="native", **kw)
                cases.append((out, reference.perturb_step(noise, grad, **kw),
                              reference.perturb_step(noise.double(), grad.double(), **kw)))
            for out, eager, ref in cases:
                err = (out.double() - ref).abs()
                if dtype == torch.float32:
                    assert err.max() <= 1e-5 * ref.abs().max(), (scope, norm, err.max())
                else:
                    ok = err <= 2 * (eager.double() - ref).abs() + 2**-8 * ref.abs() + 1e-38
                    assert ok.all(), (scope, norm)
print("ok")
"""
    for isa in ("base", "auto"):
        proc = run_py(code, SMART_KERNELS_CPU_ISA=isa)
        assert proc.returncode == 0, (isa, proc.stderr)
        assert proc.stdout.strip().endswith("ok")
