"""ema_update_ / ema: every backend that runs here against the reference (DESIGN §3, §4, §6).

Non-contiguous pairs are handled (updated correctly by a per-pair fallback), not rejected."""

from __future__ import annotations

import csv
import gc
import os
import subprocess
import sys

import pytest
import torch
from helpers import CPU_BACKENDS, max_err

import smart_kernels as sk
from smart_kernels import reference
from smart_kernels.ops import ema as ema_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_ema  # noqa: E402

MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}
EPS = {
    dt: torch.finfo(dt).eps for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}
ODD_SHAPES = [(3,), (17, 5), (1,), (2, 3, 7), (1000,), (33, 31)]


def rand(*shape, dtype=torch.float32, scale=1.0):
    """Random values, never all zeros."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def pairs(shapes, t_dtype=torch.float32, s_dtype=None):
    teacher = [rand(*s, dtype=t_dtype) for s in shapes]
    student = [rand(*s, dtype=s_dtype or t_dtype) for s in shapes]
    return teacher, student


def expected(teacher, student, decay):
    """The reference applied to copies."""
    ref = [t.clone() for t in teacher]
    reference.ema_update_(ref, student, decay)
    return ref


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at |x| (x in float64)."""
    _, e = torch.frexp(x.abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x), e - MANTISSA_BITS[dtype] - 1)


