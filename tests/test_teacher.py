"""MomentumTeacher: schedules, update semantics against a manual EMA, buffers, state-dict round
trip, wrapper unwrapping, lower-precision teacher, forward without gradients, re-collection."""

from __future__ import annotations

import copy
import io
import socket

import pytest
import torch
from helpers import CPU_BACKENDS, max_err
from torch import nn

import smart_kernels as sk
from smart_kernels import reference


class Net(nn.Module):
    """Parameters, floating buffers (BatchNorm running stats), an integer buffer (BatchNorm's
    step count), a registered int64 buffer like BERT's position ids, and dropout."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(5, 3)
        self.register_buffer("position_ids", torch.arange(4))

    def forward(self, ids):
        x = self.emb(ids).mean(1)
        return self.head(self.drop(self.bn(self.lin(x))))


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.train()
    ids = torch.randint(0, 11, (8, 4))
    loss = model(ids).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.position_ids.add_(1)  # an integer buffer that changes


def manual_update(state: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """The reference EMA on a name -> tensor dict (floating: EMA; others: copied)."""
    student = dict(model.named_parameters()) | dict(model.named_buffers())
    names = list(state)
    reference.ema_update_([state[n] for n in names], [student[n].detach() for n in names], decay)


def teacher_state(teacher: sk.MomentumTeacher) -> dict[str, torch.Tensor]:
    return {k[len("module.") :]: v for k, v in teacher.state_dict().items() if k != "_extra_state"}


def assert_close(state: dict, teacher: sk.MomentumTeacher, tol: float = 1e-6) -> None:
    mine = teacher_state(teacher)
    assert mine.keys() == state.keys()
    for name, value in state.items():
        if value.is_floating_point():
            assert max_err(mine[name], value) <= tol, name
        else:
            assert torch.equal(mine[name], value), name


# ----------------------------------------------------------------------------------------------
# schedules


def test_paper_schedule_switches_at_ten_percent():
    teacher = sk.MomentumTeacher(nn.Linear(2, 2), schedule="paper", total_steps=100)
    assert [teacher.decay_at(s) for s in (0, 9, 10, 99, 500)] == [0.99, 0.99, 0.999, 0.999, 0.999]
    odd = sk.MomentumTeacher(nn.Linear(2, 2), schedule="paper", total_steps=105)
    assert odd.decay_at(10) == 0.99 and odd.decay_at(11) == 0.999  # 10.5 -> the first 11
    model = nn.Linear(2, 2)
    teacher = sk.MomentumTeacher(model, schedule="paper", total_steps=20)
    seen = []
    for _ in range(4):
        teacher.update(model)
        seen.append(teacher.decay)
    assert seen == [0.99, 0.99, 0.999, 0.999] and teacher.step == 4
    assert teacher.decay_tensor.item() == 0.999


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_callable_schedule_drives_the_updates(backend):
    torch.manual_seed(0)
    model = Net()
    schedule = lambda step: [0.5, 0.8, 0.0, 1.0, 0.9][step]  # noqa: E731
    teacher = sk.MomentumTeacher(model, schedule=schedule, backend=backend)
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        train_step(model, opt)
        teacher.update(model)
        manual_update(state, model, schedule(step))
        assert teacher.decay == schedule(step)
        assert_close(state, teacher)


def test_constant_decay():
    teacher = sk.MomentumTeacher(nn.Linear(2, 2), decay=0.95)
    assert teacher.decay == 0.95 and teacher.decay_at(12345) == 0.95
    assert teacher.decay_tensor.dim() == 0 and teacher.decay_tensor.dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# the update


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_update_matches_manual_ema_with_buffers(backend):
    model = Net()
    teacher = sk.MomentumTeacher(model, decay=0.9, backend=backend)
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        train_step(model, opt)
        teacher.update(model)
        manual_update(state, model, 0.9)
    assert_close(state, teacher)
    # floating buffers averaged, integer buffers copied
    assert teacher.module.bn.num_batches_tracked.item() == model.bn.num_batches_tracked.item() == 3
    assert torch.equal(teacher.module.position_ids, model.position_ids)
    assert not torch.equal(teacher.module.bn.running_mean, model.bn.running_mean)
    assert teacher.step == 3


def test_teacher_is_frozen_eval_and_forward_has_no_grad():
    model = Net()
    teacher = sk.MomentumTeacher(model)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    teacher.train()  # stays in eval mode: dropout off, BatchNorm uses running stats
    assert not teacher.training and not teacher.module.training
    assert all(not m.training for m in teacher.modules())
    ids = torch.randint(0, 11, (8, 4))
    out1, out2 = teacher(ids), teacher(ids)
    assert torch.equal(out1, out2) and not out1.requires_grad
    x = torch.randn(3, 2, requires_grad=True)
    lin_teacher = sk.MomentumTeacher(nn.Linear(2, 2))
    assert not lin_teacher(x).requires_grad
    # the student is untouched by the teacher's construction
    assert all(p.requires_grad for p in model.parameters())


def test_unwraps_data_parallel_and_compile_wrappers():
    model = Net()
    wrapped = nn.DataParallel(model)  # a DDP-like wrapper: the model is its .module
    teacher = sk.MomentumTeacher(wrapped, decay=0.5)
    assert set(teacher_state(teacher)) == set(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(2.0)
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    teacher.update(wrapped)
    manual_update(state, model, 0.5)
    assert_close(state, teacher)
    compiled = torch.compile(model)  # an OptimizedModule wrapping the model (never run here)
    teacher.update(compiled)
    manual_update(state, model, 0.5)
    assert_close(state, teacher)


def test_recollects_when_parameters_change_identity_or_storage():
    model = Net()
    teacher = sk.MomentumTeacher(model, decay=0.5)
    teacher.update(model)
    plan = teacher._plan
    teacher.update(model)
    assert teacher._plan is plan  # unchanged model: the prepared lists are reused
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    model.head = nn.Linear(5, 3)  # a replaced submodule (same shapes)
    model.lin.weight = nn.Parameter(torch.randn(5, 6))  # a replaced parameter
    model.lin.bias.data = torch.randn(5)  # a moved storage
    teacher.update(model)
    manual_update(state, model, 0.5)
    assert_close(state, teacher)
    model.head = nn.Linear(5, 4)  # a different shape: named in the error
    with pytest.raises(ValueError, match="head.weight"):
        teacher.update(model)
    model.head = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="model"):
        teacher.update(model)


def test_teacher_moved_or_cast_is_prepared_again():
    model = Net()
    teacher = sk.MomentumTeacher(model, decay=0.5)
    teacher.update(model)
    teacher.to(torch.float64)
    assert teacher.decay_tensor.dtype == torch.float64 and teacher.module.lin.weight.dtype == (
        torch.float64
    )
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    teacher.update(model)
    manual_update(state, model, 0.5)
    assert_close(state, teacher, tol=1e-12)


# ----------------------------------------------------------------------------------------------
# state dict: resume exactly


def test_state_dict_round_trip_then_identical_updates():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = sk.MomentumTeacher(model, schedule="paper", total_steps=30)
    for _ in range(3):
        train_step(model, opt)
        teacher.update(model)
    teacher.set_decay(0.25)  # an override is part of the state too
    buffer = io.BytesIO()
    torch.save(teacher.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = sk.MomentumTeacher(Net(), schedule="paper", total_steps=30)
    resumed.load_state_dict(saved)
    assert resumed.step == teacher.step == 3 and resumed.decay == teacher.decay == 0.25
    assert resumed.decay_tensor.item() == 0.25
    for (k, a), (_, b) in zip(
        teacher.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert a == b if k == "_extra_state" else torch.equal(a, b)
    for _ in range(3):  # the following updates are identical, bit for bit
        train_step(model, opt)
        teacher.update(model)
        resumed.update(model)
        assert resumed.decay == teacher.decay
    assert resumed.step == teacher.step == 6
    for a, b in zip(teacher_state(teacher).values(), teacher_state(resumed).values(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# lower-precision teacher


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bf16_teacher(backend):
    model = Net()
    teacher = sk.MomentumTeacher(model, decay=0.9, dtype=torch.bfloat16, backend=backend)
    assert teacher.module.lin.weight.dtype == torch.bfloat16
    assert teacher.module.bn.running_var.dtype == torch.bfloat16
    assert teacher.module.position_ids.dtype == torch.int64
    state = {k: v.clone() for k, v in teacher_state(teacher).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        train_step(model, opt)
        teacher.update(model)
        manual_update(state, model, 0.9)
    mine = teacher_state(teacher)
    for name, value in state.items():
        if value.is_floating_point():  # fp32 arithmetic rounded once to bf16: one bf16 step
            assert max_err(mine[name], value) <= 2**-7 * (value.abs().max().item() + 1), name
    out = teacher(torch.randint(0, 11, (2, 4)))
    assert out.dtype == torch.bfloat16 and not out.requires_grad


# ----------------------------------------------------------------------------------------------
# graph-capture helpers (the capture itself is tested on a GPU: test_ema_gpu.py)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_after_updates_keeps_updating(assign):
    """Loading into a teacher that has already updated (its lists are prepared): with
    ``assign=True`` the teacher's tensors are replaced, and the next update must move them."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = sk.MomentumTeacher(model, decay=0.5)
    teacher.update(model)  # the plan now points at the teacher's current tensors
    saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(saved, assign=assign)
    train_step(model, opt)
    expected = [0.5 * saved[f"module.{n}"] + 0.5 * p for n, p in model.named_parameters()]
    teacher.update(model)
    for e, t in zip(expected, teacher.module.parameters(), strict=True):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-6)


