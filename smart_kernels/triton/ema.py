"""EMA teacher update, Triton kernels: a multi-tensor in-place update and an elementwise op.

Math (per element, accumulated in ACC = fp64 for fp64 teachers, else fp32; w = decay and
1 - w as the reference rounds them: a float decay's ``1 - decay`` is computed in fp64 on the
host, as PyTorch does for a Python scalar; a tensor decay's in ACC):
    ema_update_:  t <- w * t + (1 - w) * s       in place, stored in the teacher's dtype
    ema:          out = w * t + (1 - w) * s      a new tensor in the teacher's dtype
Gradient of ``ema`` (applied in smart_kernels/ops/ema.py, no kernel needed):
    d out / d t = w * g,   d out / d s = (1 - w) * g,   none for the decay.
Evaluated as ATen's ``lerp(t, s, 1 - w)`` (and as the native kernels and the reference do): with
u = 1 - w, ``fma(u, s - t, t)`` if |u| < 0.5 else ``fma(u - 1, s - t, s)``, which is exact at
decay 1 (t) and decay 0 (s) and matches ``t.lerp_(s, 1 - decay)`` where the sum cancels.
Non-floating pairs (integer / bool buffers) are copied byte for byte.

Multi-tensor layout: the lists are cut into chunks of at most CHUNK elements; an int64 table in
device memory holds one row per chunk, (teacher address, student address, elements), and one
program updates one chunk. One launch per (teacher dtype, student dtype, 16-byte aligned or not)
group, so a BERT-base list (201 tensors) is one launch. Aligned groups tell the compiler that
both addresses are multiples of 16 bytes, so the unmasked full blocks use 16-byte vector loads;
the last partial block of each chunk is masked. The decay is a Python float or read in-kernel
from a 0-d device tensor (no host synchronization: a captured CUDA graph replays with whatever
value the tensor holds). Chunk lengths are < 2^31 (int32 offsets); addresses are int64.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from smart_kernels._backends import triton_interpret
from smart_kernels.reference import acc_dtype

BLOCK = 4096  # elements per loop step of a program
CHUNK = 8 * BLOCK  # elements per program (one table row)
NUM_WARPS = 8
ROW = 3  # int64s per table row: teacher address, student address, elements (or bytes)

_TL_DTYPE = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}
_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _to_type(x, T_TYPE: tl.constexpr, RNE_BF16: tl.constexpr):
    """x (fp32 when RNE_BF16) in T_TYPE, rounded to nearest even. The interpreter truncates
    fp32 -> bf16; there (RNE_BF16) the rounding is done on the bits, NaN kept NaN."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), y)
    else:
        return x.to(T_TYPE)


@triton.jit
def _lerp(t, s, u):
    """ATen's lerp(t, s, u) in t's dtype: fused, exact at u = 0 and u = 1."""
    diff = s - t
    return tl.where(tl.abs(u) < 0.5, tl.fma(u, diff, t), tl.fma(u - 1.0, diff, s))