def scale_of(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.maximum(t.double().abs(), s.double().abs())


# ----------------------------------------------------------------------------------------------
# values against the reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("decay", [0.99, 0.5, 0.123])
def test_float64_matches_reference(backend, decay):
    teacher, student = pairs(ODD_SHAPES, torch.float64)
    ref = expected(teacher, student, decay)
    sk.ema_update_(teacher, student, decay, backend=backend)
    for t, r, s in zip(teacher, ref, student, strict=True):
        assert t.dtype == torch.float64
        assert ((t - r).abs() <= 2 * ulp(scale_of(r, s), torch.float64)).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("decay", [0.999, 0.99, 0.7, 0.123])
def test_float32_within_2ulp_of_lerp(backend, decay):
    """Within 2 ulp (at max(|t|, |s|)) of t.lerp_(s, 1 - decay) and of the fp64 value."""
    teacher, student = pairs(ODD_SHAPES)
    lerp = [t.clone().lerp_(s, 1 - decay) for t, s in zip(teacher, student, strict=True)]
    exact = [
        t.double() * decay + s.double() * (1 - decay) for t, s in zip(teacher, student, strict=True)
    ]
    scales = [scale_of(t, s) for t, s in zip(teacher, student, strict=True)]
    sk.ema_update_(teacher, student, decay, backend=backend)
    for t, lp, ex, sc in zip(teacher, lerp, exact, scales, strict=True):
        assert t.dtype == torch.float32
        tol = 2 * ulp(sc, torch.float32)
        assert ((t.double() - lp.double()).abs() <= tol).all()
        assert ((t.double() - ex).abs() <= tol).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "t_dtype,s_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_mixed_dtypes(backend, t_dtype, s_dtype):
    teacher, student = pairs(ODD_SHAPES, t_dtype, s_dtype)
    ref = expected(teacher, student, 0.9)
    sk.ema_update_(teacher, student, 0.9, backend=backend)
    for t, r, s in zip(teacher, ref, student, strict=True):
        assert t.dtype == t_dtype
        # computed in fp32 (fp64) and rounded once to the teacher's dtype: at most one rounding
        # step of the teacher's dtype away from the reference (at the operands' magnitude)
        tol = ulp(scale_of(r, s), t_dtype) + 4 * ulp(scale_of(r, s), torch.float32)
        assert ((t.double() - r.double()).abs() <= tol).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_floating_pairs_are_copied(backend):
    teacher = [
        torch.arange(7),
        torch.zeros(5, dtype=torch.int32),
        torch.tensor([True, False, True]),
        torch.zeros(3, 4, dtype=torch.uint8),
        rand(9),
    ]
    student = [
        torch.arange(7) * 3 + 1,
        torch.arange(5, dtype=torch.int32) - 2,
        torch.tensor([False, True, True]),
        torch.full((3, 4), 200, dtype=torch.uint8),
        rand(9),
    ]
    ref = expected(teacher, student, 0.9)
    sk.ema_update_(teacher, student, 0.9, backend=backend)
    for t, s in zip(teacher[:4], student[:4], strict=True):
        assert t.dtype == s.dtype and torch.equal(t, s)
    assert max_err(teacher[4], ref[4]) <= 4 * EPS[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty(backend):
    sk.ema_update_([], [], 0.9, backend=backend)
    sk.ema_update_((), (), torch.tensor(0.5), backend=backend)
    teacher, student = pairs([(0,), (3, 0), (4,)])
    ref = expected(teacher, student, 0.25)
    sk.ema_update_(teacher, student, 0.25, backend=backend)
    assert teacher[0].shape == (0,) and teacher[1].shape == (3, 0)
    assert max_err(teacher[2], ref[2]) <= 4 * EPS[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_big_and_many_tiny(backend):
    """A tensor spanning several chunks of the multi-tensor kernels and 300 odd tiny ones."""
    gen = torch.Generator().manual_seed(1)
    tiny = [(int(n),) for n in torch.randint(1, 40, (300,), generator=gen)]
    shapes = [(131_075,), *tiny, (3, 4097)]
    teacher, student = pairs(shapes)
    ref = expected(teacher, student, 0.97)
    sk.ema_update_(teacher, student, 0.97, backend=backend)
    assert max(max_err(t, r) for t, r in zip(teacher, ref, strict=True)) <= 8 * EPS[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_pairs_handled(backend):
    base_t, base_s = rand(12, 10), rand(10, 12)
    teacher = [rand(10, 12).t(), rand(8, 6)[:, ::2], base_t[2:5], rand(7), rand(4, 5)]
    student = [rand(12, 10), rand(8, 3), base_s.t()[2:5], rand(14)[::2], rand(5, 4).t()]
    ref = expected(teacher, student, 0.8)
    sk.ema_update_(teacher, student, 0.8, backend=backend)
    for t, r in zip(teacher, ref, strict=True):
        assert max_err(t, r) <= 4 * EPS[torch.float32]
    assert not teacher[0].is_contiguous()  # updated in place, layout kept


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_misaligned_views(backend):
    """Views into flat buffers at odd element offsets (not 16-byte aligned): contiguous, so on
    the fused path (the kernels' unaligned group)."""
    flat_t, flat_s = rand(5000), rand(5000, dtype=torch.bfloat16)
    teacher = [flat_t[1:4098], flat_t[4099:4110].view(11), flat_t[4112:4128]]
    student = [flat_s[3:4100], flat_s[4100:4111].view(11), flat_s[4112:4128]]
    gaps = flat_t[[0, 4098, 4110, 4111, 4128]].clone()
    ref = expected(teacher, student, 0.875)
    sk.ema_update_(teacher, student, 0.875, backend=backend)
    for t, r in zip(teacher, ref, strict=True):
        assert max_err(t, r) <= 4 * EPS[torch.float32]
    assert torch.equal(flat_t[[0, 4098, 4110, 4111, 4128]], gaps)  # neighbours untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_memory_sharing_that_is_allowed(backend):
    """What the overlap check must not reject: one student for two teachers, students that
    overlap one another, and interleaved teacher views (their spans overlap, their elements
    do not)."""
    grid = rand(6, 2)
    flat_s = rand(8)
    teacher = [rand(5), rand(5), grid[:, 0], grid[:, 1]]
    student = [flat_s[:5], flat_s[3:], flat_s[:6], flat_s[2:]]
    ref = expected(teacher, student, 0.7)
    sk.ema_update_(teacher, student, 0.7, backend=backend)
    for t, r in zip(teacher, ref, strict=True):
        assert max_err(t, r) <= 4 * EPS[torch.float32]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("decay_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_tensor_decay(backend, decay_dtype):
    decay = torch.tensor(0.93, dtype=decay_dtype)
    for t_dtype in (torch.float32, torch.float64):
        teacher, student = pairs(ODD_SHAPES, t_dtype)
        value = decay.double().item()
        ref = expected(teacher, student, value if t_dtype == torch.float64 else decay)
        sk.ema_update_(teacher, student, decay, backend=backend)
        for t, r, s in zip(teacher, ref, student, strict=True):
            assert ((t.double() - r.double()).abs() <= 2 * ulp(scale_of(r, s), t_dtype)).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize(
    "t_dtype,s_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_decay_zero_and_one_exact(backend, as_tensor, t_dtype, s_dtype):
    teacher, student = pairs(ODD_SHAPES, t_dtype, s_dtype)
    before = [t.clone() for t in teacher]
    one = torch.tensor(1.0) if as_tensor else 1.0
    sk.ema_update_(teacher, student, one, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(teacher, before, strict=True))
    zero = torch.tensor(0.0) if as_tensor else 0
    sk.ema_update_(teacher, student, zero, backend=backend)
    assert all(torch.equal(t, s.to(t_dtype)) for t, s in zip(teacher, student, strict=True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_teacher_requiring_grad(backend):
    """Parameters that require grad are updated in place (no autograd error, no graph)."""
    teacher = [torch.nn.Parameter(rand(4, 3)), torch.nn.Parameter(rand(3))]
    student = [rand(4, 3), rand(3)]
    ref = expected([t.detach() for t in teacher], student, 0.6)
    sk.ema_update_(teacher, student, 0.6, backend=backend)
    assert all(t.grad_fn is None and t.requires_grad for t in teacher)
    assert max(max_err(t, r) for t, r in zip(teacher, ref, strict=True)) <= 4 * EPS[torch.float32]


# ----------------------------------------------------------------------------------------------
# repeated updates: the cache of prepared lists, EmaPlan


def test_repeated_updates_use_the_cache_and_follow_storage_changes():
    teacher, student = pairs([(5, 3), (7,)])
    sk.ema_update_(teacher, student, 0.5)
    key = ema_ops._key(teacher, student)
    plan = ema_ops._PLANS.plans[key]
    sk.ema_update_(list(teacher), list(student), 0.5)  # new lists, same tensors: same plan
    assert ema_ops._PLANS.plans[key] is plan
    # a storage swap (param.data = ...) changes the key: prepared again, and correct
    teacher[0].data = rand(5, 3)
    ref = expected(teacher, student, 0.5)
    sk.ema_update_(teacher, student, 0.5)
    assert max_err(teacher[0], ref[0]) <= 4 * EPS[torch.float32]
    # a freed tensor drops its entries (its id can then be reused safely)
    new_key = ema_ops._key(teacher, student)
    assert new_key in ema_ops._PLANS.plans
    del teacher, student, ref
    gc.collect()
    assert key not in ema_ops._PLANS.plans and new_key not in ema_ops._PLANS.plans


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ema_plan(backend):
    teacher, student = pairs([(6, 2), (3,), (4, 4)])
    teacher.append(torch.arange(3))
    student.append(torch.arange(3) + 4)
    plan = ema_ops.EmaPlan(teacher, student, backend=backend)
    assert plan.backend == backend
    decay = torch.tensor(0.7, dtype=torch.float64)
    for value in (0.7, 0.2):
        decay.fill_(value)
        ref = expected(teacher, student, value)
        plan(decay)
        assert max(max_err(t, r) for t, r in zip(teacher, ref, strict=True)) <= 8e-7
    teacher[2].data = rand(4, 4)  # storage moved: the plan notices and re-prepares
    ref = expected(teacher, student, 0.2)
    plan(decay)
    assert max_err(teacher[2], ref[2]) <= 4 * EPS[torch.float32]
    with pytest.raises(ValueError, match="decay"):
        plan(1.5)


# ----------------------------------------------------------------------------------------------
# functional ema and its gradients


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("decay", [0.3, "tensor"])
def test_ema_gradcheck(backend, decay):
    d = torch.tensor(0.3, dtype=torch.float64) if decay == "tensor" else decay
    t = rand(3, 5, dtype=torch.float64).requires_grad_()
    s = rand(3, 5, dtype=torch.float64).requires_grad_()
    fn = lambda a, b: sk.ema(a, b, d, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (t, s))
    assert torch.autograd.gradgradcheck(fn, (t, s))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "t_dtype,s_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float64),
    ],
)
def test_ema_values_and_grad_dtypes(backend, t_dtype, s_dtype):
    t = rand(4, 33, dtype=t_dtype).requires_grad_()
    s = rand(4, 33, dtype=s_dtype).requires_grad_()
    out = sk.ema(t, s, 0.9, backend=backend)
    ref = reference.ema(t.detach().double(), s.detach().double(), 0.9)
    assert out.dtype == t_dtype and out.shape == t.shape
    assert max_err(out, ref) <= 4 * EPS[t_dtype]
    g = rand(4, 33, dtype=t_dtype)
    out.backward(g)
    assert t.grad.dtype == t_dtype and s.grad.dtype == s_dtype
    assert max_err(t.grad, g.double() * 0.9) <= 2 * EPS[t_dtype]
    assert max_err(s.grad, g.double() * 0.1) <= 2 * EPS[s_dtype]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ema_non_contiguous_empty_and_decay_tensor_without_grad(backend):
    t, s = rand(6, 4).t(), rand(4, 6)
    d = torch.tensor(0.25, requires_grad=True)
    out = sk.ema(t, s, d, backend=backend)
    assert max_err(out, reference.ema(t.double(), s.double(), 0.25)) <= 4 * EPS[torch.float32]
    assert not out.requires_grad  # no gradient to the decay
    assert sk.ema(rand(0, 3), rand(0, 3), 0.5, backend=backend).shape == (0, 3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_traced_by_torch_compile_fullgraph(backend):
    """Dynamo traces both ops without a graph break (aot_eager: no compiler needed here)."""
    torch._dynamo.reset()
    d = torch.tensor(0.3)
    teacher, student = pairs([(5, 3), (4,)], torch.float32, torch.bfloat16)
    teacher += [rand(4, 3).t(), torch.arange(3)]
    student += [rand(3, 4), torch.arange(3) + 1]
    ref = expected(teacher, student, d)
    update = torch.compile(
        lambda T, S, w: sk.ema_update_(T, S, w, backend=backend),
        backend="aot_eager",
        fullgraph=True,
    )
    update(teacher, student, d)
    for t, r in zip(teacher, ref, strict=True):
        assert max_err(t, r) <= 4 * EPS[torch.float32]
    fn = torch.compile(
        lambda a, b, w: sk.ema(a, b, w, backend=backend) * 2, backend="aot_eager", fullgraph=True
    )
    t, s = rand(4, 5).requires_grad_(), rand(4, 5).requires_grad_()
    out = fn(t, s, d)
    out.sum().backward()
    assert max_err(out, 2 * reference.ema(t.detach(), s.detach(), 0.3)) <= 4 * EPS[torch.float32]
    assert max_err(t.grad, torch.full_like(t, 0.6)) <= 2 * EPS[torch.float32]
    assert max_err(s.grad, torch.full_like(s, 1.4)) <= 2 * EPS[torch.float32]


@pytest.mark.parametrize(
    "backend,names",
    [("native", ("ema_update_", "ema")), ("triton", ("ema_update_triton", "ema_triton"))],
)
def test_opcheck(backend, names):
    """ema_update_ / ema (native) and ema_update_triton / ema_triton: torch.library.opcheck."""
    if backend not in CPU_BACKENDS:
        pytest.skip(f"{backend} backend not usable on CPU here")
    ops = torch.ops.smart_kernels
    update, ema = (getattr(ops, n) for n in names)
    teacher, student = pairs([(5, 3), (7,)])
    teacher.append(torch.arange(4))
    student.append(torch.arange(4) + 1)
    for dt in (None, torch.tensor(0.4)):
        torch.library.opcheck(update.default, (teacher, student, dt, 0.4))
        t = rand(3, 4).requires_grad_()
        s = rand(3, 4, dtype=torch.bfloat16).requires_grad_()
        torch.library.opcheck(ema.default, (t, s, dt, 0.4))


# ----------------------------------------------------------------------------------------------
# errors: raised before any kernel, naming the argument


def meta(*shape):
    return torch.empty(shape, device="meta")


def long(*shape):
    return torch.ones(*shape, dtype=torch.long)


def twice():
    t = rand(3)
    return [t, t]


def tied():
    t = rand(3)
    return [t, t.detach()]  # two objects, one memory (a state_dict() of tied weights)


def views():
    base = rand(6)
    return [base[:4], base[2:]]


def aliases_student():
    teacher = [rand(3), rand(3)]
    return teacher, [rand(3), teacher[0].view(3)], 0.9


def inside_long_student():
    flat = rand(8)  # student[0] spans all; student[1] sorts between it and teacher[1]
    return [rand(8), flat[4:5]], [flat, flat[1:2]], 0.9


S0, S1, T0, T1 = r"student\[0\]", r"student\[1\]", r"teacher\[0\]", r"teacher\[1\]"
UPDATE_ERRORS = [
    # (description, (teacher, student, decay) builder, exception, text in the message)
    ("lengths differ", lambda: ([rand(3)], [rand(3), rand(2)], 0.9), ValueError, "student"),
    ("shape at 1", lambda: ([rand(3), rand(4)], [rand(3), rand(5)], 0.9), ValueError, S1),
    ("mixed devices", lambda: ([rand(3), rand(2)], [rand(3), meta(2)], 0.9), ValueError, S1),
    ("teacher devices", lambda: ([rand(3), meta(2)], [rand(3), rand(2)], 0.9), ValueError, T1),
    ("int student", lambda: ([rand(3)], [long(3)], 0.9), TypeError, S0),
    ("float student of int", lambda: ([long(3)], [rand(3)], 0.9), TypeError, S0),
    ("complex", lambda: ([rand(3).to(torch.complex64)], [rand(3)], 0.9), TypeError, T0),
    ("not a tensor", lambda: ([rand(3), [1.0]], [rand(3), rand(1)], 0.9), TypeError, T1),
    ("a tensor, not a list", lambda: (rand(3), rand(3), 0.9), TypeError, "teacher"),
    ("listed twice", lambda: (twice(), [rand(3), rand(3)], 0.9), ValueError, T1),
    ("tied, twice", lambda: (tied(), [rand(3), rand(3)], 0.9), ValueError, T1),
    ("overlapping views", lambda: (views(), [rand(4), rand(4)], 0.9), ValueError, T1),
    ("teacher is student", lambda: (*[[rand(3)]] * 2, 0.9), ValueError, S0),
    ("aliases a student", lambda: aliases_student(), ValueError, S1),
    ("inside a long student", lambda: inside_long_student(), ValueError, S0),
    ("decay > 1", lambda: ([rand(3)], [rand(3)], 1.5), ValueError, "decay"),
    ("decay < 0", lambda: ([rand(3)], [rand(3)], -0.01), ValueError, "decay"),
    ("decay nan", lambda: ([rand(3)], [rand(3)], float("nan")), ValueError, "decay"),
    ("decay bool", lambda: ([rand(3)], [rand(3)], True), TypeError, "decay"),
    ("decay str", lambda: ([rand(3)], [rand(3)], "0.9"), TypeError, "decay"),
    ("decay 1-d", lambda: ([rand(3)], [rand(3)], torch.tensor([0.9])), ValueError, "decay"),
    ("decay int tensor", lambda: ([rand(3)], [rand(3)], torch.tensor(1)), TypeError, "decay"),
    ("decay device", lambda: ([rand(3)], [rand(3)], meta()), ValueError, "decay"),
    ("empty lists, bad decay", lambda: ([], [], 2.0), ValueError, "decay"),
]  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("desc,build,exc,text", UPDATE_ERRORS, ids=[c[0] for c in UPDATE_ERRORS])
def test_update_errors(backend, desc, build, exc, text):
    teacher, student, decay = build()
    before = [t.clone() for t in teacher if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    with pytest.raises(exc, match=text):
        sk.ema_update_(teacher, student, decay, backend=backend)
    after = [t for t in teacher if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=False))  # nothing ran


EMA_ERRORS = [
    ("shape", lambda: (rand(3), rand(4), 0.5), ValueError, "student"),
    ("device", lambda: (rand(3), meta(3), 0.5), ValueError, "student"),
    ("int teacher", lambda: (long(3), rand(3), 0.5), TypeError, "teacher"),
    ("int student", lambda: (rand(3), long(3), 0.5), TypeError, "student"),
    ("not a tensor", lambda: ([1.0], rand(1), 0.5), TypeError, "teacher"),
    ("decay > 1", lambda: (rand(3), rand(3), 1.01), ValueError, "decay"),
    ("decay < 0", lambda: (rand(3), rand(3), -1.0), ValueError, "decay"),
    ("decay 1-d", lambda: (rand(3), rand(3), torch.ones(1)), ValueError, "decay"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("desc,build,exc,text", EMA_ERRORS, ids=[c[0] for c in EMA_ERRORS])
def test_ema_errors(backend, desc, build, exc, text):
    teacher, student, decay = build()
    with pytest.raises(exc, match=text):
        sk.ema(teacher, student, decay, backend=backend)


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="backend"):
        sk.ema_update_([rand(3)], [rand(3)], 0.5, backend="nope")
    with pytest.raises(RuntimeError, match="ema.*meta"):  # an explicit backend never falls back
        sk.ema_update_([meta(3)], [meta(3)], 0.5, backend="triton")
    with pytest.raises(RuntimeError, match="ema.*meta"):
        sk.ema(meta(3), meta(3), 0.5, backend="native")


# ----------------------------------------------------------------------------------------------
# the benchmark runs on tiny shapes (tests/test_benchmarks.py runs sym_kl and kl only)


def test_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--device", "cpu", "--op", "ema",
         "--out", str(tmp_path), "--no-progress", "--no-plots"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert not [r for r in rows if r["metric"] == "error"]
    names = {p.name for p in bench_ema.providers(torch.device("cpu"))}
    for name in names:
        mine = [r for r in rows if r["provider"] == name]
        assert mine and all(r["note"] for r in mine if r["metric"] == "skipped"), name
    timed = {(r["provider"], r["dtype"]) for r in rows if r["metric"] == "time"}
    assert {("eager", "float32"), ("flat-lerp", "float32+bfloat16")} <= timed
    assert {r["mode"] for r in rows} == {"fwd"}


def test_overlap_check_matches_pairwise():
    """The one-sort overlap check against every pair, on random 1-d views of one buffer."""
    from smart_kernels.ops.ema import _check_no_overlap

    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(128)
    outcomes = []
    for _ in range(400):
        n = int(torch.randint(1, 5, (), generator=gen))
        starts = torch.randint(0, 112, (2 * n,), generator=gen).tolist()
        ends = [a + int(torch.randint(1, 17, (), generator=gen)) for a in starts]
        views = [base[a:b] for a, b in zip(starts, ends, strict=True)]
        teacher, student = views[:n], views[n:]
        ranges = [(a, b, i < n) for i, (a, b) in enumerate(zip(starts, ends, strict=True))]
        clash = any(
            x[0] < y[1] and y[0] < x[1] and (x[2] or y[2])
            for k, x in enumerate(ranges)
            for y in ranges[k + 1 :]
        )
        outcomes.append(clash)
        if clash:
            with pytest.raises(ValueError, match="shares memory"):
                _check_no_overlap(teacher, student)
        else:
            _check_no_overlap(teacher, student)
    assert min(sum(outcomes), len(outcomes) - sum(outcomes)) >= 100  # both outcomes exercised
    # A wrapper subclass without storage reports data_ptr 0: not checked, not a false clash.
    from torch.testing._internal.two_tensor import TwoTensor

    wrappers = [TwoTensor(rand(3), rand(3)) for _ in range(4)]
    _check_no_overlap(wrappers[:2], wrappers[2:])
