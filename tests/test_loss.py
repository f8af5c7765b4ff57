"""SMARTLoss and bregman_loss: the algorithm against a hand-written SMART step, on every backend
that runs here; sequence- and token-level logits, regression, masks, errors."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BACKENDS
from torch import nn

import smart_kernels as sk
from smart_kernels import reference


class TinyEncoder(nn.Module):
    """Word embeddings -> a small nonlinear encoder -> logits [B, C] or [B, T, C]."""

    def __init__(self, vocab=50, hidden=16, classes=3, token_level=False, dtype=torch.float64):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden, dtype=dtype)
        self.mix = nn.Linear(hidden, hidden, dtype=dtype)
        self.head = nn.Linear(hidden, classes, dtype=dtype)
        self.token_level = token_level

    def forward(self, embed, mask=None):
        h = torch.tanh(self.mix(embed))
        if self.token_level:
            return self.head(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.head(h.mean(-2))


def fixed_noise(like, std=1e-5, *, mask=None, generator=None, backend=None):
    """A deterministic stand-in for sk.init_noise (same contract), so that the manual SMART step
    starts from the same δ₀ (at δ = 0 the ascent gradient is exactly 0). Drawn on the CPU and
    moved to ``like``'s device: the same δ₀ on every device."""
    g = torch.Generator().manual_seed(1234)
    noise = (torch.randn(like.shape, generator=g, dtype=like.dtype) * 1e-2).to(like.device)
    return noise if mask is None else noise * mask.unsqueeze(-1)


def manual_smart(model, embed, logits, mask, *, steps, step_size, radius, rows=None):
    """SMART written out with plain PyTorch from δ₀ = fixed_noise: S steps of
    δ <- clamp(δ + η g / (max|g| + eps), -ε, ε) per token, then ℓ_s(f(x + δ), f(x)) over
    ``rows`` (default: ``mask`` for token-level logits)."""
    if rows is None:
        rows = mask if (mask is not None and logits.dim() == 3) else None
    noise = fixed_noise(embed, mask=mask)
    for _ in range(steps):
        noise.requires_grad_()
        inner = reference.sym_kl(model(embed.detach() + noise, mask), logits.detach(), mask=rows)
        (g,) = torch.autograd.grad(inner, noise)
        g = g * mask.unsqueeze(-1)
        unit = g / (g.abs().amax(-1, keepdim=True) + 1e-6)
        noise = (noise.detach() + step_size * unit).clamp(-radius, radius)
        noise = noise * mask.unsqueeze(-1)
    return reference.sym_kl(model(embed + noise, mask), logits, mask=rows)


