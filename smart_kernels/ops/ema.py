"""``ema_update_`` and ``ema``: validation, dispatch to a backend, autograd.

Math (DESIGN §3): ``t <- decay * t + (1 - decay) * s`` pair by pair, in the teacher's
accumulation dtype (fp64 for fp64 teachers, else fp32), stored in the teacher's dtype;
non-floating pairs are copied. ``ema`` returns ``decay * t + (1 - decay) * s`` with gradients
``d/dt = decay * g`` and ``d/ds = (1 - decay) * g`` (each in its input's dtype; none for decay).

Backends:
* native: ``torch.ops.smart_kernels.ema_update_`` / ``ema`` (csrc/cpu, csrc/cuda), with the
  fakes and the autograd formula registered here;
* triton: ``smart_kernels.triton.ema`` under the custom ops ``smart_kernels::ema_update_triton``
  (mutates ``teacher``) and ``smart_kernels::ema_triton`` defined here. In eager mode the update
  launches the kernels directly from a cached chunk table (a custom op's Python wrapper costs
  milliseconds for a 400-tensor list); under ``torch.compile`` it goes through the op;
* reference: ``smart_kernels.reference``.

Repeated updates of the same lists: the validation result and the Triton chunk table are cached
per pair of lists, keyed by the tensors' ids, data pointers and sizes (an entry is dropped as
soon as one of its tensors is freed, so an id cannot be reused under it). A call with the same
lists therefore does no Python loop over the tensors beyond computing that key; :class:`EmaPlan`
(used by ``MomentumTeacher``) holds the lists and skips even the key.

Non-contiguous pairs (a teacher or student that is not contiguous) are updated correctly by a
per-pair PyTorch fallback (``reference.ema_update_``) after the fused update of the others.
"""

from __future__ import annotations

import operator
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from smart_kernels import _backends, reference
from smart_kernels.ops._checks import FLOAT_DTYPES, check_unit_interval

_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
_STRIDE = torch.Tensor.stride
_DTYPE = operator.attrgetter("dtype")
_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------
# Triton ops (the kernels are imported on first use). Same contract as the native ops
# (csrc/smart_kernels.cpp); ema_update_triton expects contiguous pairs.


@torch.library.custom_op("smart_kernels::ema_update_triton", mutates_args=("teacher",))
def _ema_update_triton(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    decay_tensor: torch.Tensor | None,
    decay: float,
) -> None:
    _PLANS.get(teacher, student).triton_table(teacher, student).launch(decay_tensor, decay)


@torch.library.custom_op("smart_kernels::ema_triton", mutates_args=())
def _ema_triton(
    teacher: torch.Tensor,
    student: torch.Tensor,
    decay_tensor: torch.Tensor | None,
    decay: float,
) -> torch.Tensor:
    from smart_kernels.triton import ema as kernels

    return kernels.ema(teacher, student, decay_tensor, decay)


# --------------------------------------------------------------------------------------------
# Fakes (native and triton ops) and the autograd formula of ema (native and triton).


def _ema_update_fake(teacher, student, decay_tensor, decay) -> None:
    return None


def _ema_fake(teacher, student, decay_tensor, decay):
    return teacher.new_empty(teacher.shape)


def _ema_setup_context(ctx, inputs, output):
    teacher, student, decay_tensor, decay = inputs
    ctx.save_for_backward(decay_tensor)
    ctx.decay = decay
    ctx.dtypes = (teacher.dtype, student.dtype)


def _ema_backward(ctx, grad):
    (decay_tensor,) = ctx.saved_tensors
    acc = reference.acc_dtype(grad.dtype)
    w = decay_tensor.to(acc) if decay_tensor is not None else ctx.decay
    g = grad.to(acc)
    grad_t = (g * w).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_s = (g * (1 - w)).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    return grad_t, grad_s, None, None


