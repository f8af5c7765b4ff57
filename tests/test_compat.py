"""smart_kernels.compat.smart_pytorch against the real smart-pytorch 0.0.4 package: the losses
(values, input and target gradients, every reduction, alpha != 1) and SMARTLoss (losses and
parameter gradients on small sequence- and token-level models with fixed seeds), on every
backend usable on CPU (selected with SMART_KERNELS_BACKEND)."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BACKENDS, logits, rel_err
from torch import nn

from smart_kernels.compat import smart_pytorch as cp

try:
    import smart_pytorch as sp
    from smart_pytorch import loss as sp_loss
    from smart_pytorch import smart_pytorch as sp_module
except ImportError:  # pragma: no cover - CI installs it (Makefile, TEST_NODEPS)
    sp = sp_loss = sp_module = None

needs_sp = pytest.mark.skipif(
    sp is None,
    reason="smart-pytorch is not installed (the parity oracle): `make setup` installs it, or "
    "`pip install --no-deps smart-pytorch==0.0.4`",
)
# F.kl_div warns on reduction="mean" (smart-pytorch's calls); the compat losses do not.
ignore_mean_warning = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")

LOSSES = ("kl_loss", "sym_kl_loss", "js_loss")
REDUCTIONS = ("sum", "batchmean", "mean", "none")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("SMART_KERNELS_BACKEND", request.param)
    return request.param


def _spy(monkeypatch, name: str) -> list[int]:
    """Count the calls compat makes to one of the ops it imported (``kl``, ``perturb_step``...)."""
    calls: list[int] = []
    real = getattr(cp, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cp, name, wrapper)
    return calls


def _run_loss(fn, x, y, grad_out, **kwargs):
    """fn(x, y, **kwargs) and the gradients of <grad_out, value> w.r.t. x and y."""
    x = x.clone().requires_grad_()
    y = y.clone().requires_grad_()
    value = fn(x, y, **kwargs)
    gx, gy = torch.autograd.grad((value * grad_out).sum(), (x, y), allow_unused=True)
    return value.detach(), gx, gy


def _assert_close(ours, theirs, tol: float, what: str) -> None:
    if theirs is None:
        assert ours is None or not ours.any(), what
        return
    assert ours is not None, f"{what}: no gradient"
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(theirs.shape)}"
    err = rel_err(ours, theirs)
    assert err <= tol, f"{what}: rel err {err:.3g} > {tol}"


# --------------------------------------------------------------------------------------------
# API surface


@needs_sp
def test_signatures_match():
    for name in LOSSES:
        ours = inspect.signature(getattr(cp, name))
        theirs = inspect.signature(getattr(sp_loss, name))
        assert [(p.name, p.default) for p in ours.parameters.values()] == [
            (p.name, p.default) for p in theirs.parameters.values()
        ], name
    ours = inspect.signature(cp.SMARTLoss.__init__).parameters
    theirs = inspect.signature(sp.SMARTLoss.__init__).parameters
    positional = [p for p in ours.values() if p.kind != inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in positional] == list(theirs)
    for p in positional:
        if p.name == "norm_fn":
            assert p.default is cp.inf_norm
        else:
            assert p.default == theirs[p.name].default, p.name
    assert [p.name for p in ours.values() if p not in positional] == ["fused_noise"]
    assert ours["fused_noise"].default is False
    assert list(inspect.signature(cp.SMARTLoss.forward).parameters) == ["self", "embed", "state"]


@needs_sp
def test_inf_norm_matches():
    x = torch.randn(3, 4, 9, dtype=torch.float64)
    assert torch.equal(cp.inf_norm(x), sp_module.inf_norm(x))


@needs_sp
def test_eval_fn_module_is_registered_like_smart_pytorch():
    model = nn.Linear(4, 3)
    ours, theirs = cp.SMARTLoss(model, cp.kl_loss), sp.SMARTLoss(model, sp.kl_loss)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.loss_last_fn is cp.kl_loss


# --------------------------------------------------------------------------------------------
# Losses


@needs_sp
@ignore_mean_warning
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 7), (7,)], ids=["NV", "BTV", "V"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_matches(backend, name, reduction, shape, dtype):
    x, y = logits(*shape, dtype=dtype), logits(*shape, dtype=dtype)
    grad_out = (
        torch.randn(shape, dtype=dtype) if reduction == "none" else torch.tensor(1.7, dtype=dtype)
    )
    alphas = [None] if name == "kl_loss" else [1.0, 0.3]
    for alpha in alphas:
        kwargs = {"reduction": reduction} | ({} if alpha is None else {"alpha": alpha})
        ours = _run_loss(getattr(cp, name), x, y, grad_out, **kwargs)
        theirs = _run_loss(getattr(sp_loss, name), x, y, grad_out, **kwargs)
        for what, a, b in zip(("value", "d/d input", "d/d target"), ours, theirs, strict=True):
            _assert_close(a, b, TOL[dtype], f"{name} alpha={alpha} {what}")


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "mean"])
def test_losses_run_on_the_kernels(backend, reduction, monkeypatch):
    """Row reductions go to the kernels: one fused sym_kl for alpha = 1, two kl otherwise."""
    kl_calls, sym_calls = _spy(monkeypatch, "kl"), _spy(monkeypatch, "sym_kl")
    x, y = logits(4, 5), logits(4, 5)
    cp.kl_loss(x, y, reduction=reduction)
    assert (len(kl_calls), len(sym_calls)) == (1, 0)
    cp.sym_kl_loss(x, y, reduction=reduction)
    assert (len(kl_calls), len(sym_calls)) == (1, 1)
    cp.sym_kl_loss(x, y, reduction=reduction, alpha=2.0)
    assert (len(kl_calls), len(sym_calls)) == (3, 1)
    cp.sym_kl_loss(x, y, reduction="none")  # elementwise: PyTorch
    assert (len(kl_calls), len(sym_calls)) == (3, 1)


@needs_sp
def test_sym_kl_loss_tensor_alpha(backend):
    """A tensor alpha (e.g. learned or scheduled) gets its gradient, as in smart-pytorch."""
    x, y = logits(4, 5, dtype=torch.float64), logits(4, 5, dtype=torch.float64)
    grads = []
    for fn in (cp.sym_kl_loss, sp.sym_kl_loss):
        alpha = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()
        value = fn(xi, yi, reduction="batchmean", alpha=alpha)
        grads.append((value.detach(), *torch.autograd.grad(value, (alpha, xi, yi))))
    for a, b in zip(*grads, strict=True):
        _assert_close(a, b, 1e-10, "tensor alpha")


@needs_sp
@ignore_mean_warning
@pytest.mark.parametrize("name", LOSSES)
def test_loss_fallbacks_match(name):
    """What the kernels do not take runs smart-pytorch's formula: broadcasting shapes, an empty
    batch (NaN for batchmean / mean, as F.kl_div), and the same error for a bad reduction."""
    ours_fn, theirs_fn = getattr(cp, name), getattr(sp_loss, name)
    x, y = logits(4, 6, dtype=torch.float64), logits(6, dtype=torch.float64)
    for reduction in REDUCTIONS:
        a = _run_loss(ours_fn, x, y, torch.tensor(1.0, dtype=x.dtype), reduction=reduction)
        b = _run_loss(theirs_fn, x, y, torch.tensor(1.0, dtype=x.dtype), reduction=reduction)
        for u, v in zip(a, b, strict=True):
            _assert_close(u, v, 1e-12, f"broadcast {reduction}")
    empty = torch.zeros(0, 5)
    for reduction in REDUCTIONS:
        ours, theirs = (
            ours_fn(empty, empty, reduction=reduction),
            theirs_fn(empty, empty, reduction=reduction),
        )
        assert ours.shape == theirs.shape
        assert torch.equal(ours.isnan(), theirs.isnan()), reduction
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        theirs_fn(x, x, reduction="avg")
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        ours_fn(x, x, reduction="avg")


def test_half_precision_losses_are_float32(backend):
    """Deliberate difference: the kernels compute in fp32 and return fp32 for bf16 logits."""
    x, y = logits(4, 5, dtype=torch.bfloat16), logits(4, 5, dtype=torch.bfloat16)
    for fn in (cp.kl_loss, cp.sym_kl_loss):
        value = fn(x, y)
        assert value.dtype == torch.float32
        ref = fn(x.double(), y.double())
        assert abs(value.item() - ref.item()) <= 1e-5 * max(abs(ref.item()), 1.0)


# --------------------------------------------------------------------------------------------
# SMARTLoss


class SeqModel(nn.Module):
    """Embeddings [B, T, H] -> logits [B, C] (mean-pooled MLP)."""

    def __init__(self, hidden: int = 8, classes: int = 5):
        super().__init__()
        self.inner = nn.Linear(hidden, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, embed):
        return self.out(torch.tanh(self.inner(embed)).mean(1))


class TokenModel(nn.Module):
    """Embeddings [B, T, H] -> per-token logits [B, T, V]."""

    def __init__(self, hidden: int = 8, vocab: int = 11):
        super().__init__()
        self.inner = nn.Linear(hidden, 16)
        self.out = nn.Linear(16, vocab)

    def forward(self, embed):
        return self.out(torch.tanh(self.inner(embed)))


MODELS = {"seq": SeqModel, "token": TokenModel}


def _smart_run(module, model, embed, seed, **kwargs):
    """One SMART regularizer pass with module's SMARTLoss: the loss, then the gradients of
    every parameter and of the embeddings after backward (flattened into one vector)."""
    model = copy.deepcopy(model)
    embed = embed.clone().requires_grad_()
    state = model(embed)
    loss_fn = kwargs.pop("loss_fn", module.sym_kl_loss)
    smart = module.SMARTLoss(model, loss_fn, **kwargs)
    torch.manual_seed(seed)
    loss = smart(embed, state)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()] + [embed.grad.flatten()])
    return loss.detach(), grads


def _model(kind: str, dtype: torch.dtype, gain: float = 1.0) -> nn.Module:
    model = MODELS[kind]().to(dtype)
    with torch.no_grad():  # gain > 1: logits of a few units, a well-conditioned fp32 loss
        for p in model.parameters():
            p.mul_(gain)
    return model


def _compare_smart(model, embed, tol, **kwargs):
    theirs = _smart_run(sp, model, embed, 1234, **{k: _theirs(v) for k, v in kwargs.items()})
    ours = _smart_run(cp, model, embed, 1234, **kwargs)
    _assert_close(ours[0], theirs[0], tol, "loss")
    _assert_close(ours[1], theirs[1], tol, "parameter and embedding gradients")
    return ours


def _theirs(value):
    """The smart-pytorch counterpart of a compat loss function (others are passed as given)."""
    if callable(value) and getattr(value, "__module__", "") == cp.__name__:
        return getattr(sp_loss, value.__name__, None) or getattr(sp_module, value.__name__)
    return value


@needs_sp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("num_steps", [0, 1, 2])
@pytest.mark.parametrize("kind", list(MODELS))
def test_smart_loss_matches(backend, kind, num_steps, dtype, monkeypatch):
    steps = _spy(monkeypatch, "perturb_step")
    model = _model(kind, dtype, gain=3.0)
    embed = torch.randn(4, 5, 8, dtype=dtype)
    # fp64: smart-pytorch's defaults. fp32 with its default noise_var (1e-5) is ill-conditioned
    # in both implementations: P - Q of logits 1e-5 apart is mostly rounding, so the loss at
    # num_steps = 0 (~1e-10) and the ascent gradient are off by 1e-2 relative to exact math,
    # and the step's direction by ~1e-5. A larger initial noise makes fp32 a meaningful test.
    if dtype == torch.float64:
        noise_var = 1e-5
    else:
        noise_var = 0.3 if num_steps == 0 else 1e-2
    loss, _ = _compare_smart(model, embed, TOL[dtype], num_steps=num_steps, noise_var=noise_var)
    assert loss > 0
    assert len(steps) == num_steps  # the fused step ran


@needs_sp
@pytest.mark.parametrize("loss_fn", ["kl_loss", "js_loss", "sym_kl_loss:batchmean", "mse"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_smart_loss_other_losses_match(backend, kind, loss_fn):
    """Other loss_fn (compat losses, another reduction, a plain PyTorch loss), a distinct
    loss_last_fn, two steps, non-default hyperparameters; fp64."""
    name, _, reduction = loss_fn.partition(":")
    if name == "mse":
        fn, last = F.mse_loss, F.mse_loss
    else:
        base = getattr(cp, name)
        fn = base if not reduction else _with_reduction(base, reduction)
        last = cp.sym_kl_loss
    model = _model(kind, torch.float64, gain=2.0)
    embed = torch.randn(3, 4, 8, dtype=torch.float64)
    _compare_smart(
        model, embed, 1e-10, loss_fn=fn, loss_last_fn=last, num_steps=2, step_size=0.5,
        epsilon=1e-4, noise_var=1e-3,
    )  # fmt: skip


def _with_reduction(fn, reduction):
    def loss(input, target):
        return fn(input, target, reduction=reduction)

    loss.__module__ = "tests"  # passed to both implementations as is
    return loss


@needs_sp
@pytest.mark.parametrize("norm", ["l2", "smart_pytorch_inf", "epsilon0"])
def test_smart_loss_norm_paths(backend, norm, monkeypatch):
    """A custom norm_fn (and epsilon = 0, which the fused step refuses) runs smart-pytorch's
    formula in PyTorch; smart-pytorch's own inf_norm passed explicitly takes the fused step."""
    steps = _spy(monkeypatch, "perturb_step")
    kwargs = {"num_steps": 2}
    if norm == "l2":
        kwargs["norm_fn"] = lambda x: torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    elif norm == "smart_pytorch_inf":
        kwargs["norm_fn"] = sp_module.inf_norm
    else:
        kwargs["epsilon"] = 0.0
    model = _model("token", torch.float64, gain=2.0)
    embed = torch.randn(3, 4, 8, dtype=torch.float64)
    _compare_smart(model, embed, 1e-10, **kwargs)
    assert len(steps) == (2 if norm == "smart_pytorch_inf" else 0)


