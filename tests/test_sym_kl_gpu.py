"""sym_kl / kl on a CUDA device: the CUDA C++ and compiled Triton kernels against the fp64
oracle, torch.compile(fullgraph=True), CUDA-graph capture. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import GPU_BACKENDS, logits, max_err, rel_err
from test_sym_kl import _ill_conditioned, error_ratios

import smart_kernels as sk
from smart_kernels import _backends, reference

pytestmark = pytest.mark.gpu
MODES = [("sym_kl", "full"), ("sym_kl", "stop_grad"), ("kl", None)]


def _call(op, a, b, **kw):
    if op == "kl":
        kw.pop("grad", None)
        return sk.kl(a, b, **kw)
    return sk.sym_kl(a, b, **kw)


def _ref(op, a, b, **kw):
    if op == "kl":
        kw.pop("grad", None)
        return reference.kl(a, b, **kw)
    return reference.sym_kl(a, b, **kw)


def _check(op, grad, a0, b0, backend, tol=1e-5, reduction="batchmean", mask=None):
    a = a0.detach().clone().requires_grad_()
    b = b0.detach().clone().requires_grad_()
    out = _call(op, a, b, reduction=reduction, grad=grad, mask=mask, backend=backend)
    a64 = a0.detach().double().requires_grad_()
    b64 = b0.detach().double().requires_grad_()
    ref = _ref(op, a64, b64, reduction=reduction, grad=grad, mask=mask)
    go = torch.rand_like(ref) + 0.5
    out.backward(go.to(out.dtype))
    ref.backward(go)
    assert rel_err(out, ref) <= tol
    assert rel_err(a.grad, a64.grad) <= tol
    assert rel_err(b.grad, b64.grad) <= tol
    return a, b


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op,grad", MODES)
def test_non_contiguous_masks(backend, op, grad):
    """Strided and stride-0 mask views (reshape(-1) keeps them views) select the right rows."""
    big = torch.rand(6, 2, device="cuda") > 0.5
    big[:2, 0] = torch.tensor([True, False])
    masks = [
        (big[:, 0], (6, 1000)),
        (torch.tensor([True, False, True, True], device="cuda").expand(3, 4), (3, 4, 1000)),
        (torch.tensor([False], device="cuda").expand(9), (9, 1000)),
    ]
    for mask, shape in masks:
        assert not mask.is_contiguous()
        a0, b0 = logits(*shape, device="cuda"), logits(*shape, device="cuda")
        a, _ = _check(op, grad, a0, b0, backend, reduction="sum", mask=mask)
        assert (a.grad[~mask] == 0).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op,grad", MODES)
@pytest.mark.parametrize(
    "shape", [(7, 3), (5, 1), (2, 3, 1000), (3, 2049), (3, 32001), (2, 262144), (33, 50257)]
)
def test_fp32_matches_oracle(backend, op, grad, shape):
    _check(op, grad, logits(*shape, device="cuda"), logits(*shape, device="cuda"), backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_and_masks(backend, reduction):
    mask = torch.rand(3, 9, device="cuda") > 0.5
    mask[0, 0] = True
    a, b = _check(
        "sym_kl",
        "full",
        logits(3, 9, 700, device="cuda"),
        logits(3, 9, 700, device="cuda"),
        backend,
        reduction=reduction,
        mask=mask,
    )
    assert (a.grad[~mask] == 0).all() and (b.grad[~mask] == 0).all()
    none = torch.zeros(3, 9, dtype=torch.bool, device="cuda")
    out = sk.sym_kl(
        logits(3, 9, 70, device="cuda"),
        logits(3, 9, 70, device="cuda"),
        reduction=reduction,
        mask=none,
        backend=backend,
    )
    assert (out == 0).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layout", ["row_slice_odd", "row_slice_aligned", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts(backend, layout, dtype):
    """Vector and scalar load paths: misaligned row starts, strided rows, transposed input."""
    if layout == "row_slice_odd":
        a, b = logits(6, 5003, device="cuda")[:, 1:5000], logits(6, 5002, device="cuda")[:, 3:]
    elif layout == "row_slice_aligned":
        a, b = logits(6, 4104, device="cuda")[:, 8:], logits(6, 4096, device="cuda")
    else:
        a, b = logits(3000, 5, device="cuda").t(), logits(3000, 5, device="cuda").t()
    a, b = a.to(dtype), b.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    _check("sym_kl", "full", a, b, backend, tol=tol)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op,grad", MODES)
def test_low_precision_within_2x_eager(backend, dtype, op, grad):
    a0 = logits(16, 50257, dtype=dtype, device="cuda")
    b0 = logits(16, 50257, dtype=dtype, device="cuda")

    def run(fn, dt):
        a = a0.detach().to(dt).clone().requires_grad_()
        b = b0.detach().to(dt).clone().requires_grad_()
        out = fn(a, b)
        out.backward(torch.full_like(out, 0.75))
        return out.detach(), a.grad, b.grad

    ours = run(lambda a, b: _call(op, a, b, reduction="sum", grad=grad, backend=backend), dtype)
    exact = run(lambda a, b: _ref(op, a, b, reduction="sum", grad=grad), torch.float64)
    if op == "kl":
        eager = run(lambda a, b: reference.kl_rows(a, b, compute_dtype=dtype).sum(), dtype)
    else:
        eager = run(
            lambda a, b: reference.sym_kl_rows(a, b, grad, compute_dtype=dtype).sum(), dtype
        )
    for mine, theirs, ex in zip(ours, eager, exact, strict=True):
        assert max_err(mine, ex) <= 2 * max_err(theirs, ex) + 1e-6


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("op,grad", MODES)
def test_float64(backend, op, grad):
    shape = (5, 3001)
    _check(
        op,
        grad,
        logits(*shape, dtype=torch.float64, device="cuda"),
        logits(*shape, dtype=torch.float64, device="cuda"),
        backend,
        tol=1e-12,
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_neg_inf_in_both_and_non_finite(backend):
    a, b = logits(4, 3000, device="cuda"), logits(4, 3000, device="cuda")
    a[:, :1500] = float("-inf")
    b[:, :1500] = float("-inf")  # the whole first half is a masked vocabulary
    a[3, 2000] = float("nan")
    a.requires_grad_()
    b.requires_grad_()
    rows = sk.sym_kl(a, b, reduction="none", backend=backend)
    ref = reference.sym_kl(
        a.detach()[:, 1500:].double(), b.detach()[:, 1500:].double(), reduction="none"
    )
    assert rel_err(rows[:3], ref[:3]) <= 1e-5
    assert torch.isnan(rows[3])
    rows[:3].sum().backward()  # row 3 (NaN input) gets grad 0 * NaN = NaN, as in eager PyTorch
    assert (a.grad[:3, :1500] == 0).all() and torch.isfinite(a.grad[:3]).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("V", [7, 5000])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_zero_rows(backend, V, reduction):
    a = logits(0, V, device="cuda").requires_grad_()
    b = logits(0, V, device="cuda").requires_grad_()
    out = sk.sym_kl(a, b, reduction=reduction, backend=backend)
    assert (out == 0).all() and out.shape == ((0,) if reduction == "none" else ())
    out.sum().backward()
    assert a.grad.shape == (0, V)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(32, 3), (4, 8, 2048), (40, 2000)])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_small_fused_path(backend, shape, reduction):
    """Problems small enough for the one-launch path, and just past it."""
    mask = torch.rand(shape[:-1], device="cuda") > 0.3
    _check(
        "sym_kl",
        "full",
        logits(*shape, device="cuda"),
        logits(*shape, device="cuda"),
        backend,
        reduction=reduction,
        mask=mask,
    )
    _check(
        "kl",
        None,
        logits(*shape, device="cuda"),
        logits(*shape, device="cuda"),
        backend,
        reduction=reduction,
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", ["offset", "row_offsets", "near_identical"])
@pytest.mark.parametrize("op,grad", MODES)
def test_ill_conditioned_fp32(backend, case, op, grad):
    """As tests/test_sym_kl.py::test_ill_conditioned_fp32, on the GPU kernels."""
    a, b = _ill_conditioned(case, device="cuda")
    value, grad_a, grad_b = error_ratios(op, grad, a, b, backend)
    assert value <= 16
    assert grad_a <= 8 and grad_b <= 8


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_warp_per_row_path_with_head_and_tail(backend, dtype):
    """V <= 2048 rows past the one-launch size: warp per row, misaligned row starts (odd V)."""
    tol = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for op, grad in MODES:
        _check(
            op,
            grad,
            logits(37, 1999, dtype=dtype, device="cuda"),
            logits(37, 1999, dtype=dtype, device="cuda"),
            backend,
            tol=tol,
        )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp64_long_rows(backend):
    """fp64 with 1024-thread blocks (V > 65536): must launch (register budget) and be exact."""
    _check(
        "sym_kl",
        "full",
        logits(3, 70001, dtype=torch.float64, device="cuda"),
        logits(3, 70001, dtype=torch.float64, device="cuda"),
        backend,
        tol=1e-12,
    )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_row_entirely_neg_inf_and_double_backward(backend):
    a, b = logits(3, 3000, device="cuda"), logits(3, 3000, device="cuda")
    a[1] = float("-inf")
    b[1] = float("-inf")
    a.requires_grad_()
    b.requires_grad_()
    rows = sk.sym_kl(a, b, reduction="none", backend=backend)
    assert rows[1] == 0 and torch.isfinite(rows).all()
    rows.sum().backward()
    assert (a.grad[1] == 0).all() and torch.isfinite(a.grad).all()
    with pytest.raises(RuntimeError):
        torch.autograd.grad(sk.sym_kl(a, b, backend=backend), a, create_graph=True)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradcheck_fp64(backend):
    a = logits(3, 6, dtype=torch.float64, device="cuda").requires_grad_()
    b = logits(3, 6, dtype=torch.float64, device="cuda").requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: sk.sym_kl(x, y, backend=backend), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: sk.kl(x, y, backend=backend), (a, b))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_opcheck_cuda(backend):
    suffix = "" if backend == "native" else "_triton"
    fwd = getattr(torch.ops.smart_kernels, "sym_kl_fwd" + suffix)
    bwd = getattr(torch.ops.smart_kernels, "sym_kl_bwd" + suffix)
    a = logits(4, 3000, dtype=torch.bfloat16, device="cuda").requires_grad_()
    b = logits(4, 3000, dtype=torch.bfloat16, device="cuda").requires_grad_()
    mask = torch.tensor([True, False, True, True], device="cuda")
    # the raw native kernels are not differentiable by themselves (sym_kl below is)
    fwd_args = (a, b) if backend == "triton" else (a.detach(), b.detach())
    for reduction in (0, 2):
        torch.library.opcheck(fwd, (*fwd_args, mask, 0, reduction))
        if backend == "native":
            torch.library.opcheck(torch.ops.smart_kernels.sym_kl, (a, b, mask, 0, reduction))
    _, stats, scale = fwd(a.detach(), b.detach(), mask, 0, 2)
    g = torch.rand((), device="cuda")
    torch.library.opcheck(bwd, (g, scale, a.detach(), b.detach(), mask, stats, 0, True, True))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_inductor(backend):
    def loss_fn(a, b, mask):
        return sk.sym_kl(a, b, mask=mask, backend=backend) + 0.5 * sk.kl(a, b, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    a = logits(8, 4, 1001, device="cuda").requires_grad_()
    b = logits(8, 4, 1001, device="cuda").requires_grad_()
    mask = torch.rand(8, 4, device="cuda") > 0.3
    out = compiled(a, b, mask)
    out.backward()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = reference.sym_kl(a64, b64, mask=mask) + 0.5 * reference.kl(a64, b64)
    ref.backward()
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(a.grad, a64.grad) <= 1e-5
    assert rel_err(b.grad, b64.grad) <= 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    """No host sync in forward or backward: the whole step captures into a CUDA graph."""
    a = logits(16, 5000, device="cuda").requires_grad_()
    b = logits(16, 5000, device="cuda")
    mask = torch.rand(16, device="cuda") > 0.2

    def step():
        a.grad = None
        loss = sk.sym_kl(a, b, mask=mask, backend=backend)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    a.grad = None
    with torch.cuda.graph(graph):
        loss = sk.sym_kl(a, b, mask=mask, backend=backend)
        loss.backward()
    with torch.no_grad():
        a.copy_(logits(16, 5000, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    a64 = a.detach().double().requires_grad_()
    ref = reference.sym_kl(a64, b.double(), mask=mask)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(a.grad, a64.grad) <= 1e-5


def test_auto_backend_on_cuda_is_a_kernel():
    assert _backends.choose("sym_kl", None, torch.device("cuda")) in ("native", "triton")


def test_native_cuda_is_built():
    assert sk.backends()["native"].cuda is None, sk.backends()["native"].cuda
