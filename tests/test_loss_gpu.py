"""SMARTLoss on a CUDA device: the fused ops inside a SMART step against the hand-written step,
under bf16 autocast, and with a compiled model. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import backends_for
from test_loss import TinyEncoder, fixed_noise, manual_smart

import smart_kernels as sk

pytestmark = pytest.mark.gpu
GPU_BACKENDS = [
    b for b in ("native", "triton") if torch.cuda.is_available() and b in backends_for("cuda")
]


def _cuda_noise(like, std=1e-5, *, mask=None, generator=None, backend=None):
    return fixed_noise(like.cpu(), std, mask=None if mask is None else mask.cpu()).to(like.device)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("token_level", [False, True])
def test_matches_manual_smart_fp64(backend, token_level, monkeypatch):
    monkeypatch.setattr(sk.loss, "init_noise", _cuda_noise)
    torch.manual_seed(0)
    model = TinyEncoder(token_level=token_level).cuda()
    ids = torch.randint(0, 50, (4, 7), device="cuda")
    mask = torch.ones(4, 7, dtype=torch.bool, device="cuda")
    mask[1, 5:] = False
    kw = dict(step_size=0.5, radius=0.05)
    embed = model.word(ids)
    logits = model(embed, mask)
    smart = sk.SMARTLoss(lambda e: model(e, mask), num_steps=2, backend=backend, **kw)
    ours = smart(embed, logits, mask=mask)
    ref = manual_smart(model, embed, logits, mask, steps=2, **kw)
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_and_compiled_model(backend):
    torch.manual_seed(0)
    model = TinyEncoder(dtype=torch.float32).cuda()
    compiled = torch.compile(model)
    embed = model.word(torch.randint(0, 50, (8, 16), device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = compiled(embed)
        loss = sk.SMARTLoss(compiled, num_steps=1, backend=backend)(embed, logits)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
