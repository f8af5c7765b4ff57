"""Symmetric KL / KL on rows of logits, Triton kernels.

Per row (a = input, b = target, V entries): P = softmax(a), Q = softmax(b),
d = log P - log Q = (a - lse_a) - (b - lse_b).
  sym_kl  L = sum_j (P_j - Q_j) d_j = KL(P||Q) + KL(Q||P) = E_P[a-b] - E_Q[a-b]
  kl      L = KL(Q||P) = E_Q[b-a] + lse_a - lse_b
Forward: one program per row, ONE read of both rows in BLOCK_V chunks with online (rescaled)
sums over the shifted logits x = a - m_a, y = b - m_b (m = running max):
  s_a = sum e^x, t_a = sum e^x (x - y), s_b = sum e^y, t_b = sum e^y (x - y);
with r = log s_a - log s_b: KL(P||Q) = t_a/s_a - r, KL(Q||P) = r - t_b/s_b, L = t_a/s_a - t_b/s_b
(x - y keeps a per-row offset between the logits out of the sums: nothing large cancels). When a
max grows, the sums are rescaled by e^(m_old - m_new) and t is shifted by (c_old - c_new) s with
c = m_a - m_b. A position where both logits are -inf weighs 0; a row that is all -inf in both
inputs has value 0 and gradient 0. Stats saved per row: (m_a, m_b, log s_a, log s_b, KL(P||Q),
KL(Q||P)), so that log P = (a - m_a) - log s_a is as exact as log_softmax.
Rows are walked as head (to a 16-byte boundary) + unmasked aligned blocks + masked tail, so that
odd V (e.g. 50257) still gets vectorized loads and stores.
Backward (second read; g = grad of the row value):
  mode 0 (sym, full):      dL/da = g (P (d - KL(P||Q)) + P - Q)
                           dL/db = -g (Q (d + KL(Q||P)) + P - Q)
  mode 1 (sym, stop_grad): dL/da = g (P - Q),                     dL/db = g (Q - P)
  mode 2 (kl):             dL/da = g (P - Q),                     dL/db = g Q (-d - KL(Q||P))
Accumulation in fp32 (fp64 for fp64 inputs); values are cast right after tl.load. On a GPU, exp
is libdevice's accurate exp (tl.exp is ex2.approx-based: its relative error grows with |x|, and
P - Q amplifies it when P ~ Q); the interpreter has no libdevice and uses numpy's exp.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from smart_kernels.reference import acc_dtype

try:
    from triton.language.extra import libdevice

    _HAS_LIBDEVICE = True
except ImportError:  # an old triton: fall back to tl.exp
    libdevice = None
    _HAS_LIBDEVICE = False

STATS_PER_ROW = 6  # csrc/acc_type.h

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _offset(m):
    """The offset subtracted: the max, or 0 while everything so far is -inf (e^-inf = 0)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _online_update(x, y, m_a, m_b, s_a, t_a, s_b, t_b, PRECISE: tl.constexpr):
    """Fold a block of logits x (input) and y (target), -inf where absent, into the online state
    (module docstring) of both rows."""
    neg_inf = float("-inf")
    new_a = tl.maximum(m_a, tl.max(x, axis=0))
    new_b = tl.maximum(m_b, tl.max(y, axis=0))
    f_a = tl.where(m_a == neg_inf, 0.0, _exp(m_a - new_a, PRECISE))
    f_b = tl.where(m_b == neg_inf, 0.0, _exp(m_b - new_b, PRECISE))
    o_a = _offset(new_a)
    o_b = _offset(new_b)
    shift = (_offset(m_a) - _offset(m_b)) - (o_a - o_b)
    t_a = f_a * (t_a + shift * s_a)
    s_a = f_a * s_a
    t_b = f_b * (t_b + shift * s_b)
    s_b = f_b * s_b
    xs = x - o_a
    ys = y - o_b
    e_a = _exp(xs, PRECISE)
    e_b = _exp(ys, PRECISE)
    s_a += tl.sum(e_a, axis=0)
    t_a += tl.sum(tl.where(e_a == 0.0, 0.0, e_a * (xs - ys)), axis=0)
    s_b += tl.sum(e_b, axis=0)
    t_b += tl.sum(tl.where(e_b == 0.0, 0.0, e_b * (xs - ys)), axis=0)
    return new_a, new_b, s_a, t_a, s_b, t_b


@triton.jit
def _row_head(row, stride, n, ALIGN: tl.constexpr):
    """Elements before the row's first ALIGN-element (16-byte) boundary (0 when ALIGN == 1)."""
    if ALIGN > 1:
        return tl.minimum((ALIGN - (row * stride) % ALIGN) % ALIGN, n)
    else:
        return 0


