"""SMARTLoss on a CUDA device: the fused ops inside a SMART step against the hand-written step,
under bf16 autocast, with Inductor (compiled model or compiled loss call), with no host
synchronization in a whole SMART + teacher step, and captured in a CUDA graph. Skipped without a
GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU_BACKENDS
from test_loss import TinyEncoder, compiled_matches_eager, fixed_noise, manual_smart

import smart_kernels as sk

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("token_level", [False, True])
def test_matches_manual_smart_fp64(backend, token_level, monkeypatch):
    monkeypatch.setattr(sk.loss, "init_noise", fixed_noise)
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


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("what", ["model", "loss"])
def test_inductor_matches_eager(backend, what):
    compiled_matches_eager("cuda", backend, what)


def _step_parts(backend: str, token_level: bool, dtype: torch.dtype = torch.float32):
    """A TinyEncoder on CUDA, a static embedding leaf [4, 7, 16] (the model's embedding backward
    is not ours), the mask [4, 7], a SMARTLoss and a paper-schedule teacher."""
    torch.manual_seed(0)
    model = TinyEncoder(token_level=token_level, dtype=dtype).cuda()
    embed = torch.randn(4, 7, 16, dtype=dtype, device="cuda", requires_grad=True)
    mask = torch.ones(4, 7, dtype=torch.bool, device="cuda")
    mask[1, 5:] = False
    smart = sk.SMARTLoss(
        lambda e: model(e, mask), num_steps=2, step_size=0.5, radius=0.05, backend=backend
    )
    teacher = sk.MomentumTeacher(model, schedule="paper", total_steps=100, backend=backend)
    return model, embed, mask, smart, teacher


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("token_level", [False, True])
def test_smart_teacher_step_never_syncs(backend, token_level):
    """L + R_s + D_Breg, backward, an SGD update and the teacher update, with
    torch.cuda.set_sync_debug_mode("error"): any host synchronization raises."""
    model, embed, mask, smart, teacher = _step_parts(backend, token_level)
    rows = mask if token_level else None
    params = [p for n, p in model.named_parameters() if not n.startswith("word.")]  # trained

    def step():
        logits = model(embed, mask)
        task = logits.float().logsumexp(-1).mean()  # a stand-in task loss
        breg = sk.bregman_loss(logits, teacher(embed, mask), mask=rows, backend=backend)
        loss = task + smart(embed, logits, mask=mask) + breg
        loss.backward()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
        model.zero_grad(set_to_none=True)
        teacher.update(model)
        return loss.detach()

    first = step()  # plans, caches and warnings happen on the first call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(first) and torch.isfinite(second)
    assert teacher.step == 2


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_matches_eager(backend, monkeypatch):
    """A SMART forward + backward (2 ascent steps) captured in one CUDA graph and replayed gives
    eager's R_s and gradients; δ₀ is fixed (a device tensor cloned inside the graph). fp64: the
    comparison does not depend on the replay being bit-identical to eager."""
    model, embed, mask, smart, _ = _step_parts(backend, token_level=True, dtype=torch.float64)
    delta0 = fixed_noise(embed, mask=mask)
    monkeypatch.setattr(sk.loss, "init_noise", lambda like, *a, **k: delta0.clone())
    leaves = [embed, *(p for n, p in model.named_parameters() if not n.startswith("word."))]

    def step():
        loss = smart(embed, model(embed, mask), mask=mask)
        loss.backward()
        return loss

    eager = step().detach().clone()
    eager_grads = [x.grad.clone() for x in leaves]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture (torch.cuda.graphs)
        for _ in range(2):
            for x in leaves:
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):  # a replay overwrites the grads the graph allocated; no accumulation
        graph.replay()
    torch.cuda.synchronize()
    assert eager > 0
    torch.testing.assert_close(captured, eager, rtol=1e-10, atol=0)
    for x, g in zip(leaves, eager_grads, strict=True):
        torch.testing.assert_close(x.grad, g, rtol=1e-9, atol=1e-14)
