"""normalize / perturb_step / init_noise on a CUDA device: the CUDA C++ and compiled Triton
kernels against the fp64 oracle, the fused and split reductions at real sizes, torch.compile
(Inductor), CUDA-graph capture. Skipped without a GPU."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GPU_BACKENDS
from test_perturb import NORMS, RULES, SCOPES, close, fp32_slack, random_mask, within_eager

import smart_kernels as sk
from smart_kernels import reference

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _pair(shape, dtype):
    noise = (torch.randn(shape, device=DEV) * 1e-5).to(dtype)
    grad = torch.randn(shape, device=DEV).to(dtype)
    return noise, grad


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("radius", [None, 1e-5, 6e-4])
@pytest.mark.parametrize("shape", [(3, 5, 37), (4, 7, 1), (2, 33, 4099)])
def test_perturb_step_fp32(backend, norm, scope, rule, radius, shape):
    noise, grad = _pair(shape, torch.float32)
    mask = random_mask(shape[:-1]).to(DEV)
    kw = dict(norm=norm, scope=scope, rule=rule, radius=radius, mask=mask)
    out = sk.perturb_step(noise, grad, backend=backend, **kw)
    ref = reference.perturb_step(noise.double(), grad.double(), **kw)
    assert close(out, ref, 1e-5)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((8, 2048, 4096), torch.bfloat16),
        ((32, 128, 768), torch.float32),
        ((2, 512, 8192), torch.float16),
    ],
)
def test_perturb_step_benchmark_sizes(backend, scope, norm, shape, dtype):
    """The benchmarked sizes, and the largest sequence group the issue names (512 x 8192)."""
    noise, grad = _pair(shape, dtype)
    for rule in RULES:
        kw = dict(norm=norm, scope=scope, rule=rule, radius=6e-4)
        out = sk.perturb_step(noise, grad, backend=backend, **kw)
        ref = reference.perturb_step(noise.double(), grad.double(), **kw)
        if dtype == torch.float32:
            assert close(out, ref, 1e-5)
        else:
            # noise + step * u cancelling: FMA vs eager vs fp64 (the default step_size 1e-3)
            slack = fp32_slack(noise, grad, **kw)
            eager = reference.perturb_step(noise, grad, **kw)
            assert within_eager(out, eager, ref, slack)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 1), (2, 300, 1000), (3, 9, 4097)])
def test_normalize_fp32(backend, norm, scope, shape):
    x = torch.randn(shape, device=DEV, requires_grad=True)
    y = sk.normalize(x, norm=norm, scope=scope, backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = reference.normalize(x64, norm=norm, scope=scope)
    assert close(y, ref, 1e-5)
    go = torch.rand_like(ref) + 0.5
    y.backward(go.float())
    ref.backward(go)
    terms = (go.abs().max() / x64.detach().abs().max()).item()
    err = (x.grad.double() - x64.grad).abs().max().item()
    assert err <= 1e-5 * max(x64.grad.abs().max().item(), terms)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", ["inf", "l2"])
@pytest.mark.parametrize("scope", SCOPES)
def test_normalize_gradcheck_fp64(backend, norm, scope):
    x = torch.randn(2, 3, 6, device=DEV, dtype=torch.float64, requires_grad=True)
    fn = lambda t: sk.normalize(t, norm=norm, scope=scope, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_normalize_low_precision(backend, dtype):
    x = torch.randn(4, 64, 1000, device=DEV).to(dtype)
    for norm in NORMS:
        for scope in SCOPES:
            y = sk.normalize(x, norm=norm, scope=scope, backend=backend)
            eager = reference.normalize(x, norm=norm, scope=scope)
            assert within_eager(y, eager, reference.normalize(x.double(), norm=norm, scope=scope))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_init_noise_statistics_and_mask(backend):
    like = torch.empty(64, 256, 128, device=DEV)  # 2^21 elements
    mask = random_mask((64, 256)).to(DEV)
    std = 2e-5
    noise = sk.init_noise(like, std, mask=mask, backend=backend)
    assert (noise[~mask] == 0).all()
    z = noise[mask].double().flatten() / std
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 0.005
    for lag in (1, 2, 3, 4, 128):
        assert abs((z[:-lag] * z[lag:]).mean().item()) < 5 / math.sqrt(n)
    gen = torch.Generator(device=DEV)
    a = sk.init_noise(like, std, generator=gen.manual_seed(3), backend=backend)
    b = sk.init_noise(like, std, generator=gen.manual_seed(3), backend=backend)
    assert torch.equal(a, b)


def test_init_noise_native_same_numbers_on_cpu_and_cuda():
    if "native" not in GPU_BACKENDS:
        pytest.skip("native CUDA kernels not built")
    like = torch.empty(3, 5, 77)
    seed = torch.tensor(987654321, dtype=torch.int64)
    cpu = torch.ops.smart_kernels.init_noise(like, None, seed, 1.0)
    gpu = torch.ops.smart_kernels.init_noise(like.to(DEV), None, seed.to(DEV), 1.0)
    assert torch.allclose(cpu, gpu.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_inductor(backend):
    def step(noise, grad, x):
        new = sk.perturb_step(
            noise, grad, norm="l2", scope="sequence", radius=1e-4, backend=backend
        )
        return new, sk.normalize(x, backend=backend).sum()

    noise, grad = _pair((2, 16, 64), torch.float32)
    x = torch.randn(2, 16, 64, device=DEV, requires_grad=True)
    new, loss = torch.compile(step, fullgraph=True)(noise, grad, x)
    loss.backward()
    ref = reference.perturb_step(noise, grad, norm="l2", scope="sequence", radius=1e-4)
    assert close(new, ref, 1e-5)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_cuda_graph_capture(backend, scope):
    """init_noise + perturb_step (split reduction included) capture and replay: no host sync."""
    shape = (2, 512, 1024)
    like = torch.empty(shape, device=DEV)
    _, grad = _pair(shape, torch.float32)

    def body():
        noise = sk.init_noise(like, 1e-5, backend=backend)
        return sk.perturb_step(noise, grad, norm="l2", scope=scope, radius=1e-4, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up (compilation, allocations) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body()
    graph.replay()
    first = out.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, out)  # a fresh seed per replay
    norms = torch.linalg.vector_norm(out.double(), dim=reference.group_dims(scope))
    assert (norms <= 1e-4 * (1 + 1e-6)).all()
