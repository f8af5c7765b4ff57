"""Bad input raises a clear ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS, logits

import smart_kernels as sk


def ok():
    return logits(4, 6), logits(4, 6)


CASES = [
    # (description, kwargs builder, exception, argument named in the message)
    ("shape mismatch", lambda: dict(input=logits(4, 6), target=logits(4, 7)), ValueError, "target"),
    ("V = 0", lambda: dict(input=logits(4, 0), target=logits(4, 0)), ValueError, "input"),
    (
        "0-d input",
        lambda: dict(input=torch.tensor(1.0), target=torch.tensor(1.0)),
        ValueError,
        "input",
    ),
    (
        "integer input",
        lambda: dict(input=torch.ones(4, 6, dtype=torch.long), target=logits(4, 6)),
        TypeError,
        "input",
    ),
    (
        "integer target",
        lambda: dict(input=logits(4, 6), target=torch.ones(4, 6, dtype=torch.int32)),
        TypeError,
        "target",
    ),
    (
        "mixed dtypes",
        lambda: dict(input=logits(4, 6), target=logits(4, 6, dtype=torch.float64)),
        TypeError,
        "target",
    ),
    ("not a tensor", lambda: dict(input=[[1.0, 2.0]], target=logits(1, 2)), TypeError, "input"),
    (
        "mixed devices",
        lambda: dict(input=logits(4, 6), target=logits(4, 6, device="meta")),
        ValueError,
        "target",
    ),
    (
        "unknown reduction",
        lambda: dict(input=ok()[0], target=ok()[1], reduction="avg"),
        ValueError,
        "reduction",
    ),
    (
        "unknown grad",
        lambda: dict(input=ok()[0], target=ok()[1], grad="partial"),
        ValueError,
        "grad",
    ),
    (
        "mask wrong shape",
        lambda: dict(input=ok()[0], target=ok()[1], mask=torch.ones(4, 6, dtype=torch.bool)),
        ValueError,
        "mask",
    ),
    (
        "mask wrong dtype",
        lambda: dict(input=ok()[0], target=ok()[1], mask=torch.ones(4)),
        TypeError,
        "mask",
    ),
    (
        "mask not a tensor",
        lambda: dict(input=ok()[0], target=ok()[1], mask=[True] * 4),
        TypeError,
        "mask",
    ),
    (
        "mask on another device",
        lambda: dict(
            input=ok()[0], target=ok()[1], mask=torch.ones(4, dtype=torch.bool, device="meta")
        ),
        ValueError,
        "mask",
    ),
    (
        "unknown backend",
        lambda: dict(input=ok()[0], target=ok()[1], backend="cuda"),
        ValueError,
        "backend",
    ),
]


PARAMS = [
    pytest.param(op, *case, id=f"{op.__name__}-{case[0]}")
    for op in (sk.sym_kl, sk.kl)
    for case in CASES
    if not (op is sk.kl and case[0] == "unknown grad")
]  # kl has no grad argument


@pytest.mark.parametrize("op,desc,build,exc,arg", PARAMS)
def test_bad_input(op, desc, build, exc, arg):
    kwargs = build()
    with pytest.raises(exc, match=arg):
        op(kwargs.pop("input"), kwargs.pop("target"), **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_errors_raised_before_kernels(backend):
    """Validation happens at the public boundary, whatever the backend."""
    with pytest.raises(ValueError, match="target"):
        sk.sym_kl(logits(3, 5), logits(3, 4), backend=backend)


def test_explicit_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if sk.backends()["triton"].cpu is None:
        pytest.skip("triton runs on CPU tensors here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1|triton not installed"):
        sk.sym_kl(logits(3, 5), logits(3, 5), backend="triton")


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda x, b: sk.sym_kl(x, x, backend=b), "sym_kl"),
        (lambda x, b: sk.kl(x, x, backend=b), "kl"),
        (lambda x, b: sk.normalize(x, backend=b), "normalize"),
        (lambda x, b: sk.perturb_step(x, x, backend=b), "perturb_step"),
        (lambda x, b: sk.init_noise(x, backend=b), "init_noise"),
        (lambda x, b: sk.ema(x, x, 0.9, backend=b), "ema"),
        (lambda x, b: sk.ema_update_([x], [x], 0.9, backend=b), "ema_update_"),
    ],
)
def test_backend_that_cannot_run_names_the_function(call, name):
    """An explicit backend that cannot run on the tensors' device names the public function."""
    with pytest.raises(RuntimeError, match=rf"^{name}: backend='native' cannot run on meta"):
        call(torch.empty(2, 3, 4, device="meta"), "native")


def test_env_backend_override(monkeypatch):
    from smart_kernels import _backends

    monkeypatch.setenv("SMART_KERNELS_BACKEND", "reference")
    assert _backends.choose("sym_kl", None, torch.device("cpu")) == "reference"
    a, b = logits(3, 5), logits(3, 5)
    monkeypatch.setenv("SMART_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SMART_KERNELS_BACKEND"):
        sk.sym_kl(a, b)


