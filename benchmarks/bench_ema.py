"""EMA teacher update benchmark: one in-place ``t <- d·t + (1 − d)·s`` over a whole parameter
list (mode ``fwd`` only; d = 0.999).

Cases. A model's list is labelled by its total element count, a uniform list by
``tensors x elements``; dtype ``float32`` = fp32 teacher and student, ``float32+bfloat16`` = fp32
teacher, bf16 student.
* CUDA: BERT-base (bert-base-uncased + a 2-class head, built from its config by hand: 201
  tensors, 109,483,778 elements) fp32 and fp32+bf16; 200 x 6,500,000 (1.3B) fp32.
  ``--quick``: the two BERT-base cases.
* CPU: a BERT-like list with hidden size 128, 2 layers (41 tensors, 4,386,178 elements), both
  dtypes.
* smoke: 3 x 1000 fp32 and a 41-tensor toy list fp32+bf16.
The tensors are views of one flat buffer per side (each view starting 256-byte aligned, as
separately allocated parameters would), so that ``flat-lerp`` can update them all at once.

Providers: ``eager`` (the Python loop ``t.mul_(d).add_(s, alpha=1 - d)`` per pair, so that the
harness reports ``speedup_vs_eager`` against it), ``foreach-lerp`` (``torch._foreach_lerp_``;
with a bf16 student, after ``torch._foreach_copy_`` of the student into a preallocated fp32
list: lerp needs one dtype), ``flat-lerp`` (one ``lerp_`` over the flat buffers: the bandwidth
ceiling; with a bf16 student ``mul_`` + ``add_``, two passes, as PyTorch has no mixed-dtype
lerp), ``ours-native``, ``ours-triton`` (``sk.ema_update_`` with that backend, called with the
same lists every time).
Minimal bytes: read t, read s, write t: elements x (2 x teacher + student element size).

    python benchmarks/bench_ema.py [harness options]    (= python -m benchmarks --op ema)
"""

from __future__ import annotations

import os
import sys

import torch

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import smart_kernels as sk  # noqa: E402
from benchmarks.spec import Case, OpBench, Provider  # noqa: E402

DECAY = 0.999
ALIGN = 64  # elements between view starts (256 bytes for fp32)


def bert_shapes(
    vocab: int = 30522,
    hidden: int = 768,
    layers: int = 12,
    intermediate: int = 3072,
    max_positions: int = 512,
    type_vocab: int = 2,
    labels: int = 2,
) -> list[tuple[int, ...]]:
    """Parameter shapes of BertForSequenceClassification in ``named_parameters()`` order
    (defaults: bert-base-uncased with 2 labels: 201 tensors, 109,483,778 elements)."""
    h = hidden
    shapes: list[tuple[int, ...]] = [(vocab, h), (max_positions, h), (type_vocab, h), (h,), (h,)]
    for _ in range(layers):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(h, h), (h,)]
        shapes += [(h,), (h,)]  # attention LayerNorm
        shapes += [(intermediate, h), (intermediate,), (h, intermediate), (h,)]
        shapes += [(h,), (h,)]  # output LayerNorm
    shapes += [(h, h), (h,), (labels, h), (labels,)]  # pooler, classifier
    return shapes


