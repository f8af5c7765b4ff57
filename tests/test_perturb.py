"""normalize / perturb_step / init_noise: every backend that runs here against the float64
reference (DESIGN §3, §6)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import CPU_BACKENDS, KERNEL_BACKENDS_CPU, max_err

import smart_kernels as sk
from smart_kernels import reference

NORMS = ["inf", "l2", "l1"]
SCOPES = ["token", "sequence"]
RULES = ["paper", "normalize_sum"]
SHAPES = [(2, 3, 5), (4, 1), (2, 7, 1000), (3, 9, 33)]  # H = 1, H odd, H not a block multiple


def close(x: torch.Tensor, ref: torch.Tensor, rtol: float) -> bool:
    """max |x - ref| <= rtol * max |ref| (ref may be ~1e-5 in scale: no absolute floor)."""
    assert x.shape == ref.shape
    return max_err(x, ref) <= rtol * ref.double().abs().max().item() + 1e-300


def within_eager(
    x: torch.Tensor,
    eager: torch.Tensor,
    ref64: torch.Tensor,
    slack: torch.Tensor | None = None,
) -> bool:
    """DESIGN §6 for bf16/fp16, element by element: |x - ref| <= 2 |eager - ref| + 1 ulp,
    where eager is PyTorch's own computation on the same low-precision inputs (the reference:
    fp32 arithmetic, one rounding at the end). ``slack`` (float64, like x; see ``fp32_slack``):
    what fp32 evaluation may add where the result is a near-cancellation of larger terms."""
    err = (x.double() - ref64).abs()
    eager_err = (eager.double() - ref64).abs()
    # 1 ulp: eps * |ref| for normal numbers, the smallest subnormal below (fp16 outputs of the
    # paper rule, radius spread over a group, are often subnormal)
    info = torch.finfo(x.dtype)
    bound = 2 * eager_err + info.eps * ref64.abs() + info.smallest_normal * info.eps
    if slack is not None:
        bound = bound + slack
    return bool((err <= bound).all())


SLACK_ULP = 64  # fp32 ulp of the terms of d + step * u (see fp32_slack)


def fp32_slack(
    noise: torch.Tensor,
    grad: torch.Tensor,
    step_size: float = 1e-3,
    *,
    rule: str,
    norm: str,
    scope: str = "token",
    radius: float | None = 1e-5,
) -> torch.Tensor:
    """How far an fp32 evaluation of ``perturb_step`` (the op's arguments, no mask) may land
    from the fp64 oracle beyond the rounding of its result (float64, like noise).

    The kernels and eager PyTorch form ``s = d + step * u`` in fp32 (u = grad for
    ``normalize_sum``, normalize(grad) for the paper rule). Each carries a few fp32 ulp of the
    *terms* |d| + |step * u|: a fused multiply-add or not, a reciprocal-then-multiply scale,
    step_size rounded to fp32, and for the paper rule's l2 norm the accumulated rounding of the
    group's sum of squares (every summation order differs: a GPU's tree, the CPU's lanes, eager
    PyTorch's). Where s nearly cancels, those ulp are many ulp of the tiny result, each
    implementation leaves a different remainder and the 2x-eager rule alone cannot judge them:
    an H100 run failed it at bf16 [8, 2048, 4096], l2 token, paper rule, where |s| was ~70 fp32
    ulp of the terms and both GPU backends were off by ~0.75 ulp of the terms, eager by 0.03.
    The slack is SLACK_ULP fp32 ulp of the terms (85x that), scaled as the op scales s
    afterwards (the radius projection, normalize_sum's division by the group norm). Away from
    cancellation it is far below one bf16 / fp16 ulp of the result (64 * 2^-23 ~ 8e-6
    relative).

    Where |s| is within SLACK_ULP fp32 ulp of the terms the slack exceeds the result, so such
    elements are in effect unchecked (l1 ``normalize_sum``, which outputs sign(s), gets an
    infinite slack there: fp32 cannot decide the sign); they are asserted rare (at most 2, or
    1e-4 of them)."""
    d, g = noise.double(), grad.double()
    dims = reference.group_dims(scope)
    u = reference.normalize(g, norm=norm, scope=scope, eps=1e-6) if rule == "paper" else g
    t = step_size * u
    s = d + t
    slack = SLACK_ULP * torch.finfo(torch.float32).eps * (d.abs() + t.abs())
    undecided = s.abs() <= slack
    assert undecided.sum() <= max(2, 1e-4 * undecided.numel()), "cancellations must stay rare"
    if rule == "paper":
        if radius is not None and norm != "inf":  # inf: a clamp, which never widens an error
            n = torch.linalg.vector_norm(s, ord=2 if norm == "l2" else 1, dim=dims, keepdim=True)
            slack = slack * (radius / n).clamp(max=1.0)
        return slack
    if norm == "l1":
        return torch.where(undecided, math.inf, 0.0)
    if norm == "inf":
        scale = s.abs().amax(dim=dims, keepdim=True)
    else:
        scale = torch.linalg.vector_norm(s, dim=dims, keepdim=True)
    return slack / (scale + 1e-6)


def embeddings(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def random_mask(shape, drop_group: bool = True) -> torch.Tensor:
    """A token mask [..., T] with some tokens off and, optionally, one group entirely off."""
    mask = torch.rand(shape) > 0.3
    if drop_group and mask.dim() >= 1 and mask.shape[0] > 1:
        mask[0] = False
    return mask


# ----------------------------------------------------------------------------------------------
# normalize


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_normalize_matches_oracle_fp32(backend, norm, scope, shape):
    x = embeddings(*shape).requires_grad_()
    y = sk.normalize(x, norm=norm, scope=scope, backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = reference.normalize(x64, norm=norm, scope=scope)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert close(y, ref, 1e-5)
    go = torch.rand_like(ref) + 0.5
    y.backward(go.float())
    ref.backward(go)
    if norm == "l1":
        assert x.grad.abs().max() == 0
    else:
        # The gradient is a difference of two terms of size ~ |go| / norm; with H = 1 they
        # cancel down to ~eps / norm^2, so measure the error against the terms' size.
        terms = (go.abs().max() / x64.detach().abs().max()).item()
        assert max_err(x.grad, x64.grad) <= 1e-5 * max(x64.grad.abs().max().item(), terms)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", ["inf", "l2"])
@pytest.mark.parametrize("scope", SCOPES)
def test_normalize_gradcheck_fp64(backend, norm, scope):
    x = embeddings(2, 3, 6, dtype=torch.float64).requires_grad_()
    fn = lambda t: sk.normalize(t, norm=norm, scope=scope, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_normalize_inf_ties_split_like_amax(backend):
    x = torch.tensor([[3.0, -3.0, 1.0, 3.0], [0.5, -2.0, 2.0, 1.0]], dtype=torch.float64)
    x.requires_grad_()
    go = torch.rand(2, 4, dtype=torch.float64) + 0.5
    sk.normalize(x, backend=backend).backward(go)
    x64 = x.detach().clone().requires_grad_()
    reference.normalize(x64).backward(go)
    assert torch.allclose(x.grad, x64.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_normalize_zero_group_has_no_nan(backend, norm):
    x = embeddings(3, 8)
    x[1] = 0
    x.requires_grad_()
    y = sk.normalize(x, norm=norm, backend=backend)
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and (y[1] == 0).all()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", NORMS)
def test_normalize_low_precision(backend, dtype, norm):
    x = embeddings(4, 5, 77, dtype=dtype)
    y = sk.normalize(x, norm=norm, scope="sequence", backend=backend)
    ref = reference.normalize(x.double(), norm=norm, scope="sequence")
    assert y.dtype == dtype
    assert within_eager(y, reference.normalize(x, norm=norm, scope="sequence"), ref)


# ----------------------------------------------------------------------------------------------
# perturb_step

# (step_size, radius): radius None (no projection), binding (the paper's defaults) and partial.
STEPS = [(1e-3, None), (1e-3, 1e-5), (1e-3, 6e-4)]


def step_both(shape, backend, dtype=torch.float32, mask=None, grad_scale=1.0, **kw):
    noise = embeddings(*shape, dtype=dtype, scale=1e-5)
    grad = embeddings(*shape, dtype=dtype, scale=grad_scale)
    out = sk.perturb_step(noise, grad, mask=mask, backend=backend, **kw)
    ref = reference.perturb_step(noise.double(), grad.double(), mask=mask, **kw)
    return out, ref, noise, grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("step_size,radius", STEPS)
def test_perturb_step_matches_oracle_fp32(backend, norm, scope, rule, step_size, radius):
    kw = dict(norm=norm, scope=scope, rule=rule, step_size=step_size, radius=radius)
    out, ref, noise, _ = step_both((3, 5, 37), backend, **kw)
    assert out.dtype == noise.dtype and out.shape == noise.shape and not out.requires_grad
    assert close(out, ref, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("rule", RULES)
def test_perturb_step_mask(backend, norm, scope, rule):
    shape = (3, 6, 19)
    mask = random_mask(shape[:-1])
    kw = dict(norm=norm, scope=scope, rule=rule, radius=6e-4)
    out, ref, _, _ = step_both(shape, backend, mask=mask, **kw)
    assert close(out, ref, 1e-5)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scope", SCOPES)
def test_perturb_step_zero_grad_group_keeps_noise(backend, norm, scope):
    noise = embeddings(2, 4, 9, scale=1e-6)
    grad = embeddings(2, 4, 9)
    grad[1] = 0  # a whole sequence (and all of its tokens) with zero gradient
    out = sk.perturb_step(noise, grad, norm=norm, scope=scope, radius=None, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], noise[1])
    ref = reference.perturb_step(noise.double(), grad.double(), norm=norm, scope=scope, radius=None)
    assert close(out, ref, 1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_CPU)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("rule", RULES)
def test_perturb_step_large_sequence_group(backend, norm, rule):
    """Sequence-scope groups large enough for the split (multi-program) reduction."""
    out, ref, _, _ = step_both((2, 300, 1000), backend, norm=norm, scope="sequence", rule=rule)
    assert close(out, ref, 1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("rule", RULES)
def test_perturb_step_low_precision(backend, dtype, norm, rule):
    kw = dict(norm=norm, rule=rule, radius=6e-4)
    out, ref, noise, grad = step_both((4, 3, 65), backend, dtype=dtype, **kw)
    assert out.dtype == dtype
    # d + step u: the AVX2 copy contracts it to an FMA, as GPUs do
    slack = fp32_slack(noise, grad, **kw)
    assert within_eager(out, reference.perturb_step(noise, grad, **kw), ref, slack)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_perturb_step_non_contiguous(backend, scope):
    noise = embeddings(7, 3, 20, scale=1e-5).transpose(0, 1)  # [3, 7, 20], not contiguous
    grad = embeddings(20, 7, 3).permute(2, 1, 0)
    mask = (torch.rand(7, 3) > 0.2).t()
    assert not noise.is_contiguous() and not grad.is_contiguous() and not mask.is_contiguous()
    kw = dict(scope=scope, norm="l2", radius=1e-4, mask=mask)
    out = sk.perturb_step(noise, grad, backend=backend, **kw)
    ref = reference.perturb_step(noise.double(), grad.double(), **kw)
    assert close(out, ref, 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_perturb_step_nan_propagates_and_masked_nan_does_not(backend, norm):
    noise = embeddings(3, 4, 10, scale=1e-5)
    grad = embeddings(3, 4, 10)
    grad[0, 1, 2] = float("nan")  # an unmasked token: its sequence's output is NaN somewhere
    grad[1, 2, 3] = float("nan")  # a masked token: nothing of it may leak
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = False
    kw = dict(norm=norm, scope="sequence", radius=None, mask=mask)
    out = sk.perturb_step(noise, grad, backend=backend, **kw)
    ref = reference.perturb_step(noise.double(), grad.double(), **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out[0]).any()
    assert torch.isfinite(out[1:]).all()
    assert close(out[1:], ref[1:], 1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(
    "shape,scope", [((3, 0), "token"), ((2, 0, 4), "sequence"), ((0, 5), "token")]
)
def test_empty_groups(backend, norm, shape, scope):
    x = torch.empty(shape, requires_grad=True)
    y = sk.normalize(x, norm=norm, scope=scope, backend=backend)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    out = sk.perturb_step(x.detach(), x.detach(), norm=norm, scope=scope, backend=backend)
    assert out.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_normalize_non_contiguous(backend):
    x = embeddings(9, 4, 6).transpose(0, 2).requires_grad_()  # [6, 4, 9]
    y = sk.normalize(x, norm="l2", scope="sequence", backend=backend)
    x64 = x.detach().double().requires_grad_()
    ref = reference.normalize(x64, norm="l2", scope="sequence")
    assert close(y, ref, 1e-5)
    go = torch.rand_like(ref)
    y.backward(go.float())
    ref.backward(go)
    assert close(x.grad, x64.grad, 1e-5)


# ----------------------------------------------------------------------------------------------
# init_noise

NOISE_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"] + ["reference"]


@pytest.mark.parametrize("backend", NOISE_BACKENDS)
def test_init_noise_statistics(backend):
    like = torch.empty(64, 128, 128)  # 2^20 elements
    std = 3e-5
    noise = sk.init_noise(like, std, backend=backend)
    assert noise.shape == like.shape and noise.dtype == like.dtype and not noise.requires_grad
    z = noise.double().flatten() / std
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 0.005
    assert abs((z.abs() < 1).double().mean().item() - 0.682689) < 0.003
    assert abs((z.abs() > 3).double().mean().item() - 0.0026998) < 0.0006
    for lag in (1, 2, 3, 4, 128):  # neighbours share a Philox call / a token / nothing
        corr = (z[:-lag] * z[lag:]).mean().item()
        assert abs(corr) < 5 / math.sqrt(n), (lag, corr)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_init_noise_reproducible_and_masked(backend):
    like = torch.empty(4, 6, 33, dtype=torch.bfloat16)
    mask = random_mask((4, 6))
    a = sk.init_noise(
        like, 1.0, mask=mask, generator=torch.Generator().manual_seed(7), backend=backend
    )
    b = sk.init_noise(
        like, 1.0, mask=mask, generator=torch.Generator().manual_seed(7), backend=backend
    )
    c = sk.init_noise(
        like, 1.0, mask=mask, generator=torch.Generator().manual_seed(8), backend=backend
    )
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[~mask] == 0).all() and (a[mask] != 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_CPU)
def test_init_noise_advances_the_generator(backend):
    like = torch.empty(5, 16)
    gen = torch.Generator().manual_seed(0)
    first, second = (sk.init_noise(like, 1.0, generator=gen, backend=backend) for _ in range(2))
    assert not torch.equal(first, second)


# ----------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile


def _opcheck_cases():
    x = embeddings(2, 3, 5)
    g = embeddings(2, 3, 5)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    seed = torch.tensor(1234, dtype=torch.int64)
    inf = math.inf
    return {
        "normalize": (x.clone().requires_grad_(), 0, 1, 1e-6),
        "normalize_bwd": (g, x, 1, 0, 1e-6),
        "perturb_step": (x, g, mask, 1e-3, inf, 1, 1, 0, 1e-6),
        "init_noise": (x, mask, seed, 1e-5),
    }


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_CPU)
@pytest.mark.parametrize("op", ["normalize", "normalize_bwd", "perturb_step", "init_noise"])
def test_opcheck(backend, op):
    name = op if backend == "native" else f"{op}_triton"
    args = _opcheck_cases()[op]
    # init_noise: test_aot_dispatch_dynamic compares two runs of a random op with one seed.
    torch.library.opcheck(getattr(torch.ops.smart_kernels, name), args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_CPU)
def test_compile_fullgraph(backend):
    def step(noise, grad, x):
        new = sk.perturb_step(
            noise, grad, norm="l2", scope="sequence", radius=1e-4, backend=backend
        )
        return new, sk.normalize(x, backend=backend).sum()

    noise, grad = embeddings(2, 3, 8, scale=1e-5), embeddings(2, 3, 8)
    x = embeddings(2, 3, 8).requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    new, loss = compiled(noise, grad, x)
    loss.backward()
    ref = reference.perturb_step(noise, grad, norm="l2", scope="sequence", radius=1e-4)
    assert close(new, ref, 1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS_CPU)
def test_double_backward_refused(backend):
    x = embeddings(3, 4, dtype=torch.float64).requires_grad_()
    y = sk.normalize(x, norm="l2", backend=backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_native_cpu_is_thread_count_independent():
    if "native" not in CPU_BACKENDS:
        pytest.skip("smart_kernels._C not built")
    noise, grad = embeddings(2, 256, 1024, scale=1e-5), embeddings(2, 256, 1024)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            outs.append(sk.perturb_step(noise, grad, norm="l2", scope="sequence", backend="native"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
