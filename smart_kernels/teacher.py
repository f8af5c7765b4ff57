"""``MomentumTeacher``: the momentum (mean) teacher of SMART's Bregman proximal point term,
``θ̃ <- β·θ̃ + (1 − β)·θ`` after every optimizer step, with the fused multi-tensor EMA."""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable
from itertools import chain

import torch
from torch import nn

from smart_kernels import _backends
from smart_kernels.ops._checks import FLOAT_DTYPES, check_unit_interval
from smart_kernels.ops.ema import EmaPlan

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed (or before DTensor was public)
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None

PAPER_DECAYS = (0.99, 0.999)  # Jiang et al. 2020: β for the first 10% of updates, then after
PAPER_WARMUP = 0.1


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        else:
            return model


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    if DTensor is not None and isinstance(t, DTensor):
        local = getattr(t, "_local_tensor", None)
        return local if local is not None else t.to_local()
    return t


def _dict_values(d):
    return d.values()


class _Tree:
    """A module's parameters then buffers (as ``parameters()`` / ``buffers()`` list them) and a
    signature of the tree: the identities of every registered submodule, parameter and buffer,
    which changes when any of them is replaced. Computing it walks the modules' registries at C
    speed (~0.3 us per module), far less than ``named_parameters()``."""

    def __init__(self, root: nn.Module):
        self.root = root
        mods = tuple(root.modules())
        self.registries = tuple(r for m in mods for r in (m._modules, m._parameters, m._buffers))
        plain = all(type(r) is dict for r in self.registries)
        self._values = dict.values if plain else _dict_values
        self.signature = self._signature()
        named = [*root.named_parameters(), *root.named_buffers()]
        self.names = [n for n, _ in named]
        self.tensors = [t for _, t in named]
        self.sharded = DTensor is not None and any(isinstance(t, DTensor) for t in self.tensors)

    def _signature(self) -> tuple[int, ...]:
        return tuple(map(id, chain.from_iterable(map(self._values, self.registries))))

    def changed(self) -> bool:
        return self._signature() != self.signature

    def local(self) -> list[torch.Tensor]:
        return list(map(_local, self.tensors)) if self.sharded else self.tensors