def test_smart_loss_keeps_no_inner_parameter_gradients(backend):
    """The ascent steps differentiate only w.r.t. the noise: with num_steps = 2 the parameter
    gradients equal those of the final loss alone (as in smart-pytorch)."""
    model = _model("seq", torch.float64)
    embed = torch.randn(2, 3, 8, dtype=torch.float64)
    smart = cp.SMARTLoss(model, cp.sym_kl_loss, num_steps=2)
    state = model(embed)
    smart(embed, state)  # no backward: nothing may have accumulated
    assert all(p.grad is None for p in model.parameters())


def test_smart_loss_under_no_grad_and_float_steps(backend):
    model = _model("seq", torch.float64)
    embed = torch.randn(2, 3, 8, dtype=torch.float64)
    smart = cp.SMARTLoss(model, cp.sym_kl_loss, num_steps=2.0)  # smart-pytorch accepts 2.0
    torch.manual_seed(0)
    with torch.no_grad():
        value = smart(embed, model(embed))
    torch.manual_seed(0)
    expected = smart(embed, model(embed))
    assert torch.equal(value, expected.detach())


@pytest.mark.parametrize("num_steps", [-1, 1.5, float("inf"), "2"])
def test_smart_loss_bad_num_steps(num_steps):
    """smart-pytorch would loop forever (or compare a str to an int forever): refused."""
    with pytest.raises(ValueError, match="num_steps"):
        cp.SMARTLoss(nn.Identity(), cp.kl_loss, num_steps=num_steps)
    smart = cp.SMARTLoss(nn.Identity(), cp.kl_loss)
    smart.num_steps = num_steps
    with pytest.raises(ValueError, match="num_steps"):
        smart(torch.randn(2, 3), torch.randn(2, 3))


def test_smart_loss_fused_noise(backend, monkeypatch):
    """fused_noise=True draws the initial noise with init_noise (reproducible from the torch
    seed, another stream than randn_like) and still trains the model."""
    inits = _spy(monkeypatch, "init_noise")
    model = _model("token", torch.float32)
    embed = torch.randn(2, 3, 8)
    smart = cp.SMARTLoss(model, cp.sym_kl_loss, num_steps=0, noise_var=0.5, fused_noise=True)
    values = []
    for _ in range(2):
        torch.manual_seed(7)
        values.append(smart(embed, model(embed)))
    assert len(inits) == 2
    assert torch.equal(values[0], values[1])
    values[0].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.inner.weight.grad.abs().sum() > 0