@triton.jit
def _aligned(offs, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    """Tell the compiler that offs (a contiguous block) starts on an ALIGN boundary."""
    if ALIGN > 1:
        offs = tl.max_contiguous(tl.multiple_of(offs, ALIGN), BLOCK)
    return offs


@triton.jit
def sym_kl_fwd_kernel(
    a_ptr,
    b_ptr,
    stride_a,
    stride_b,
    mask_ptr,
    rows_ptr,
    stats_ptr,
    V,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
    PRECISE: tl.constexpr,
    STATS: tl.constexpr,
):
    # Each row: a head up to a 16-byte boundary (ALIGN > 1: rows of a and b are equally
    # misaligned, checked by the launcher), unmasked aligned BLOCK_V blocks, a masked tail.
    row = tl.program_id(0).to(tl.int64)
    n = V
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
        n = tl.where(keep, V, 0)  # a masked row reads nothing
    neg_inf = float("-inf")
    m_a = tl.full([], neg_inf, ACC)
    m_b = tl.full([], neg_inf, ACC)
    s_a = tl.zeros([], ACC)
    t_a = tl.zeros([], ACC)
    s_b = tl.zeros([], ACC)
    t_b = tl.zeros([], ACC)
    head = _row_head(row, stride_a, n, ALIGN)
    if ALIGN > 1:  # (names of their own: the loop below must not see them as loop-carried)
        offs_h = tl.arange(0, ALIGN)
        valid_h = offs_h < head
        x_h = tl.load(a_ptr + row * stride_a + offs_h, mask=valid_h, other=neg_inf).to(ACC)
        y_h = tl.load(b_ptr + row * stride_b + offs_h, mask=valid_h, other=neg_inf).to(ACC)
        m_a, m_b, s_a, t_a, s_b, t_b = _online_update(
            x_h, y_h, m_a, m_b, s_a, t_a, s_b, t_b, PRECISE
        )
    n_full = (n - head) // BLOCK_V
    for i in range(0, n_full):
        j = head + i * BLOCK_V
        offs_a = _aligned(row * stride_a + j + tl.arange(0, BLOCK_V), ALIGN, BLOCK_V)
        offs_b = _aligned(row * stride_b + j + tl.arange(0, BLOCK_V), ALIGN, BLOCK_V)
        x = tl.load(a_ptr + offs_a).to(ACC)
        y = tl.load(b_ptr + offs_b).to(ACC)
        m_a, m_b, s_a, t_a, s_b, t_b = _online_update(x, y, m_a, m_b, s_a, t_a, s_b, t_b, PRECISE)
    offs = head + n_full * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < n
    x = tl.load(a_ptr + row * stride_a + offs, mask=valid, other=neg_inf).to(ACC)
    y = tl.load(b_ptr + row * stride_b + offs, mask=valid, other=neg_inf).to(ACC)
    m_a, m_b, s_a, t_a, s_b, t_b = _online_update(x, y, m_a, m_b, s_a, t_a, s_b, t_b, PRECISE)
    log_sa = tl.log(s_a)
    log_sb = tl.log(s_b)
    r = log_sa - log_sb
    e_p = t_a / s_a
    e_q = t_b / s_b
    kl_pq = e_p - r
    kl_qp = r - e_q
    if MODE == 2:
        value = kl_qp
    else:
        value = e_p - e_q
    # both rows entirely -inf (or a masked row): nothing contributes; zero stats make the
    # backward's P and Q exactly 0
    live = (s_a != 0.0) | (s_b != 0.0)
    o_a = tl.where(live, _offset(m_a), 0.0)
    o_b = tl.where(live, _offset(m_b), 0.0)
    st = stats_ptr + row * STATS
    tl.store(rows_ptr + row, tl.where(live, value, 0.0))
    tl.store(st, o_a)
    tl.store(st + 1, o_b)
    tl.store(st + 2, tl.where(live, log_sa, 0.0))
    tl.store(st + 3, tl.where(live, log_sb, 0.0))
    tl.store(st + 4, tl.where(live, kl_pq, 0.0))
    tl.store(st + 5, tl.where(live, kl_qp, 0.0))


@triton.jit
def _grad_block(
    x,
    y,
    g,
    m_a,
    m_b,
    log_sa,
    log_sb,
    kl_pq,
    kl_qp,
    keep,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Gradients (w.r.t. input, target) of g * row value at logits x, y (DESIGN §3); exact
    zeros for a masked row (keep False), even from inf inputs."""
    lp = (x - m_a) - log_sa  # log P, as exact as log_softmax
    lq = (y - m_b) - log_sb
    p = _exp(lp, PRECISE)
    q = _exp(lq, PRECISE)
    va = p - q
    if MODE == 0:
        va += tl.where(p == 0.0, 0.0, p * (lp - lq - kl_pq))
        vb = (q - p) - tl.where(q == 0.0, 0.0, q * (lp - lq + kl_qp))
    elif MODE == 1:
        vb = q - p
    else:
        vb = tl.where(q == 0.0, 0.0, q * (lq - lp - kl_qp))
    va = g * va
    vb = g * vb
    if HAS_MASK:
        va = tl.where(keep, va, 0.0)
        vb = tl.where(keep, vb, 0.0)
    return va, vb


@triton.jit
def sym_kl_bwd_kernel(
    g_ptr,
    stride_g,
    scale_ptr,
    a_ptr,
    b_ptr,
    stride_a,
    stride_b,
    mask_ptr,
    stats_ptr,
    ga_ptr,
    gb_ptr,
    V,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    NEED_A: tl.constexpr,
    NEED_B: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
    PRECISE: tl.constexpr,
    STATS: tl.constexpr,
):
    # Same row walk as the forward; with ALIGN > 1 the gradient rows (contiguous, length V) are
    # misaligned like the inputs' (checked by the launcher), so the stores vectorize too.
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + row * stride_g).to(ACC) * tl.load(scale_ptr)
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    st = stats_ptr + row * STATS
    m_a = tl.load(st)
    m_b = tl.load(st + 1)
    log_sa = tl.load(st + 2)
    log_sb = tl.load(st + 3)
    kl_pq = tl.load(st + 4)
    kl_qp = tl.load(st + 5)
    ga_row = ga_ptr + row * V
    gb_row = gb_ptr + row * V
    head = _row_head(row, stride_a, V, ALIGN)
    if ALIGN > 1:  # (names of their own: the loop below must not see them as loop-carried)
        offs_h = tl.arange(0, ALIGN)
        valid_h = offs_h < head
        x_h = tl.load(a_ptr + row * stride_a + offs_h, mask=valid_h, other=0.0).to(ACC)
        y_h = tl.load(b_ptr + row * stride_b + offs_h, mask=valid_h, other=0.0).to(ACC)
        va_h, vb_h = _grad_block(
            x_h, y_h, g, m_a, m_b, log_sa, log_sb, kl_pq, kl_qp, keep, MODE, HAS_MASK, PRECISE
        )
        if NEED_A:
            tl.store(ga_row + offs_h, va_h.to(ga_ptr.dtype.element_ty), mask=valid_h)
        if NEED_B:
            tl.store(gb_row + offs_h, vb_h.to(gb_ptr.dtype.element_ty), mask=valid_h)
    n_full = (V - head) // BLOCK_V
    for i in range(0, n_full):
        j = head + i * BLOCK_V
        offs_a = _aligned(row * stride_a + j + tl.arange(0, BLOCK_V), ALIGN, BLOCK_V)
        offs_b = _aligned(row * stride_b + j + tl.arange(0, BLOCK_V), ALIGN, BLOCK_V)
        offs_g = _aligned(row * V + j + tl.arange(0, BLOCK_V), ALIGN, BLOCK_V)
        x = tl.load(a_ptr + offs_a).to(ACC)
        y = tl.load(b_ptr + offs_b).to(ACC)
        va, vb = _grad_block(
            x, y, g, m_a, m_b, log_sa, log_sb, kl_pq, kl_qp, keep, MODE, HAS_MASK, PRECISE
        )
        if NEED_A:
            tl.store(ga_ptr + offs_g, va.to(ga_ptr.dtype.element_ty))
        if NEED_B:
            tl.store(gb_ptr + offs_g, vb.to(gb_ptr.dtype.element_ty))
    offs = head + n_full * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < V
    x = tl.load(a_ptr + row * stride_a + offs, mask=valid, other=0.0).to(ACC)
    y = tl.load(b_ptr + row * stride_b + offs, mask=valid, other=0.0).to(ACC)
    va, vb = _grad_block(
        x, y, g, m_a, m_b, log_sa, log_sb, kl_pq, kl_qp, keep, MODE, HAS_MASK, PRECISE
    )
    if NEED_A:
        tl.store(ga_row + offs, va.to(ga_ptr.dtype.element_ty), mask=valid)
    if NEED_B:
        tl.store(gb_row + offs, vb.to(gb_ptr.dtype.element_ty), mask=valid)


def _align(*tensors: torch.Tensor, strides: tuple[int, ...]) -> int:
    """ALIGN for the kernels: elements per 16 bytes if every tensor starts 16-byte aligned and all
    the row strides agree modulo it (rows then share one misalignment), else 1."""
    per16 = 16 // tensors[0].element_size()
    if any(t.data_ptr() % 16 for t in tensors if t.numel()):
        return 1
    if any((s - strides[0]) % per16 for s in strides):
        return 1
    return per16


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device otherwise)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _precise(x: torch.Tensor) -> bool:
    """libdevice's exp on a GPU (not under the interpreter, which has no libdevice)."""
    return _HAS_LIBDEVICE and x.is_cuda


def _launch_config(V: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(V), 4096)
    num_warps = 8 if block >= 2048 else (4 if block >= 256 else 1)
    return block, num_warps


def _reduction_scale(
    n: int,
    v: int,
    mask: torch.Tensor | None,
    reduction: int,
    acc: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """0-d factor from the sum of rows to the reduced value (csrc/checks.h: reduction_scale)."""
    if reduction not in (2, 3):  # none, sum
        return torch.ones((), dtype=acc, device=device)
    per_row = v if reduction == 3 else 1
    if mask is None:
        return torch.full((), 1.0 / max(n * per_row, 1), dtype=acc, device=device)
    return (mask.sum() * per_row).clamp(min=1).to(acc).reciprocal()


def sym_kl_fwd(
    input: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    mode: int,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input, target: [N, V] with contiguous rows; mask: [N] bool or None.

    Returns (out: [N] for reduction 0 (none) else 0-d, stats [N, 6], scale 0-d), in the
    accumulation dtype, as ``torch.ops.smart_kernels.sym_kl_fwd``.
    """
    N, V = input.shape
    mask = None if mask is None else mask.contiguous()  # the kernel reads mask_ptr + row
    acc = acc_dtype(input.dtype)
    rows = input.new_empty((N,), dtype=acc)
    stats = input.new_empty((N, STATS_PER_ROW), dtype=acc)
    if N > 0:
        block, num_warps = _launch_config(V)
        align = _align(input, target, strides=(input.stride(0), target.stride(0)))
        with _on_device(input):
            sym_kl_fwd_kernel[(N,)](
                input, target, input.stride(0), target.stride(0),
                mask if mask is not None else rows,  # dummy pointer when HAS_MASK is False
                rows, stats, V,
                MODE=mode, HAS_MASK=mask is not None, ACC=_TL_ACC[acc], BLOCK_V=block,
                ALIGN=align, PRECISE=_precise(input), STATS=STATS_PER_ROW, num_warps=num_warps,
            )  # fmt: skip
    scale = _reduction_scale(N, V, mask, reduction, acc, input.device)
    if reduction == 0:
        return rows, stats, scale
    out = (rows.sum(dtype=torch.float64) * scale).to(acc)
    return out, stats, scale


def sym_kl_bwd(
    grad_out: torch.Tensor,
    scale: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    mode: int,
    need_input: bool,
    need_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients given grad_out ([N] or 0-d); each row's is grad_out * scale.

    Returns ([N, V] or empty, [N, V] or empty) in the input dtype.
    """
    N, V = input.shape
    mask = None if mask is None else mask.contiguous()  # the kernel reads mask_ptr + row
    ga = input.new_empty((N, V) if need_input else (0,))
    gb = input.new_empty((N, V) if need_target else (0,))
    if N == 0 or not (need_input or need_target):
        return ga, gb
    acc = acc_dtype(input.dtype)
    grad_out = grad_out.to(acc)
    stride_g = grad_out.stride(0) if grad_out.dim() == 1 else 0
    block, num_warps = _launch_config(V)
    # the gradient rows (contiguous, stride V) must share the inputs' misalignment
    align = _align(input, target, ga, gb, strides=(input.stride(0), target.stride(0), V))
    with _on_device(input):
        sym_kl_bwd_kernel[(N,)](
            grad_out, stride_g, scale, input, target, input.stride(0), target.stride(0),
            mask if mask is not None else stats, stats,
            ga if need_input else input, gb if need_target else target, V,
            MODE=mode, HAS_MASK=mask is not None, NEED_A=need_input, NEED_B=need_target,
            ACC=_TL_ACC[acc], BLOCK_V=block, ALIGN=align, PRECISE=_precise(input),
            STATS=STATS_PER_ROW, num_warps=num_warps,
        )  # fmt: skip
    return ga, gb