class MomentumTeacher(nn.Module):
    """A frozen copy of a model that follows it by exponential moving average.

    ``teacher = MomentumTeacher(model)``; after each optimizer step ``teacher.update(model)``
    sets every parameter and floating buffer ``θ̃ <- β·θ̃ + (1 − β)·θ`` (non-floating buffers,
    e.g. position ids or BatchNorm's step count, are copied) with the fused multi-tensor
    ``ema_update_`` (one kernel launch per dtype combination on CUDA); ``teacher(*args)`` runs the
    copy under ``torch.no_grad()``, always in eval mode.

    Args:
        model: the student (``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``
            wrappers are unwrapped, here and in :meth:`update`). Deep-copied.
        decay: β when ``schedule`` is None: a constant in [0, 1] (ignored otherwise).
        schedule: None (constant ``decay``), ``"paper"`` (β = 0.99 for the first 10% of
            ``total_steps`` updates, i.e. while ``10·step < total_steps``, then 0.999; Jiang et
            al. 2020), or a callable ``step -> β`` (a Python float in [0, 1]; ``step`` counts
            the updates done before this one, from 0).
        total_steps: the number of updates planned; required by ``schedule="paper"``.
        dtype: keep the teacher's floating parameters and buffers in this dtype (e.g.
            ``torch.bfloat16`` to halve its memory). The update is computed in fp32 and rounded
            to the teacher's dtype each step, and that rounding is the cost: an update moves a
            weight by ``(1 − β)·(θ − θ̃)``, which is lost whenever it is below half a unit in
            the last place of ``θ̃``, i.e. unless ``|θ − θ̃| ≳ 2^-p / (1 − β) · |θ̃|`` with
            ``p`` = 8 significand bits for bf16 (11 for fp16), up to a factor 2 depending on
            where ``θ̃`` lies in its binade. For β = 0.999 that is a gap of ~200–400% (bf16) /
            ~25–50% (fp16) of the weight: the low-precision teacher stops following the student
            and stays near its initial copy; for β = 0.99 ~20–40% / ~3–6%. Keep the
            default (the student's dtype, normally fp32) unless memory forces it. Inputs to
            ``forward`` must then match this dtype (or run under autocast).
        backend: the ``ema_update_`` backend (None: auto, see ``sk.backends()``).

    State: ``step`` (updates done), the current β (:attr:`decay`, also kept in the 0-d device
    tensor :attr:`decay_tensor` that the kernels read, so no update synchronizes the host). Both
    are saved by ``state_dict()`` (as ``_extra_state``) with the teacher's weights, so
    ``load_state_dict`` resumes exactly: the following updates are identical.

    Repeated updates: the pairs of lists (teacher tensors, student tensors) and the kernels'
    chunk table are prepared once and reused while the student's module tree keeps its
    submodules, parameters and buffers (checked each update by identity, at C speed: well under a
    microsecond per module) and their storage (checked by data pointer); otherwise they are
    collected again. (On an H100 host with BERT-base the prepared update's own Python and launch
    cost ~60 us per call; a captured update replays in ~3 us.)
    After moving the teacher (``teacher.to(...)``) the next update re-prepares.

    CUDA graphs: ``update`` is capturable once it has run outside the capture (warm-up). While
    capturing it records only the EMA kernels, which read β from :attr:`decay_tensor` at each
    replay; before each replay call :meth:`advance` (loads the next β of the schedule and counts
    the step) or :meth:`set_decay`.

    FSDP2 / DTensor parameters: pass the sharded model; the teacher is its deep copy, sharded the
    same way. The EMA is elementwise, so each rank updates its local shards (``_local_tensor``)
    from the student's local shards, with no communication; the local tensors are looked up at
    every update. (FSDP1's flat parameters are not supported.)
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.99,
        *,
        schedule: str | Callable[[int], float] | None = None,
        total_steps: int | None = None,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self._schedule = self._make_schedule(decay, schedule, total_steps)
        _backends.check_name(backend)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected None or one of {FLOAT_DTYPES}, got {dtype!r}")
        self.module = copy.deepcopy(_unwrap(model))
        if dtype is not None:
            self.module.to(dtype)
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.train(False)  # this module and the copy: eval mode, always
        self.backend = backend
        self.step = 0
        self._decay_value = self.decay_at(0)
        device = self._teacher_device()
        self._decay = torch.full((), self._decay_value, dtype=_decay_dtype(device), device=device)
        self._student: _Tree | None = None
        self._plan: EmaPlan | None = None
        # load_state_dict(assign=True) replaces the teacher's tensors: prepare the lists again.
        self.register_load_state_dict_post_hook(_forget_plan)

    # ---- schedule -------------------------------------------------------------------------

    @staticmethod
    def _make_schedule(decay, schedule, total_steps) -> Callable[[int], float]:
        if schedule is None:
            value = check_unit_interval("decay", decay)
            return lambda step: value
        if isinstance(schedule, str):
            if schedule != "paper":
                raise ValueError(
                    f"schedule: expected None, 'paper' or a callable, got {schedule!r}"
                )
            if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral):
                raise ValueError(
                    "total_steps: schedule='paper' needs the number of updates (an int), "
                    f"got {total_steps!r}"
                )
            if total_steps <= 0:
                raise ValueError(f"total_steps: expected a positive integer, got {total_steps}")
            total = int(total_steps)
            early, late = PAPER_DECAYS
            return lambda step: early if step * 10 < total else late
        if callable(schedule):
            return schedule
        raise TypeError(f"schedule: expected None, 'paper' or a callable, got {schedule!r}")

    def decay_at(self, step: int) -> float:
        """β of the update with index ``step`` (0-based), from the schedule."""
        return check_unit_interval(f"schedule({step})", self._schedule(step))

    @property
    def decay(self) -> float:
        """The β currently loaded in :attr:`decay_tensor` (that of the last update)."""
        return self._decay_value

    @property
    def decay_tensor(self) -> torch.Tensor:
        """0-d tensor on the teacher's device holding β; the update kernels read it."""
        return self._decay

    def set_decay(self, value: float) -> None:
        """Load β = ``value`` into :attr:`decay_tensor` (no host sync). The next :meth:`update`
        outside a graph capture reloads the schedule's value."""
        self._load_decay(check_unit_interval("value", value))

    def advance(self) -> float:
        """For a captured :meth:`update`: load the β of the next update and count it; call before
        each replay. Returns that β."""
        value = self.decay_at(self.step)
        self._load_decay(value)
        self.step += 1
        return value

    def _load_decay(self, value: float, force: bool = False) -> None:
        if force or value != self._decay_value:
            self._decay.fill_(value)
            self._decay_value = value

    # ---- the update -----------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``θ̃ <- β·θ̃ + (1 − β)·θ`` for every parameter and floating buffer of ``model`` (the
        student: the model this teacher was copied from, possibly wrapped); non-floating buffers
        are copied. β = :meth:`decay_at` ``(step)``; then ``step`` += 1."""
        plan = self._plan_for(model)
        capturing = self._decay.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing:
            self._load_decay(self.decay_at(self.step))
        plan(self._decay)
        if not capturing:
            self.step += 1

    def _plan_for(self, model: nn.Module) -> EmaPlan:
        model = _unwrap(model)
        tree = self._student
        if tree is None or tree.root is not model or tree.changed():
            tree = self._student = _Tree(model)
            self._plan = None
        student = tree.local()
        plan = self._plan
        if plan is not None and tree.sharded and any(map(_is_not, plan.student, student)):
            plan = None
        if plan is None:
            plan = self._plan = self._build_plan(tree, student)
        return plan

    def _build_plan(self, tree: _Tree, student: list[torch.Tensor]) -> EmaPlan:
        mine = _Tree(self.module)
        if mine.names != tree.names:
            extra = sorted(set(tree.names) - set(mine.names))[:3]
            missing = sorted(set(mine.names) - set(tree.names))[:3]
            raise ValueError(
                "model: its parameters and buffers do not match the teacher's (not in the "
                f"teacher: {extra}, missing: {missing}, or another order)"
            )
        teacher = mine.local()
        for name, t, s in zip(mine.names, teacher, student, strict=True):
            if t.shape != s.shape:
                raise ValueError(
                    f"model: {name} has shape {tuple(s.shape)}, the teacher's {tuple(t.shape)}"
                )
            if t.device != s.device:
                raise ValueError(f"model: {name} is on {s.device}, the teacher's on {t.device}")
        return EmaPlan(teacher, student, backend=self.backend)

    # ---- module behaviour -----------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The teacher's output for the student's inputs, without gradients."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> MomentumTeacher:
        """The teacher always stays in eval mode (dropout off)."""
        return super().train(False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if "_decay" in self.__dict__:  # moved or cast: prepare the lists again
            self._plan = None
            device = self._teacher_device()
            if self._decay.device != device:
                self._decay = torch.full(
                    (), self._decay_value, dtype=_decay_dtype(device), device=device
                )
        return self

    def _teacher_device(self) -> torch.device:
        for t in chain(self.module.parameters(), self.module.buffers()):
            return _local(t).device
        return torch.device("cpu")

    def get_extra_state(self) -> dict:
        return {"step": self.step, "decay": self._decay_value}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self._load_decay(check_unit_interval("decay", state["decay"]), force=True)

    def extra_repr(self) -> str:
        return f"step={self.step}, decay={self._decay_value}"


def _forget_plan(module: MomentumTeacher, incompatible_keys: object) -> None:
    module._plan = None


def _is_not(a: object, b: object) -> bool:
    return a is not b


def _decay_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64