LISTS = {
    "bert-base": bert_shapes(),
    "bert-h128-l2": bert_shapes(hidden=128, layers=2, intermediate=512),
    "toy": bert_shapes(vocab=50, hidden=8, layers=2, intermediate=16, max_positions=8),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class EmaCase(Case):
    """A list of tensors: ``extra`` names the list (``LISTS``) or gives ``count`` x ``each``
    elements, and the student's dtype when it differs from the teacher's (``dtype``)."""

    @property
    def options(self) -> dict:
        return dict(self.extra)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        opts = self.options
        if "list" in opts:
            return LISTS[opts["list"]]
        return [(opts["each"],)] * opts["count"]

    @property
    def student_dtype(self) -> torch.dtype:
        return self.options.get("student", self.dtype)

    @property
    def dtype_name(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        if self.student_dtype != self.dtype:
            name += "+" + str(self.student_dtype).replace("torch.", "")
        return name


def model_case(name: str, dtype: torch.dtype, student: torch.dtype | None = None) -> EmaCase:
    extra = (("list", name),) + ((("student", student),) if student is not None else ())
    return EmaCase((sum(map(_numel, LISTS[name])),), dtype, extra)


def uniform_case(count: int, each: int, dtype: torch.dtype) -> EmaCase:
    return EmaCase((count, each), dtype, (("count", count), ("each", each)))


BERT_FP32 = model_case("bert-base", torch.float32)
BERT_MIXED = model_case("bert-base", torch.float32, torch.bfloat16)
GPU_CASES = [BERT_FP32, BERT_MIXED, uniform_case(200, 6_500_000, torch.float32)]
GPU_QUICK = [BERT_FP32, BERT_MIXED]
CPU_CASES = [
    model_case("bert-h128-l2", torch.float32),
    model_case("bert-h128-l2", torch.float32, torch.bfloat16),
]
SMOKE_CASES = [
    uniform_case(3, 1000, torch.float32),
    model_case("toy", torch.float32, torch.bfloat16),
]


def cases(device: torch.device, size: str) -> list[Case]:
    if size == "smoke":
        return SMOKE_CASES
    if device.type == "cuda":
        return GPU_QUICK if size == "quick" else GPU_CASES
    return CPU_CASES


class _Lists:
    """The per-tensor views of the last inputs made (one slot: a new make_inputs drops the old
    buffers before allocating). Providers find them from the flat buffers they are given."""

    flat: tuple[torch.Tensor, ...] = ()
    teacher: list[torch.Tensor] = []
    student: list[torch.Tensor] = []
    scratch: list[torch.Tensor] = []  # fp32 copies of a low-precision student (foreach-lerp)


def _views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in shapes:
        n = _numel(shape)
        out.append(flat[offset : offset + n].view(shape))
        offset += -(-n // ALIGN) * ALIGN
    return out


def make_inputs(case: Case, device: torch.device) -> list[torch.Tensor]:
    _Lists.flat, _Lists.teacher, _Lists.student, _Lists.scratch = (), [], [], []
    shapes = case.shapes
    total = sum(-(-_numel(s) // ALIGN) * ALIGN for s in shapes)
    gen = torch.Generator(device=device).manual_seed(0)  # the same inputs for every provider
    flat_t = torch.randn(total, device=device, generator=gen).to(case.dtype)
    flat_s = torch.randn(total, device=device, generator=gen).to(case.student_dtype)
    _Lists.flat = (flat_t, flat_s)
    _Lists.teacher, _Lists.student = _views(flat_t, shapes), _views(flat_s, shapes)
    if case.student_dtype != case.dtype:
        _Lists.scratch = _views(torch.empty_like(flat_t), shapes)
    return [flat_t, flat_s]


def min_bytes(case: Case, mode: str) -> int:
    t_size = torch.tensor([], dtype=case.dtype).element_size()
    s_size = torch.tensor([], dtype=case.student_dtype).element_size()
    return sum(map(_numel, case.shapes)) * (2 * t_size + s_size)


def _lists(flat_t: torch.Tensor, flat_s: torch.Tensor):
    if _Lists.flat and _Lists.flat[0] is flat_t and _Lists.flat[1] is flat_s:
        return _Lists.teacher, _Lists.student
    raise RuntimeError("bench_ema: inputs not made by make_inputs")


def loop(flat_t: torch.Tensor, flat_s: torch.Tensor) -> None:
    for t, s in zip(*_lists(flat_t, flat_s), strict=True):
        t.mul_(DECAY).add_(s, alpha=1 - DECAY)


def foreach_lerp(flat_t: torch.Tensor, flat_s: torch.Tensor) -> None:
    teacher, student = _lists(flat_t, flat_s)
    if flat_s.dtype != flat_t.dtype:
        torch._foreach_copy_(_Lists.scratch, student)
        student = _Lists.scratch
    torch._foreach_lerp_(teacher, student, 1 - DECAY)


def flat_lerp(flat_t: torch.Tensor, flat_s: torch.Tensor) -> None:
    if flat_s.dtype != flat_t.dtype:  # no one-kernel mixed-dtype lerp in PyTorch: two passes
        flat_t.mul_(DECAY).add_(flat_s, alpha=1 - DECAY)
    else:
        flat_t.lerp_(flat_s, 1 - DECAY)


def providers(device: torch.device) -> list[Provider]:
    out = [
        Provider("eager", loop),
        Provider("foreach-lerp", foreach_lerp),
        Provider("flat-lerp", flat_lerp),
    ]
    for name, info in sk.backends().items():
        if name == "reference":
            continue
        reason = info.reason(device)

        def fn(flat_t, flat_s, _n=name):
            sk.ema_update_(*_lists(flat_t, flat_s), DECAY, backend=_n)

        out.append(Provider(f"ours-{name}", None if reason else fn, reason))
    return out


EMA = OpBench("ema", cases, make_inputs, providers, min_bytes, modes=("fwd",))
OPS = [EMA]

if __name__ == "__main__":
    from benchmarks.harness import main

    main(default_ops="ema")