@triton.jit
def ema_update_multi_kernel(
    table_ptr,
    decay_ptr,
    decay,
    decay_s,
    T_TYPE: tl.constexpr,
    S_TYPE: tl.constexpr,
    ACC: tl.constexpr,
    HAS_DECAY_TENSOR: tl.constexpr,
    COPY: tl.constexpr,
    ALIGNED: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One chunk per program: t[i] <- lerp(t[i], s[i], 1 - w) for i < n (COPY: t[i] <- s[i],
    # T_TYPE = S_TYPE = int8 and n counts bytes). Table row: (t address, s address, n).
    row = table_ptr + tl.program_id(0).to(tl.int64) * 3
    t_addr = tl.load(row)
    s_addr = tl.load(row + 1)
    n = tl.load(row + 2).to(tl.int32)
    t_ptr = t_addr.to(tl.pointer_type(T_TYPE))
    s_ptr = s_addr.to(tl.pointer_type(S_TYPE))
    if ALIGNED:  # the launcher checked: both chunks start on a 16-byte boundary
        t_ptr = tl.multiple_of(t_ptr, 16)  # (a hint on the pointer: on the int it is lost)
        s_ptr = tl.multiple_of(s_ptr, 16)
    if HAS_DECAY_TENSOR:
        w = tl.load(decay_ptr).to(ACC)
        w_s = 1.0 - w
    else:  # fp32 kernel arguments (fp64 accumulation gets a tensor); 1 - decay from the host
        w = tl.zeros([], ACC) + decay
        w_s = tl.zeros([], ACC) + decay_s
    offs = tl.arange(0, BLOCK)
    for i in range(0, n // BLOCK):  # full blocks: unmasked (vectorized when ALIGNED)
        o = i * BLOCK + offs
        s = tl.load(s_ptr + o)
        if COPY:
            tl.store(t_ptr + o, s)
        else:
            t = tl.load(t_ptr + o).to(ACC)
            tl.store(t_ptr + o, _to_type(_lerp(t, s.to(ACC), w_s), T_TYPE, RNE_BF16))
    o = (n // BLOCK) * BLOCK + offs
    valid = o < n
    s = tl.load(s_ptr + o, mask=valid)
    if COPY:
        tl.store(t_ptr + o, s, mask=valid)
    else:
        t = tl.load(t_ptr + o, mask=valid).to(ACC)
        tl.store(t_ptr + o, _to_type(_lerp(t, s.to(ACC), w_s), T_TYPE, RNE_BF16), mask=valid)


@triton.jit
def ema_kernel(
    t_ptr,
    s_ptr,
    out_ptr,
    decay_ptr,
    decay,
    decay_s,
    n,
    ACC: tl.constexpr,
    HAS_DECAY_TENSOR: tl.constexpr,
    RNE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # out = lerp(t, s, 1 - w) over n contiguous elements; int64 offsets (n may exceed 2^31).
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = o < n
    if HAS_DECAY_TENSOR:
        w = tl.load(decay_ptr).to(ACC)
        w_s = 1.0 - w
    else:
        w = tl.zeros([], ACC) + decay
        w_s = tl.zeros([], ACC) + decay_s
    t = tl.load(t_ptr + o, mask=valid).to(ACC)
    s = tl.load(s_ptr + o, mask=valid).to(ACC)
    out = _to_type(_lerp(t, s, w_s), out_ptr.dtype.element_ty, RNE_BF16)
    tl.store(out_ptr + o, out, mask=valid)


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device otherwise)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _rne_bf16(dtype: torch.dtype) -> bool:
    """Round fp32 -> bf16 by hand (the interpreter truncates)."""
    return dtype == torch.bfloat16 and triton_interpret()


def _decay_args(
    decay_tensor: torch.Tensor | None, decay: float, acc: torch.dtype, device: torch.device
) -> tuple[torch.Tensor | None, float]:
    """A float kernel argument is fp32: for fp64 accumulation a float decay goes in a tensor."""
    if decay_tensor is None and acc == torch.float64:
        decay_tensor = torch.full((), decay, dtype=torch.float64, device=device)
    return decay_tensor, float(decay)


class EmaTable:
    """The chunk table of a fixed pair of lists (contiguous pairs of one shape each), in device
    memory, and the launches that update them. Build once, :meth:`launch` many times: a launch
    does no per-tensor Python work. The table holds raw addresses: it is valid while every
    tensor keeps its storage (same ``data_ptr``); the caller guarantees that (ops/ema.py keys
    its cache on ids, data pointers and sizes, and drops entries when a tensor dies).

    On CUDA the table is copied from pinned memory without blocking; build it before a CUDA
    graph capture (the launches themselves are capturable).
    """

    def __init__(self, teacher: list[torch.Tensor], student: list[torch.Tensor]):
        groups: dict[tuple, list[int]] = {}
        self.device = teacher[0].device if teacher else torch.device("cpu")
        for t, s in zip(teacher, student, strict=True):
            if not (t.is_contiguous() and s.is_contiguous()):
                raise ValueError("EmaTable: every teacher / student tensor must be contiguous")
            if t.numel() != s.numel():
                raise ValueError(f"EmaTable: sizes differ ({t.numel()} and {s.numel()})")
            n = t.numel()
            if n == 0:
                continue
            copy = not t.is_floating_point()
            if copy:  # bytes
                t_size = s_size = 1
                n *= t.element_size()
                key_types = (None, None)
            else:
                t_size, s_size = t.element_size(), s.element_size()
                key_types = (t.dtype, s.dtype)
            t_addr, s_addr = t.data_ptr(), s.data_ptr()
            aligned = t_addr % 16 == 0 and s_addr % 16 == 0
            rows = groups.setdefault((*key_types, aligned), [])
            for start in range(0, n, CHUNK):
                rows += (t_addr + start * t_size, s_addr + start * s_size, min(CHUNK, n - start))
        self.launches: list[tuple] = []
        if not groups:
            self.table = None
            return
        host = torch.tensor([v for rows in groups.values() for v in rows], dtype=torch.int64)
        if self.device.type == "cuda":
            host = host.pin_memory()
            self.table = host.to(self.device, non_blocking=True)
            self._host = host  # the source of the asynchronous copy stays alive with the table
            # A launch on another stream must wait for the upload (recorded on this one).
            self._upload_stream = torch.cuda.current_stream(self.device)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record(self._upload_stream)
        else:
            self.table = host.to(self.device)
        offset = 0
        for (t_dtype, s_dtype, aligned), rows in groups.items():
            chunks = len(rows) // ROW
            view = self.table[offset * ROW : (offset + chunks) * ROW]
            offset += chunks
            if t_dtype is None:
                meta = (tl.int8, tl.int8, tl.float32, True, False, torch.float32)
            else:
                acc = acc_dtype(t_dtype)
                t_tl, s_tl, acc_tl = _TL_DTYPE[t_dtype], _TL_DTYPE[s_dtype], _TL_ACC[acc]
                meta = (t_tl, s_tl, acc_tl, False, _rne_bf16(t_dtype), acc)
            self.launches.append((view, chunks, aligned, *meta))

    def launch(self, decay_tensor: torch.Tensor | None, decay: float) -> None:
        """Apply the update with ``decay_tensor`` (0-d fp32/fp64, read in-kernel) if given,
        else the float ``decay``."""
        if not self.launches:
            return
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            if stream != self._upload_stream and not torch.cuda.is_current_stream_capturing():
                stream.wait_event(self._uploaded)
        with _on_device(self.table):
            for view, chunks, aligned, t_type, s_type, acc_tl, copy, rne, acc in self.launches:
                dt, d = _decay_args(decay_tensor, decay, acc, self.device)
                ema_update_multi_kernel[(chunks,)](
                    view, dt if dt is not None else view, d, 1.0 - d,
                    T_TYPE=t_type, S_TYPE=s_type, ACC=acc_tl, HAS_DECAY_TENSOR=dt is not None,
                    COPY=copy, ALIGNED=aligned, RNE_BF16=rne, BLOCK=BLOCK, num_warps=NUM_WARPS,
                )  # fmt: skip


def ema_update_(
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    decay_tensor: torch.Tensor | None,
    decay: float,
) -> None:
    """``teacher[i] <- decay * teacher[i] + (1 - decay) * student[i]`` in place, as
    ``torch.ops.smart_kernels.ema_update_``: contiguous pairs of one numel each, on one device;
    a floating teacher may differ in dtype from its student; non-floating pairs are copied.

    Builds the chunk table on every call; to repeat an update of the same lists without that
    cost, keep an :class:`EmaTable` (smart_kernels.ops.ema caches one per pair of lists).
    """
    EmaTable(teacher, student).launch(decay_tensor, decay)


def ema(
    teacher: torch.Tensor,
    student: torch.Tensor,
    decay_tensor: torch.Tensor | None,
    decay: float,
) -> torch.Tensor:
    """``decay * teacher + (1 - decay) * student``: teacher, student of one shape (any float
    dtypes), result contiguous in teacher's dtype and shape."""
    t = teacher.contiguous()
    s = student.contiguous()
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    n = t.numel()
    if n == 0:
        return out
    acc = acc_dtype(t.dtype)
    dt, d = _decay_args(decay_tensor, decay, acc, t.device)
    with _on_device(t):
        ema_kernel[(triton.cdiv(n, BLOCK),)](
            t, s, out, dt if dt is not None else out, d, 1.0 - d, n,
            ACC=_TL_ACC[acc], HAS_DECAY_TENSOR=dt is not None, RNE_BF16=_rne_bf16(t.dtype),
            BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out
