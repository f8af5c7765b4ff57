"""smart_kernels.compat.smart_pytorch against the real smart-pytorch 0.0.4 on a CUDA device:
SMARTLoss values and parameter / embedding gradients with the CUDA C++ and Triton kernels (the
same noise: both draw it with torch.randn_like from the seeded CUDA generator). Skipped without a
GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU_BACKENDS
from test_compat import MODELS, TOL, _compare_smart, _model, _spy, needs_sp

pytestmark = pytest.mark.gpu


@needs_sp
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_smart_loss_matches_smart_pytorch_on_cuda(backend, kind, dtype, monkeypatch):
    monkeypatch.setenv("SMART_KERNELS_BACKEND", backend)
    steps = _spy(monkeypatch, "perturb_step")
    torch.manual_seed(0)
    model = _model(kind, dtype, gain=3.0).cuda()
    embed = torch.randn(4, 5, 8, dtype=dtype, device="cuda")
    # fp32 with smart-pytorch's default noise (1e-5) is ill-conditioned in both (test_compat)
    noise_var = 1e-5 if dtype == torch.float64 else 1e-2
    loss, _ = _compare_smart(model, embed, TOL[dtype], num_steps=2, noise_var=noise_var)
    assert loss > 0
    assert len(steps) == 2  # the fused step ran, on the chosen backend