torch.library.register_fake("smart_kernels::ema_update_triton")(_ema_update_fake)
torch.library.register_fake("smart_kernels::ema_triton")(_ema_fake)
torch.library.register_autograd(
    "smart_kernels::ema_triton", _ema_backward, setup_context=_ema_setup_context
)
if _backends._NATIVE_ERROR is None:
    torch.library.register_fake("smart_kernels::ema_update_")(_ema_update_fake)
    torch.library.register_fake("smart_kernels::ema")(_ema_fake)
    torch.library.register_autograd(
        "smart_kernels::ema", _ema_backward, setup_context=_ema_setup_context
    )


# --------------------------------------------------------------------------------------------
# Validation (metadata only: never synchronizes the device).


def _check_decay(decay: object, device: torch.device | None) -> tuple[torch.Tensor | None, float]:
    """(decay_tensor, decay) for the kernels. A float must lie in [0, 1]; a tensor must be 0-d,
    floating and on ``device`` and is not range-checked (that would synchronize)."""
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0:
            raise ValueError(
                f"decay: expected a float or a 0-d tensor, got a tensor of shape "
                f"{tuple(decay.shape)}"
            )
        if not decay.is_floating_point():
            raise TypeError(f"decay: expected a floating-point tensor, got {decay.dtype}")
        if device is not None and decay.device != device:
            raise ValueError(
                f"decay: expected a tensor on the tensors' device ({device}), got {decay.device}"
            )
        decay = decay.detach()
        if decay.dtype not in (torch.float32, torch.float64):
            decay = decay.float()
        return decay, 0.0
    return None, check_unit_interval("decay", decay, "a float in [0, 1] or a 0-d tensor")


def _as_list(name: str, tensors: object) -> Sequence[torch.Tensor]:
    if isinstance(tensors, (list, tuple)):
        return tensors
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Iterable):
        raise TypeError(
            f"{name}: expected a list of tensors, got {type(tensors).__name__} (wrap a single "
            "tensor in a list)"
        )
    return list(tensors)


def _check_lists(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> None:
    """Pair by pair: tensors of one shape, on teacher[0]'s device; a floating teacher
    (fp16/bf16/fp32/fp64) with a floating student of any of those dtypes; a non-floating teacher
    (copied) with a student of its dtype; no tensor listed twice in teacher and no teacher
    memory shared (neither checked while torch.compile traces)."""
    if len(student) != len(teacher):
        raise ValueError(
            f"student: expected {len(teacher)} tensors (as many as teacher), got {len(student)}"
        )
    device = None
    for i, (t, s) in enumerate(zip(teacher, student, strict=True)):
        for name, x in (("teacher", t), ("student", s)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(x).__name__}")
            if x.layout != torch.strided:
                raise TypeError(f"{name}[{i}]: expected a dense (strided) tensor, got {x.layout}")
        device = t.device if device is None else device
        if t.device != device:
            raise ValueError(
                f"teacher[{i}]: expected device {device} (of teacher[0]), got {t.device}"
            )
        if s.device != device:
            raise ValueError(
                f"student[{i}]: expected device {device} (of teacher[0]), got {s.device}"
            )
        if s.shape != t.shape:
            raise ValueError(
                f"student[{i}]: expected the shape of teacher[{i}] {tuple(t.shape)}, "
                f"got {tuple(s.shape)}"
            )
        if t.is_floating_point():
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"teacher[{i}]: expected float16, bfloat16, float32 or float64 (or a "
                    f"non-floating dtype, which is copied), got {t.dtype}"
                )
            if s.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"student[{i}]: expected float16, bfloat16, float32 or float64 (teacher[{i}] "
                    f"is {t.dtype}), got {s.dtype}"
                )
        elif t.is_complex():
            raise TypeError(f"teacher[{i}]: complex tensors are not supported, got {t.dtype}")
        elif s.dtype != t.dtype:
            raise TypeError(
                f"student[{i}]: expected {t.dtype} like teacher[{i}] (a non-floating pair is "
                f"copied), got {s.dtype}"
            )
    if torch.compiler.is_compiling():
        return
    if len(set(map(id, teacher))) != len(teacher):
        seen: dict[int, int] = {}
        for i, t in enumerate(teacher):
            j = seen.setdefault(id(t), i)
            if j != i:
                raise ValueError(f"teacher[{i}]: the same tensor as teacher[{j}] (listed twice)")
    _check_no_overlap(teacher, student)