def test_raw_op_rejects_bad_layout():
    """The raw native op checks its own inputs too: a clear RuntimeError, never a crash."""
    if sk.backends()["native"].cpu is not None:
        pytest.skip("native backend not built")
    with pytest.raises(RuntimeError, match="shapes differ"):
        torch.ops.smart_kernels.sym_kl_fwd(logits(3, 5), logits(3, 4), None, 0, 2)
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.smart_kernels.sym_kl_fwd(logits(3, 5), logits(3, 5), None, 7, 2)
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.smart_kernels.sym_kl(logits(3, 5), logits(3, 5), None, 0, 9)
    f8 = logits(3, 5).to(torch.float8_e5m2)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        torch.ops.smart_kernels.sym_kl_fwd(f8, f8, None, 0, 2)


# ---- perturbation ops -------------------------------------------------------------------------


def emb(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


PERTURB_CASES = [
    # (description, call, exception, argument named in the message)
    ("normalize: unknown norm", lambda: sk.normalize(emb(2, 3), norm="l3"), ValueError, "norm"),
    (
        "normalize: unknown scope",
        lambda: sk.normalize(emb(2, 3), scope="batch"),
        ValueError,
        "scope",
    ),
    ("normalize: sequence on 1-D", lambda: sk.normalize(emb(5), scope="sequence"), ValueError, "x"),
    ("normalize: 0-d", lambda: sk.normalize(torch.tensor(1.0)), ValueError, "x"),
    (
        "normalize: integer",
        lambda: sk.normalize(torch.ones(2, 3, dtype=torch.long)),
        TypeError,
        "x",
    ),
    ("normalize: negative eps", lambda: sk.normalize(emb(2, 3), eps=-1.0), ValueError, "eps"),
    ("normalize: not a tensor", lambda: sk.normalize([1.0, 2.0]), TypeError, "x"),
    (
        "step: shape mismatch",
        lambda: sk.perturb_step(emb(2, 3, 4), emb(2, 3, 5)),
        ValueError,
        "grad",
    ),
    (
        "step: dtype mismatch",
        lambda: sk.perturb_step(emb(2, 3, 4), emb(2, 3, 4, dtype=torch.float64)),
        TypeError,
        "grad",
    ),
    (
        "step: unknown rule",
        lambda: sk.perturb_step(emb(2, 4), emb(2, 4), rule="x"),
        ValueError,
        "rule",
    ),
    (
        "step: unknown norm",
        lambda: sk.perturb_step(emb(2, 4), emb(2, 4), norm=2),
        ValueError,
        "norm",
    ),
    (
        "step: negative step_size",
        lambda: sk.perturb_step(emb(2, 4), emb(2, 4), step_size=-1e-3),
        ValueError,
        "step_size",
    ),
    (
        "step: negative radius",
        lambda: sk.perturb_step(emb(2, 4), emb(2, 4), radius=-1.0),
        ValueError,
        "radius",
    ),
    (
        "step: nan step_size",
        lambda: sk.perturb_step(emb(2, 4), emb(2, 4), step_size=float("nan")),
        ValueError,
        "step_size",
    ),
    (
        "step: radius as string",
        lambda: sk.perturb_step(emb(2, 4), emb(2, 4), radius="1e-5"),
        TypeError,
        "radius",
    ),
    (
        "step: mask shape",
        lambda: sk.perturb_step(
            emb(2, 3, 4), emb(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool)
        ),
        ValueError,
        "mask",
    ),
    (
        "step: mask dtype",
        lambda: sk.perturb_step(emb(2, 3, 4), emb(2, 3, 4), mask=torch.ones(2, 3)),
        TypeError,
        "mask",
    ),
    ("normalize: eps = 0", lambda: sk.normalize(emb(2, 3), eps=0.0), ValueError, "eps"),
    ("step: eps = 0", lambda: sk.perturb_step(emb(2, 4), emb(2, 4), eps=0), ValueError, "eps"),
    ("noise: negative std", lambda: sk.init_noise(emb(2, 4), -1.0), ValueError, "std"),
    (
        "noise: integer like",
        lambda: sk.init_noise(torch.ones(2, 4, dtype=torch.int32)),
        TypeError,
        "like",
    ),
    (
        "noise: mask shape",
        lambda: sk.init_noise(emb(2, 4), mask=torch.ones(4, dtype=torch.bool)),
        ValueError,
        "mask",
    ),
    (
        "noise: generator type",
        lambda: sk.init_noise(emb(2, 4), generator=1234),
        TypeError,
        "generator",
    ),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("desc,call,exc,arg", PERTURB_CASES, ids=[c[0] for c in PERTURB_CASES])
def test_perturb_bad_input(backend, desc, call, exc, arg, monkeypatch):
    monkeypatch.setenv("SMART_KERNELS_BACKEND", backend)
    with pytest.raises(exc, match=rf"^{arg}:"):
        call()