def test_advance_and_set_decay():
    model = nn.Linear(3, 3)
    teacher = sk.MomentumTeacher(model, schedule=lambda s: 0.1 * (s + 1))
    assert teacher.advance() == 0.1 and teacher.step == 1 and teacher.decay_tensor.item() == 0.1
    teacher.set_decay(0.75)
    assert teacher.decay == 0.75 and teacher.decay_tensor.item() == 0.75
    teacher.update(model)  # the schedule's value for step 1 is loaded again
    assert teacher.decay == pytest.approx(0.2) and teacher.step == 2


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs,exc,text",
    [
        (dict(decay=1.5), ValueError, "decay"),
        (dict(decay="0.9"), TypeError, "decay"),
        (dict(schedule="paper"), ValueError, "total_steps"),
        (dict(schedule="paper", total_steps=0), ValueError, "total_steps"),
        (dict(schedule="cosine"), ValueError, "schedule"),
        (dict(schedule=3), TypeError, "schedule"),
        (dict(schedule=lambda s: 2.0), ValueError, "schedule"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(backend="cuda"), ValueError, "^backend:"),
    ],
)
def test_errors(kwargs, exc, text):
    with pytest.raises(exc, match=text):
        sk.MomentumTeacher(nn.Linear(2, 2), **kwargs)