def _extent(x: torch.Tensor) -> tuple[int, int] | None:
    """The bytes [start, end) of a dense tensor's memory; None for a tensor that has none (meta,
    empty), is not dense (its span has gaps or repeats), or hides its storage (a subclass)."""
    if x.device.type == "meta" or x.numel() == 0:
        return None
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride(), strict=True))
    if span != x.numel():
        return None
    try:
        start = x.data_ptr()  # 0 for a wrapper subclass without storage
    except (RuntimeError, NotImplementedError):
        return None
    return (start, start + span * x.element_size()) if start else None


def _check_no_overlap(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> None:
    """No two dense tensors of the lists share memory, except a student listed for several
    teachers: a teacher region shared by two views would be updated twice, and a teacher that
    aliases a student would change that student mid-update. One sort, at preparation time only;
    non-dense views (gaps in their span) are not checked."""
    spans = []
    for name, tensors in (("teacher", teacher), ("student", student)):
        for i, x in enumerate(tensors):
            extent = _extent(x)
            if extent is not None:
                spans.append((*extent, name, i))
    spans.sort()
    reach = None  # the span that reaches furthest among those that start earlier
    for span in spans:
        if reach is not None and span[0] < reach[1] and "teacher" in (span[2], reach[2]):
            first, second = sorted((reach, span), key=lambda e: (e[2] != "teacher", e[3]))
            hint = (
                "the teacher must be a copy of the student, e.g. copy.deepcopy(model)"
                if second[2] == "student"
                else "list each tensor once: tied weights appear twice in a state_dict(), once "
                "in model.parameters()"
            )
            raise ValueError(
                f"{second[2]}[{second[3]}]: shares memory with {first[2]}[{first[3]}] ({hint})"
            )
        if reach is None or span[1] > reach[1]:
            reach = span


# --------------------------------------------------------------------------------------------
# Prepared lists: validation result, contiguous / fallback split, Triton chunk table.


class _Prepared:
    """What one validated pair of lists needs at each update (holds no tensor)."""

    __slots__ = ("device", "slow", "fast", "table", "refs", "__weakref__")

    def __init__(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]):
        _check_lists(teacher, student)
        self.device = teacher[0].device if len(teacher) else None
        contiguous = [
            t.is_contiguous() and s.is_contiguous() for t, s in zip(teacher, student, strict=True)
        ]
        self.slow = tuple(i for i, c in enumerate(contiguous) if not c)
        self.fast = tuple(i for i, c in enumerate(contiguous) if c) if self.slow else None
        self.table = None
        self.refs: list = []

    def triton_table(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]):
        """The Triton chunk table of the contiguous pairs (built on first use)."""
        if self.table is None:
            from smart_kernels.triton import ema as kernels

            self.table = kernels.EmaTable(list(teacher), list(student))
        return self.table

    def run(
        self,
        teacher: Sequence[torch.Tensor],
        student: Sequence[torch.Tensor],
        decay_tensor: torch.Tensor | None,
        decay: float,
        backend: str,
    ) -> None:
        if self.slow:
            fast_t = [teacher[i] for i in self.fast]
            fast_s = [student[i] for i in self.fast]
        else:
            fast_t, fast_s = teacher, student
        value = decay_tensor if decay_tensor is not None else decay
        if fast_t:
            if backend == "native":
                torch.ops.smart_kernels.ema_update_(fast_t, fast_s, decay_tensor, decay)
            elif backend == "triton":
                self.triton_table(fast_t, fast_s).launch(decay_tensor, decay)
            else:
                reference.ema_update_(fast_t, fast_s, value)
        for i in self.slow:  # non-contiguous pairs: PyTorch, pair by pair
            reference.ema_update_([teacher[i]], [student[i]], value)


