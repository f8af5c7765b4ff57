"""ema_update_ / ema / MomentumTeacher on a CUDA device: the CUDA C++ and compiled Triton kernels
against the reference on BERT-base's 201-tensor list (fp32 and mixed precision), one launch per
dtype combination, misaligned views, a tensor of more than 2^31 elements, CUDA-graph capture of
MomentumTeacher.update replayed with a changed decay, torch.compile(fullgraph=True). Skipped
without a GPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers import GPU_BACKENDS, max_err
from test_ema import scale_of, ulp
from test_teacher import Net, manual_update, teacher_state
from torch import nn

import smart_kernels as sk
from smart_kernels import reference

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_ema import bert_shapes  # noqa: E402

pytestmark = pytest.mark.gpu
ALL_BACKENDS = ["reference", *GPU_BACKENDS]


def cuda_lists(shapes, t_dtype, s_dtype):
    teacher = [torch.randn(s, device="cuda").to(t_dtype) for s in shapes]
    student = [torch.randn(s, device="cuda").to(s_dtype) for s in shapes]
    return teacher, student


def check(teacher, ref, student, t_dtype):
    """Within 2 ulp of fp32 (fp64) at max(|t|, |s|), plus one rounding step of a bf16/fp16
    teacher (the kernels may fuse multiply-adds that the reference rounds separately)."""
    acc = torch.float64 if t_dtype == torch.float64 else torch.float32
    for i, (t, r, s) in enumerate(zip(teacher, ref, student, strict=True)):
        sc = scale_of(r, s)
        tol = 2 * ulp(sc, acc) + (ulp(sc, t_dtype) if t_dtype != acc else 0)
        assert t.dtype == t_dtype
        assert ((t.double() - r.double()).abs() <= tol).all(), i


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "t_dtype,s_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float64),
    ],
)
@pytest.mark.parametrize("decay_kind", ["float", "tensor"])
def test_bert_base_list(backend, t_dtype, s_dtype, decay_kind):
    shapes = bert_shapes()
    assert len(shapes) == 201
    teacher, student = cuda_lists(shapes, t_dtype, s_dtype)
    decay = 0.999 if decay_kind == "float" else torch.tensor(0.999, device="cuda")
    ref = [t.clone() for t in teacher]
    reference.ema_update_(ref, student, decay)
    sk.ema_update_(teacher, student, decay, backend=backend)
    check(teacher, ref, student, t_dtype)
    reference.ema_update_(ref, student, decay)  # again: the cached table / plan
    sk.ema_update_(teacher, student, decay, backend=backend)
    check(teacher, ref, student, t_dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_one_launch_for_the_bert_list(backend):
    teacher, student = cuda_lists(bert_shapes(), torch.float32, torch.float32)
    decay = torch.tensor(0.99, device="cuda")
    sk.ema_update_(teacher, student, decay, backend=backend)  # warm-up: compile, table
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sk.ema_update_(teacher, student, decay, backend=backend)
        torch.cuda.synchronize()
    kernels = [
        e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
        and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()
    ]  # fmt: skip
    assert len(kernels) == 1, [e.name for e in kernels]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mixed_groups_misaligned_views_and_copies(backend):
    flat_t = torch.randn(10_000, device="cuda")
    flat_s = torch.randn(10_000, device="cuda").bfloat16()
    teacher = [flat_t[1:4001], flat_t[4003:4100].view(97), torch.randn(77, 3, device="cuda")]
    student = [flat_s[3:4003], flat_s[5:102], torch.randn(77, 3, device="cuda").half()]
    teacher += [torch.arange(1000, device="cuda"), torch.zeros(9, dtype=torch.bool, device="cuda")]
    student += [
        torch.arange(1000, device="cuda") + 5,
        torch.ones(9, dtype=torch.bool, device="cuda"),
    ]
    teacher += [torch.randn(40, 50, device="cuda").t(), torch.randn(0, device="cuda")]
    student += [torch.randn(50, 40, device="cuda"), torch.randn(0, device="cuda")]
    ref = [t.clone() for t in teacher]
    reference.ema_update_(ref, student, 0.9)
    sk.ema_update_(teacher, student, 0.9, backend=backend)
    check(teacher[:3], ref[:3], student[:3], torch.float32)
    assert torch.equal(teacher[3], student[3]) and torch.equal(teacher[4], student[4])
    assert max_err(teacher[5], ref[5]) <= 1e-6


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements(backend):
    n = 2**31 + 17
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~9 GB of GPU memory")
    teacher = torch.full((n,), 2.0, dtype=torch.float16, device="cuda")
    student = torch.full((n,), 4.0, dtype=torch.float16, device="cuda")
    student[-5:] = 8.0
    sk.ema_update_([teacher], [student], 0.5, backend=backend)
    assert (teacher[:1000] == 3.0).all() and (teacher[2**31 - 3 : 2**31 + 3] == 3.0).all()
    assert (teacher[-5:] == 5.0).all() and (teacher[-17:-5] == 3.0).all()
    del teacher, student
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.bfloat16), (torch.float64,) * 2])
def test_ema_values_and_gradients(backend, t_dtype, s_dtype):
    t = torch.randn(33, 1025, device="cuda", dtype=t_dtype, requires_grad=True)
    s = torch.randn(33, 1025, device="cuda", dtype=s_dtype, requires_grad=True)
    d = torch.tensor(0.8, device="cuda", dtype=torch.float64)  # 0.8 exactly as in the reference
    out = sk.ema(t, s, d, backend=backend)
    ref = reference.ema(t.detach().double(), s.detach().double(), 0.8)
    eps = torch.finfo(t_dtype).eps
    assert out.dtype == t_dtype and max_err(out, ref) <= 8 * eps
    g = torch.randn_like(out)
    out.backward(g)
    assert t.grad.dtype == t_dtype and s.grad.dtype == s_dtype
    assert max_err(t.grad, g.double() * 0.8) <= 4 * eps
    assert max_err(s.grad, g.double() * 0.2) <= 4 * torch.finfo(s_dtype).eps
    if t_dtype == torch.float64:
        a = torch.randn(4, 5, device="cuda", dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, 5, device="cuda", dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, y: sk.ema(x, y, d, backend=backend), (a, b))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_cuda_graph_capture_of_update_replayed_with_new_decay(backend):
    torch.manual_seed(0)
    model = Net().cuda()
    teacher = sk.MomentumTeacher(model, schedule=lambda step: 0.9, backend=backend)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (kernels compiled, table built)
        teacher.update(model)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        teacher.update(model)
    assert teacher.step == 1  # the capture counted nothing
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    for decay in (0.5, 0.0, 0.75):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.25)  # the student moves, in place
            model.position_ids.add_(3)
        teacher.set_decay(decay)
        graph.replay()
        manual_update(state, model, decay)
        torch.cuda.synchronize()
        for name, value in teacher_state(teacher).items():
            want = state[name]
            if want.is_floating_point():
                assert max_err(value, want) <= 1e-5 * (1 + want.abs().max().item()), name
            else:
                assert torch.equal(value, want), name
    assert teacher.advance() == 0.9 and teacher.step == 2
    graph.replay()
    manual_update(state, model, 0.9)
    torch.cuda.synchronize()
    for name, value in teacher_state(teacher).items():
        if value.is_floating_point():
            assert max_err(value, state[name]) <= 1e-5 * (1 + state[name].abs().max().item())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_momentum_teacher_on_cuda(backend):
    torch.manual_seed(0)
    model = Net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = sk.MomentumTeacher(model, schedule="paper", total_steps=20, backend=backend)
    low = sk.MomentumTeacher(model, schedule="paper", total_steps=20, dtype=torch.bfloat16)
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    for step in range(4):
        model.train()
        loss = model(torch.randint(0, 11, (8, 4), device="cuda")).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(model)
        low.update(nn.DataParallel(model))
        manual_update(state, model, teacher.decay_at(step))
    for name, value in teacher_state(teacher).items():
        if value.is_floating_point():
            assert max_err(value, state[name]) <= 1e-5 * (1 + state[name].abs().max().item())
    assert all(v.dtype in (torch.bfloat16, torch.int64) for v in teacher_state(low).values())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    t = torch.randn(64, 33, device="cuda", requires_grad=True)
    s = torch.randn(64, 33, device="cuda", requires_grad=True)
    d = torch.tensor(0.7, device="cuda")
    fn = torch.compile(lambda a, b, w: sk.ema(a, b, w, backend=backend) * 2, fullgraph=True)
    out = fn(t, s, d)
    out.sum().backward()
    assert max_err(out, 2 * reference.ema(t.detach(), s.detach(), 0.7)) <= 1e-5
    assert max_err(t.grad, torch.full_like(t, 1.4)) <= 1e-6
    assert max_err(s.grad, torch.full_like(s, 0.6)) <= 1e-6
    teacher, student = cuda_lists([(5, 7), (300,), (2, 2)], torch.float32, torch.bfloat16)
    ref = [x.clone() for x in teacher]
    reference.ema_update_(ref, student, d)
    update = torch.compile(lambda T, S, w: sk.ema_update_(T, S, w, backend=backend), fullgraph=True)
    update(teacher, student, d)
    check(teacher, ref, student, torch.float32)