def _batch(token_level=False, seed=0, masked=True):
    torch.manual_seed(seed)
    model = TinyEncoder(token_level=token_level)
    ids = torch.randint(0, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.bool)
    if masked:
        mask[1, 5:] = False
        mask[3, 2:] = False
    return model, ids, mask


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("token_level", [False, True])
@pytest.mark.parametrize("steps", [0, 1, 2])
def test_matches_manual_smart(backend, token_level, steps, monkeypatch):
    monkeypatch.setattr(sk.loss, "init_noise", fixed_noise)
    model, ids, mask = _batch(token_level)
    kw = dict(step_size=0.5, radius=0.05)  # large enough that the steps matter

    def run(fn):
        model.zero_grad()
        embed = model.word(ids)
        logits = model(embed, mask)
        loss = fn(embed, logits)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    smart = sk.SMARTLoss(lambda e, m: model(e, m), num_steps=steps, backend=backend, **kw)
    ours, ours_grads = run(lambda e, lg: smart(e, lg, mask=mask, m=mask))
    ref, ref_grads = run(lambda e, lg: manual_smart(model, e, lg, mask, steps=steps, **kw))
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert ours.item() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_mask_separate_from_noise_mask(backend, monkeypatch):
    """Token-level: every attended token gets noise; only the ``loss_mask`` rows (e.g. labelled
    tokens) count in the ascent and in R_s. Differs from masking both with the row mask."""
    monkeypatch.setattr(sk.loss, "init_noise", fixed_noise)
    model, ids, mask = _batch(token_level=True)
    rows = mask.clone()
    rows[0, :3] = False
    rows[2, 4:] = False
    kw = dict(step_size=0.5, radius=0.05)

    def mixed(e, m):  # tokens see each other: noise on a row-masked token still matters
        return model(e + e.mean(-2, keepdim=True), m)

    def run(fn):
        model.zero_grad()
        embed = model.word(ids)
        loss = fn(embed, mixed(embed, mask))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    smart = sk.SMARTLoss(lambda e: mixed(e, mask), num_steps=1, backend=backend, **kw)
    ours, ours_grads = run(lambda e, lg: smart(e, lg, mask=mask, loss_mask=rows.int()))
    ref, ref_grads = run(lambda e, lg: manual_smart(mixed, e, lg, mask, steps=1, rows=rows, **kw))
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    both, _ = run(lambda e, lg: smart(e, lg, mask=rows))  # rows as the noise mask too
    assert not torch.allclose(ours, both, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inner_steps_leave_no_parameter_gradient(backend):
    model, ids, mask = _batch()
    embed = model.word(ids)
    logits = model(embed, mask)
    smart = sk.SMARTLoss(lambda e: model(e, mask), num_steps=2, backend=backend)
    loss = smart(embed, logits, mask=mask)
    assert all(p.grad is None for p in model.parameters())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_gets_no_noise(backend):
    model, ids, mask = _batch(token_level=True)
    seen = []

    def eval_fn(e):
        seen.append(e.detach() - embed.detach())
        return model(e)

    embed = model.word(ids)
    smart = sk.SMARTLoss(eval_fn, num_steps=1, noise_std=1e-3, radius=1e-2, backend=backend)
    smart(embed, model(embed), mask=mask).backward()
    for noise in seen:
        assert (noise[~mask] == 0).all() and (noise[mask] != 0).any()
        assert noise.abs().max() <= 1e-2 * (1 + 1e-12)


def test_regression_and_mse(monkeypatch):
    monkeypatch.setattr(sk.loss, "init_noise", fixed_noise)
    torch.manual_seed(0)
    model = TinyEncoder(classes=1)
    embed = model.word(torch.randint(0, 50, (5, 6)))
    logits = model(embed)
    ours = sk.SMARTLoss(model, num_steps=1, noise_std=0.0, step_size=0.5, radius=0.05)
    explicit = sk.SMARTLoss(
        model, loss="mse", num_steps=1, noise_std=0.0, step_size=0.5, radius=0.05
    )
    a, b = ours(embed, logits), explicit(embed, logits)
    assert torch.equal(a, b) and a.item() > 0
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    assert torch.allclose(sk.loss.mse_loss(x, y), ((x - y) ** 2).sum(-1).mean())
    for grad in ("full", "stop_grad"):  # squared error: the two conventions are one
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        sk.loss.mse_loss(xg, yg, grad=grad, reduction="sum").backward()
        assert torch.allclose(xg.grad, 2 * (x - y)) and torch.allclose(yg.grad, 2 * (y - x))


def test_bregman_loss_casts_teacher_logits():
    """bf16 student logits (autocast) against fp32 teacher logits: the teacher's are cast."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5).bfloat16().requires_grad_()
    teacher = torch.randn(6, 5)
    d = sk.bregman_loss(logits, teacher)
    d.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(d, sk.bregman_loss(logits, teacher.bfloat16()))
    with pytest.raises(TypeError, match="^teacher_logits:"):
        sk.bregman_loss(logits, torch.ones(6, 5, dtype=torch.long))


@pytest.mark.parametrize("loss", ["sym_kl", "mse"])
@pytest.mark.parametrize("cols", [1, 3])
def test_bregman_loss_bad_inputs(loss, cols):
    """Both paths (sym_kl, and squared error for mse or one column) check the teacher's shape
    (no broadcasting), the mask and the reduction, naming the argument."""
    logits = torch.randn(4, cols)
    with pytest.raises(ValueError, match="^teacher_logits: expected the shape of logits"):
        sk.bregman_loss(logits, torch.randn(4), loss=loss)
    with pytest.raises(ValueError, match="^teacher_logits: expected the shape of logits"):
        sk.bregman_loss(logits, torch.randn(1, cols), loss=loss)
    with pytest.raises(ValueError, match="^reduction:"):
        sk.bregman_loss(logits, torch.randn(4, cols), loss=loss, reduction="avg")
    with pytest.raises(ValueError, match="^mask:"):
        sk.bregman_loss(logits, torch.randn(4, cols), loss=loss, mask=torch.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="^mask:"):
        sk.bregman_loss(logits, torch.randn(4, cols), loss=loss, mask=torch.ones(4))
    with pytest.raises(ValueError, match="^logits:"):
        sk.bregman_loss(torch.tensor(1.0), torch.tensor(1.0), loss=loss)
    rows = torch.tensor([True, False, True, True])
    full = sk.bregman_loss(logits, 2 * logits, loss=loss, mask=rows.long(), reduction="none")
    assert full.shape == (4,) and full[1] == 0 and (full[rows] > 0).all()


def test_bregman_loss_one_column_is_squared_error():
    """Regression logits [B, 1]: D_Breg is the squared error, as R_s (not a symmetric KL over
    one class, which is always 0)."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 1), torch.randn(5, 1)
    d = sk.bregman_loss(logits, teacher)
    assert d > 0
    torch.testing.assert_close(d, sk.bregman_loss(logits, teacher, loss="mse"))
    torch.testing.assert_close(d, ((logits - teacher) ** 2).mean())


def test_custom_loss_callable():
    model, ids, mask = _batch()
    embed = model.word(ids)
    logits = model(embed, mask)
    calls = []

    def my_loss(a, b):
        calls.append(1)
        return F.mse_loss(a, b, reduction="sum")

    loss = sk.SMARTLoss(lambda e: model(e, mask), loss=my_loss, num_steps=2)(embed, logits)
    assert len(calls) == 3 and loss.item() >= 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bregman_loss(backend):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    d = sk.bregman_loss(logits, teacher, backend=backend)
    d.backward()
    assert teacher.grad is None
    logits64 = logits.detach().clone().requires_grad_()
    ref = reference.sym_kl(logits64, teacher.detach())
    ref.backward()
    assert torch.allclose(d, ref) and torch.allclose(logits.grad, logits64.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_warns_when_the_perturbation_rounds_away(dtype):
    """Pure low-precision embeddings: the paper's radius 1e-5 is below their resolution, so
    embed + δ == embed almost everywhere and R_s ≈ 0; SMARTLoss says so once. fp32 embeddings
    (autocast) and a radius above the resolution give no warning."""
    torch.manual_seed(0)
    model = TinyEncoder(dtype=dtype)
    embed = model.word(torch.randint(0, 50, (4, 7)))
    smart = sk.SMARTLoss(model, num_steps=1)
    with pytest.warns(UserWarning, match="rounded away"):
        r_s = smart(embed, model(embed))
    assert r_s.abs() < 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smart(embed, model(embed))  # once per dtype
        big = sk.SMARTLoss(model, num_steps=1, radius=0.05, step_size=0.05, noise_std=1e-2)
        big(embed, model(embed))
        fp32 = TinyEncoder(dtype=torch.float32)
        e32 = fp32.word(torch.randint(0, 50, (4, 7)))
        sk.SMARTLoss(fp32, num_steps=1)(e32, fp32(e32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_warns_under_low_precision_autocast(dtype):
    """fp32 embeddings under bf16/fp16 autocast: the first matmul rounds its inputs to the
    autocast dtype, so the paper's δ mostly vanishes; SMARTLoss says so once per dtype, not
    outside autocast, and not when the radius is above the resolution."""
    torch.manual_seed(0)
    model = TinyEncoder(dtype=torch.float32)
    embed = model.word(torch.randint(0, 50, (4, 7)))
    smart = sk.SMARTLoss(model, num_steps=1)
    with pytest.warns(UserWarning, match=f"under {dtype} autocast"):
        with torch.autocast("cpu", dtype=dtype):
            smart(embed, model(embed))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=dtype):
            smart(embed, model(embed))  # once
            big = sk.SMARTLoss(model, num_steps=1, radius=0.05, step_size=0.05, noise_std=1e-2)
            big(embed, model(embed))
        sk.SMARTLoss(model, num_steps=1)(embed, model(embed))  # fp32, no autocast


@pytest.mark.filterwarnings("ignore:SMARTLoss. under torch.bfloat16 autocast")
def test_autocast_bf16_cpu():
    torch.manual_seed(0)
    model = TinyEncoder(dtype=torch.float32)
    embed = model.word(torch.randint(0, 50, (4, 7)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(embed)
        loss = sk.SMARTLoss(model, num_steps=1)(embed, logits)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def compiled_matches_eager(
    device: str, backend: str, what: str, compiler: str = "inductor", dtype=torch.float64
) -> None:
    """torch.compile (``compiler``) of the model, or of the SMARTLoss call itself (the ascent's
    autograd.grad breaks the graph; the fused ops trace through their fake kernels): R_s and the
    parameter gradients equal eager's for the same δ₀ (fallback_random: a compiled graph draws
    init_noise's seed as eager does). fp64: equal to ~1e-9 (no rounding noise in the ascent
    direction); fp32: to ~1e-5. Shared by the CPU and GPU tests."""
    torch.manual_seed(0)
    model = TinyEncoder(dtype=dtype).to(device)
    ids = torch.randint(0, 50, (4, 7), device=device)
    mask = torch.ones(4, 7, dtype=torch.bool, device=device)
    mask[1, 5:] = False

    def run(compiled: bool):
        model.zero_grad()
        fn = torch.compile(model, backend=compiler) if compiled and what == "model" else model
        smart = sk.SMARTLoss(fn, num_steps=2, step_size=0.5, radius=0.05, backend=backend)
        call = torch.compile(smart, backend=compiler) if compiled and what == "loss" else smart
        embed = model.word(ids)
        logits = fn(embed, mask)
        torch.manual_seed(7)  # the same δ₀
        loss = call(embed, logits, mask=mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        eager, eager_grads = run(False)
        compiled, compiled_grads = run(True)
    torch._dynamo.reset()
    assert eager > 0
    fp64 = dtype == torch.float64
    torch.testing.assert_close(compiled, eager, rtol=1e-9 if fp64 else 1e-5, atol=0)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8 if fp64 else 1e-4, atol=1e-12 if fp64 else 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("what", ["model", "loss"])
def test_compiled_matches_eager_cpu(backend, what):
    """aot_eager (AOT autograd tracing, no C++ build), fp32, every CPU backend."""
    compiled_matches_eager("cpu", backend, what, "aot_eager", torch.float32)


@pytest.mark.skipif("native" not in CPU_BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("what", ["model", "loss"])
def test_inductor_matches_eager_cpu(what):
    """Inductor (the default backend), fp64."""
    compiled_matches_eager("cpu", "native", what)


BAD = [
    (dict(eval_fn=1), TypeError, "eval_fn"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(loss="kl"), ValueError, "loss"),
    (dict(num_steps=-1), ValueError, "num_steps"),
    (dict(num_steps=1.5), ValueError, "num_steps"),
    (dict(step_size=-1.0), ValueError, "step_size"),
    (dict(noise_std=float("nan")), ValueError, "noise_std"),
    (dict(radius=-1e-5), ValueError, "radius"),
    (dict(norm="l3"), ValueError, "norm"),
    (dict(scope="batch"), ValueError, "scope"),
    (dict(rule="x"), ValueError, "rule"),
    (dict(grad="none"), ValueError, "grad"),
    (dict(reduction="none"), ValueError, "reduction"),
    (dict(eps=0.0), ValueError, "eps"),
]


@pytest.mark.parametrize("kw,exc,arg", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments(kw, exc, arg):
    kw = {"eval_fn": lambda e: e, **kw}
    with pytest.raises(exc, match=rf"^{arg}:"):
        sk.SMARTLoss(**kw)


def test_bad_forward_inputs():
    smart = sk.SMARTLoss(lambda e: e.sum(-2))
    embed, logits = torch.randn(2, 3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="^mask:"):
        smart(embed, logits, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="^loss_mask:"):
        smart(embed, logits, loss_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="^loss_mask:"):
        smart(embed, logits, loss_mask=[True, False])
    with pytest.raises(ValueError, match="^embed:"):
        smart(torch.randn(4), logits)
    with pytest.raises(TypeError, match="^embed:"):
        smart(torch.ones(2, 3, 4, dtype=torch.long), logits)
    with pytest.raises(TypeError, match="^mask: expected a bool or integer tensor"):
        smart(embed, logits, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"^logits: expected the shape of eval_fn\(embed\)"):
        smart(embed, logits[:1])
    with pytest.raises(ValueError, match="^logits:"):
        smart(embed, torch.tensor(0.5))


def test_swapped_embed_and_logits_get_a_note():
    """forward(logits, embed) fails inside the model; the error keeps its type and message and
    gains a note with both shapes and the argument order."""
    if sys.version_info < (3, 11):
        pytest.skip("exception notes need Python 3.11")
    model, ids, mask = _batch()
    embed = model.word(ids)
    logits = model(embed)
    with pytest.raises(RuntimeError) as info:
        sk.SMARTLoss(model)(logits, embed)
    note = "\n".join(info.value.__notes__)
    assert "embed of shape (4, 3) and logits of shape (4, 7, 16)" in note
    assert "forward takes (embed, logits)" in note


def test_bad_eval_fn_output_and_loss_result():
    """eval_fn must return the logits tensor (not a model-output object); a callable loss must
    return a scalar."""
    embed, logits = torch.randn(2, 3, 4), torch.randn(2, 4)

    class Output:  # stands in for a Hugging Face ModelOutput
        logits = None

    with pytest.raises(TypeError, match="^eval_fn: expected it to return a logits tensor"):
        sk.SMARTLoss(lambda e: Output())(embed, logits)
    per_row = sk.SMARTLoss(lambda e: e.sum(-2), loss=lambda a, b: ((a - b) ** 2).sum(-1))
    with pytest.raises(ValueError, match="^loss: a callable loss must return a 0-d tensor"):
        per_row(embed, logits)