def _update_traced(
    teacher: Sequence[torch.Tensor],
    student: Sequence[torch.Tensor],
    decay_tensor: torch.Tensor | None,
    decay: float,
    backend: str,
) -> None:
    """The update while torch.compile traces: no cache; Triton through its custom op."""
    fast_t, fast_s, slow = [], [], []
    for t, s in zip(teacher, student, strict=True):
        if t.is_contiguous() and s.is_contiguous():
            fast_t.append(t)
            fast_s.append(s)
        else:
            slow.append((t, s))
    value = decay_tensor if decay_tensor is not None else decay
    if fast_t:
        if backend == "native":
            torch.ops.smart_kernels.ema_update_(fast_t, fast_s, decay_tensor, decay)
        elif backend == "triton":
            torch.ops.smart_kernels.ema_update_triton(fast_t, fast_s, decay_tensor, decay)
        else:
            reference.ema_update_(fast_t, fast_s, value)
    for t, s in slow:
        reference.ema_update_([t], [s], value)


def _key(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> tuple:
    # Identity, storage, size, layout and dtype: an in-place t_() / resize_ / view change misses.
    return (
        *map(id, teacher), *map(id, student), *map(_DATA_PTR, teacher),
        *map(_DATA_PTR, student), *map(_NUMEL, teacher), *map(_NUMEL, student),
        *map(_STRIDE, teacher), *map(_STRIDE, student), *map(_DTYPE, teacher),
        *map(_DTYPE, student),
    )  # fmt: skip


class _PlanCache:
    """The last few prepared pairs of lists, keyed by :func:`_key`. Holds no tensor: a weak
    reference to each tensor drops the entry when the tensor dies, before its id can be reused."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self.plans: OrderedDict[tuple, _Prepared] = OrderedDict()

    def get(self, teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> _Prepared:
        try:
            key = _key(teacher, student)
        except Exception:  # not tensors, or tensors without storage: validate, don't cache
            return _Prepared(teacher, student)
        plan = self.plans.get(key)
        if plan is not None:
            return plan
        plan = _Prepared(teacher, student)
        drop = self._dropper(key)
        plan.refs = [weakref.ref(t, drop) for t in (*teacher, *student)]
        self.plans[key] = plan
        while len(self.plans) > self.size:
            self.plans.popitem(last=False)[1].refs = []  # its callbacks can no longer fire
        return plan

    def _dropper(self, key: tuple):
        plans = weakref.ref(self.plans)

        def drop(_ref) -> None:
            d = plans()
            if d is not None:
                d.pop(key, None)

        return drop

    def clear(self) -> None:
        self.plans.clear()


_PLANS = _PlanCache()


class EmaPlan:
    """A validated pair of lists, held, for repeated updates with a changing decay.

    ``plan = EmaPlan(teacher, student)`` validates once (as :func:`ema_update_`) and fixes the
    backend; ``plan(decay)`` then updates with no per-tensor Python work except one check that no
    tensor's storage moved (``param.data = ...``), after which it re-prepares. Keep the tensors'
    identities fixed (a plan does not see a list being edited: build a new plan). With a 0-d
    device tensor ``decay`` a call is CUDA-graph capturable (build the plan and call it once
    before capturing).
    """

    def __init__(
        self,
        teacher: Iterable[torch.Tensor],
        student: Iterable[torch.Tensor],
        *,
        backend: str | None = None,
    ):
        self.teacher = list(_as_list("teacher", teacher))
        self.student = list(_as_list("student", student))
        self._prepared = _Prepared(self.teacher, self.student)
        device = self._prepared.device
        self.backend = _backends.choose("ema", backend, device) if device is not None else None
        self._pointers = self._data_pointers()

    def _data_pointers(self) -> tuple[int, ...]:
        return (*map(_DATA_PTR, self.teacher), *map(_DATA_PTR, self.student))

    @property
    def device(self) -> torch.device | None:
        return self._prepared.device

    def __call__(self, decay: float | torch.Tensor) -> None:
        """``teacher[i] <- decay * teacher[i] + (1 - decay) * student[i]`` for every pair."""
        decay_tensor, value = _check_decay(decay, self._prepared.device)
        if self.backend is None:
            return
        if torch.compiler.is_compiling():
            with torch.no_grad():
                _update_traced(self.teacher, self.student, decay_tensor, value, self.backend)
            return
        pointers = self._data_pointers()
        if pointers != self._pointers:
            self._prepared = _Prepared(self.teacher, self.student)
            self._pointers = pointers
        with torch.no_grad():
            self._prepared.run(self.teacher, self.student, decay_tensor, value, self.backend)


# --------------------------------------------------------------------------------------------
# Public entry points.


def ema_update_(
    teacher: Iterable[torch.Tensor],
    student: Iterable[torch.Tensor],
    decay: float | torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """In place, for every pair: ``teacher[i] <- decay * teacher[i] + (1 - decay) * student[i]``.

    Args:
        teacher: tensors to update (e.g. a teacher model's parameters and buffers), any shapes.
        student: as many tensors, ``student[i]`` of ``teacher[i]``'s shape, all on one device.
            A floating teacher (float16/bfloat16/float32/float64) may differ in dtype from its
            student (fp32 teacher / bf16 student runs on the fused path); a non-floating
            teacher (an integer or bool buffer) is copied from a student of the same dtype.
        decay: a float in [0, 1], or a 0-d floating tensor on the tensors' device, read by the
            kernels (no host synchronization, so a captured CUDA graph can replay the update
            with a new value; it is not range-checked).
        backend: ``None`` (auto), ``"reference"``, ``"native"`` or ``"triton"``.

    Computed in fp32 (fp64 for fp64 teachers), stored in the teacher's dtype; decay 1 leaves the
    teacher unchanged and decay 0 copies the student (exactly, up to the teacher's dtype). On
    CUDA: one kernel launch per (teacher dtype, student dtype) combination for the whole list.
    Non-contiguous pairs are updated correctly by a per-pair PyTorch fallback. Runs under
    ``torch.no_grad()``. Validation results and the Triton chunk table are cached per pair of
    lists (see the module docstring); for repeated updates, :class:`EmaPlan` is cheaper still.
    Teacher tensors must not share memory with one another (a region shared by two views would
    be updated twice) nor with any student: a ``ValueError`` names the pair, checked once per
    pair of lists for dense tensors (views with gaps in their span are not checked).
    """
    teacher = _as_list("teacher", teacher)
    student = _as_list("student", student)
    if torch.compiler.is_compiling():
        _check_lists(teacher, student)
        device = teacher[0].device if len(teacher) else None
        prepared = None
    else:
        prepared = _PLANS.get(teacher, student)
        device = prepared.device
    decay_tensor, value = _check_decay(decay, device)
    if device is None:
        return
    name = _backends.choose("ema", backend, device, "ema_update_")
    with torch.no_grad():
        if prepared is None:
            _update_traced(teacher, student, decay_tensor, value, name)
        else:
            prepared.run(teacher, student, decay_tensor, value, name)


def ema(
    teacher: torch.Tensor,
    student: torch.Tensor,
    decay: float | torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Functional EMA: ``decay * teacher + (1 - decay) * student``, differentiable.

    Args:
        teacher, student: floating tensors (float16/bfloat16/float32/float64) of one shape
            [...] on one device; their dtypes may differ.
        decay: a float in [0, 1], or a 0-d floating tensor on their device (no gradient flows
            to it; it is not range-checked).
        backend: ``None`` (auto), ``"reference"``, ``"native"`` or ``"triton"``.

    Returns:
        [...] in teacher's dtype, computed in fp32 (fp64 for fp64 teachers).
        Gradients: ``d/d teacher = decay * g``, ``d/d student = (1 - decay) * g``, each in its
        input's dtype, only for inputs that require them.
    """
    for name, x in (("teacher", teacher), ("student", student)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got {x.dtype}"
            )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student: expected the shape of teacher {tuple(teacher.shape)}, "
            f"got {tuple(student.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student: expected the device of teacher ({teacher.device}), got {student.device}"
        )
    decay_tensor, value = _check_decay(decay, teacher.device)
    name = _backends.choose("ema", backend, teacher.device, "ema")
    if name == "native":
        return torch.ops.smart_kernels.ema(
            teacher.contiguous(), student.contiguous(), decay_tensor, value
        )
    if name == "triton":
        return _ema_triton(teacher.contiguous(), student.contiguous(), decay_tensor, value)
    return reference.ema(teacher, student, decay_tensor if decay_tensor is not None else value)