def test_error_bad_model_and_schedule_value_at_update():
    with pytest.raises(TypeError, match="model"):
        sk.MomentumTeacher([nn.Linear(2, 2)])
    model = nn.Linear(2, 2)
    teacher = sk.MomentumTeacher(model, schedule=lambda s: 0.5 if s == 0 else -1.0)
    teacher.update(model)
    with pytest.raises(ValueError, match=r"schedule\(1\)"):
        teacher.update(model)
    with pytest.raises(ValueError, match="value"):
        teacher.set_decay(1.01)


# ----------------------------------------------------------------------------------------------
# sharded (DTensor) parameters: the local shards are averaged


@pytest.fixture
def one_rank_group():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_dtensor_parameters_update_local_shards(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    model = nn.Linear(4, 3)
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), mesh, [Shard(0)]))
    model.bias = nn.Parameter(distribute_tensor(model.bias.detach(), mesh, [Replicate()]))
    teacher = sk.MomentumTeacher(model, decay=0.5)
    local = [copy.deepcopy(p.to_local().detach()) for p in teacher.module.parameters()]
    with torch.no_grad():
        model.weight.add_(1.0)
    teacher.update(model)
    for t0, t, s in zip(local, teacher.module.parameters(), model.parameters(), strict=True):
        want = 0.5 * t0 + 0.5 * s.to_local().detach()
        assert max_err(t.to_local(), want) <= 1e-6
