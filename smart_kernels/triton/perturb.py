"""Adversarial perturbation ops (normalize, its backward, perturb_step, init_noise), Triton kernels.

x: [..., T, H], contiguous. A group is one token (token scope: the last dim, L = H) or one
sequence (sequence scope: the last two dims, L = T*H); G = numel / L groups, each contiguous.
mask (perturb_step, init_noise): bool x.shape[:-1], one flag per token of H elements; a False
token reads as d = g = 0 in every reduction and gets output 0.
The per-element math and the stage structure are csrc/perturb_math.h's (all backends compute the
same thing):
  normalize       inf: y = x / (m + eps), m = max|x| (NaN-propagating)
                  l2:  y = x / (n + eps), n = ||x||_2
                  l1:  y = sign(x)
  normalize_bwd   (g = dL/dy, dot = <g, x>, c = #{j : |x_j| = m}, amax's even split of ties)
                  inf: dx = g / (m + eps) - dot / (m + eps)^2 * sign(x) [|x| = m] / c
                  l2:  dx = g / (n + eps) - x dot / (n (n + eps)^2)   (second term 0 if n = 0)
                  l1:  dx = 0
  perturb_step    (d = noise, g = grad; never differentiated)
                  paper: stage 1 reduces g (max|g| or sum g^2) -> scale1 = 1 / (norm + eps),
                         s = d + step * (l1 ? sign(g) : g * scale1);
                         inf: out = clamp(s, -radius, radius);
                         l2 / l1, finite radius: stage 2 reduces n = ||s||_2 / ||s||_1,
                         out = s * (n > radius ? radius / n : 1); radius = inf: out = s
                  normalize_sum: s = d + step * g, stage 1 reduces s,
                         out = l1 ? sign(s) : s * scale1
  init_noise      element i = std * output (i % 4) of Box-Muller on Philox4x32-10(key = seed,
                  counter = (i / 4, 0)): uniforms u = ((bits >> 8) + 0.5) / 2^24, normals
                  sqrt(-2 log u1) (cos, sin)(2 pi u2) on the pairs (v0, v1), (v2, v3), in fp32;
                  0 where masked. The seed (0-d int64) is read in the kernel: no host sync.
Two paths per op:
  * rows (next_power_of_2(L) <= SINGLE_MAX_BLOCK): one program holds ROWS whole groups in
    registers: one read of the inputs, the stage reductions in registers, one write.
  * split (larger groups, e.g. sequence scope T*H = 512*8192): programs (group, chunk); each
    reduction stage is a launch that writes one partial per chunk into a workspace [G, C] in the
    accumulation dtype; the next stage (and the apply launch) first reduces its group's C
    partials (one small load + a fixed-shape reduction: deterministic, and every chunk of a
    group gets the same value), then walks its chunk.
Arithmetic in fp32 (fp64 for fp64 inputs); values are cast right after tl.load (the interpreter
computes bf16 wrongly); outputs in the input dtype. Divisions and square roots are rounded to
nearest as in C++ (fp32 `/` and tl.sqrt are approximate on NVIDIA GPUs): tl.div_rn / tl.sqrt_rn
per group, and an element divided by a group's divisor via the group's rounded reciprocal plus
one FMA correction (_div_by; bit-identical to IEEE division on an H100). Float arguments are
typed fp64 (annotation) so that the fp64 path sees eps, step_size and radius exactly; _as_acc
rounds them to the accumulation dtype as the C++ kernels do. On a GPU, init_noise's log / cos /
sin are libdevice's; the interpreter has no libdevice and uses numpy's.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from triton.language.random import philox_impl

from smart_kernels.reference import acc_dtype

try:
    from triton.language.extra import libdevice

    _HAS_LIBDEVICE = True
except ImportError:  # an old triton: fall back to tl.log / tl.cos / tl.sin
    libdevice = None
    _HAS_LIBDEVICE = False

# Path choice and launch shapes (module constants: tests shrink them to reach the split path on
# small inputs; the launchers read them at call time).
SINGLE_MAX_BLOCK = 16384  # largest power-of-2 group held by one program (halved for fp64)
ROWS_TILE = 4096  # elements per program in the rows path when groups are small (many per program)
SPLIT_TILE = 4096  # elements per loop step in the split path
SPLIT_MAX_CHUNKS = 256  # at most this many chunks (partials) per group
NOISE_BLOCK = 4096  # elements per program in init_noise (a multiple of 4)

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


# ---- shared device helpers (csrc/perturb_math.h) ---------------------------------------------


@triton.jit
def _as_acc(v, ACC: tl.constexpr):
    """A float argument (fp64 on a GPU, a Python float under the interpreter) in ACC."""
    return (tl.zeros([], ACC) + v).to(ACC)


@triton.jit
def _div(x, y):
    """x / y rounded to nearest (fp32 `/` is div.full.f32 on NVIDIA; fp64 `/` is exact)."""
    x, y = tl.broadcast(x, y)
    if x.dtype == tl.float32:
        return tl.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _div_by(x, c):
    """x / c for a per-group divisor c (broadcast over x), rounded to nearest without a division
    per element: r = 1 / c rounded to nearest once per group, q = x r, then one FMA correction
    q + (x - q c) r (Markstein), which gives the rounded quotient. Where c is 0, inf or NaN,
    q = x r is already what x / c is (inf, 0 or NaN)."""
    r = _div(tl.full(c.shape, 1.0, c.dtype), c)
    x, c = tl.broadcast(x, c)
    x, r = tl.broadcast(x, r)
    q = x * r
    corrected = tl.fma(tl.fma(-q, c, x), r, q)
    return tl.where((c != 0.0) & (tl.abs(c) < float("inf")), corrected, q)


@triton.jit
def _sqrt(x):
    """Square root rounded to nearest (fp32 tl.sqrt is sqrt.approx on NVIDIA)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _sign(x):
    """sign(0) = 0, sign(NaN) = NaN."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x)).to(x.dtype)


@triton.jit
def _nan_max2(a, b):
    """max that propagates NaN (perturb_math.h nan_max)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _nan_max(v, axis: tl.constexpr):
    """NaN-propagating max over axis of values >= 0 (tl.max drops NaN on NVIDIA GPUs)."""
    m = tl.max(v, axis=axis)
    has_nan = tl.max((v != v).to(tl.int32), axis=axis)
    return tl.where(has_nan > 0, float("nan"), m)


@triton.jit
def _reduce(t, axis: tl.constexpr, IS_MAX: tl.constexpr):
    if IS_MAX:
        return _nan_max(t, axis)
    else:
        return tl.sum(t, axis=axis)


@triton.jit
def _row_tile(G, L, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows path: this program's ROWS groups of L elements (G in all) as a [ROWS, BLOCK] tile:
    (group indices [ROWS], flat offsets [ROWS, BLOCK], in-bounds mask [ROWS, BLOCK])."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * L + cols[None, :]
    inb = (rows[:, None] < G) & (cols[None, :] < L)
    return rows, offs, inb


@triton.jit
def _chunk_of(pid, C, L, CHUNK: tl.constexpr):
    """Split path: program pid = (group, chunk) = divmod(pid, C) of groups of L elements:
    (group, the chunk's [start, end) inside the group, the group's flat offset)."""
    grp = pid // C
    start = (pid % C) * CHUNK
    return grp, start, tl.minimum(start + CHUNK, L), grp * L


@triton.jit
def _group_partials(ws_ptr, C, IS_MAX: tl.constexpr, PBLOCK: tl.constexpr):
    """Reduce one group's C (<= PBLOCK) partials; 0 is the identity of both reductions."""
    i = tl.arange(0, PBLOCK)
    p = tl.load(ws_ptr + i, mask=i < C, other=0.0)
    return _reduce(p, 0, IS_MAX)


@triton.jit
def _kept(mask_ptr, grp, grp_ok, offs, inb, H, TOKEN: tl.constexpr):
    """inb & the element's token flag. TOKEN: a group is one token (mask index = group, read
    once per group where grp_ok); else the token of flat offset offs is offs // H."""
    if TOKEN:
        keep = tl.load(mask_ptr + grp, mask=grp_ok, other=0) != 0
    else:
        keep = tl.load(mask_ptr + offs // H, mask=inb, other=0) != 0
    return inb & keep


@triton.jit
def _stage1_term(d, g, step, NORM: tl.constexpr, RULE: tl.constexpr):
    """|v| (inf) or v^2 (l2) of v = g (paper) or d + step g (normalize_sum)."""
    if RULE == 0:
        v = g
    else:
        v = d + step * g
    if NORM == 0:
        return tl.abs(v)
    else:
        return v * v


@triton.jit
def _stage1_scale(r1, eps, NORM: tl.constexpr):
    """1 / (norm + eps) from the finished stage-1 reduction."""
    if NORM == 0:
        n = r1
    else:
        n = _sqrt(r1)
    return _div(tl.full(n.shape, 1.0, n.dtype), n + eps)


@triton.jit
def _paper_sum(d, g, scale1, step, NORM: tl.constexpr):
    """s = d + step * normalize(g)."""
    if NORM == 2:
        u = _sign(g)
    else:
        u = g * scale1
    return d + step * u


@triton.jit
def _stage2_term(d, g, scale1, step, NORM: tl.constexpr):
    s = _paper_sum(d, g, scale1, step, NORM)
    if NORM == 1:
        return s * s
    else:
        return tl.abs(s)


@triton.jit
def _stage2_factor(r2, radius, NORM: tl.constexpr):
    """The projection factor onto the radius ball from the finished stage-2 sum."""
    if NORM == 1:
        n = _sqrt(r2)
    else:
        n = r2
    return tl.where(n > radius, _div(tl.full(n.shape, 1.0, n.dtype) * radius, n), 1.0).to(n.dtype)


@triton.jit
def _step_output(d, g, scale1, factor2, step, radius, NORM: tl.constexpr, RULE: tl.constexpr):
    """The new noise of an unmasked element (scale1 / factor2: 1 where a stage does not exist)."""
    if RULE == 1:
        s = d + step * g
        if NORM == 2:
            return _sign(s)
        else:
            return s * scale1
    else:
        s = _paper_sum(d, g, scale1, step, NORM)
        if NORM == 0:
            return tl.where(s > radius, radius, tl.where(s < -radius, -radius, s))  # NaN passes
        else:
            return s * factor2


@triton.jit
def _normalize_output(x, r, eps, NORM: tl.constexpr):
    """y from the finished reduction r (max|x| for inf, sum x^2 for l2; unused for l1)."""
    if NORM == 2:
        return _sign(x)
    else:
        if NORM == 0:
            n = r
        else:
            n = _sqrt(r)
        return _div_by(x, n + eps)


@triton.jit
def _normalize_grad(g, x, r, dot, ties, eps, NORM: tl.constexpr):
    """dx from r (as above), dot = <g, x> and, for inf, ties = #{j : |x_j| = max|x|}."""
    if NORM == 2:
        return tl.zeros_like(g)
    elif NORM == 0:
        # per group: dot / den^2 and 1 / c (sign(x) / c = sign(x) * (1 / c) exactly)
        den = r + eps
        coef = _div(dot, den * den)
        tie_share = _div(tl.full(ties.shape, 1.0, ties.dtype), ties)
        through_max = tl.where(tl.abs(x) == r, _sign(x) * tie_share, 0.0)
        return _div_by(g, den) - coef * through_max
    else:
        n = _sqrt(r)
        den = n + eps
        second = tl.where(n > 0, _div_by(x * dot, n * den * den), 0.0)
        return _div_by(g, den) - second


# ---- normalize -------------------------------------------------------------------------------
# y = x / (m + eps) (inf), x / (||x||_2 + eps) (l2), sign(x) (l1) per group; the gradient is
# normalize_bwd's (below).


@triton.jit
def normalize_rows_kernel(
    x_ptr,
    y_ptr,
    G,
    L,
    eps: tl.float64,
    NORM: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ROWS whole groups per program, held in registers: one read, one write.
    _, offs, inb = _row_tile(G, L, ROWS, BLOCK)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(ACC)
    r = tl.zeros([ROWS, 1], ACC)
    if NORM == 0:
        r = _nan_max(tl.abs(x), 1)[:, None]
    elif NORM == 1:
        r = tl.sum(x * x, axis=1)[:, None]
    y = _normalize_output(x, r, _as_acc(eps, ACC), NORM)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inb)


@triton.jit
def normalize_chunk_kernel(
    x_ptr,
    y_ptr,
    ws_ptr,
    L,
    C,
    eps: tl.float64,
    PHASE: tl.constexpr,
    NORM: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    # Program (group, chunk) = divmod(pid, C). PHASE 1: the chunk's partial max|x| / sum x^2
    # -> ws[pid]. PHASE 2: reduce the group's partials, write y over the chunk.
    pid = tl.program_id(0).to(tl.int64)
    grp, start, end, base = _chunk_of(pid, C, L, CHUNK)
    r = tl.zeros([], ACC)
    if PHASE == 2 and NORM != 2:
        r = _group_partials(ws_ptr + grp * C, C, NORM == 0, PBLOCK)
    part = tl.zeros([], ACC)
    for j0 in range(start, end, TILE):
        j = j0 + tl.arange(0, TILE)
        inb = j < end
        x = tl.load(x_ptr + base + j, mask=inb, other=0.0).to(ACC)
        if PHASE == 1:
            if NORM == 0:
                part = _nan_max2(part, _nan_max(tl.abs(x), 0))
            else:
                part += tl.sum(x * x, axis=0)
        else:
            y = _normalize_output(x, r, _as_acc(eps, ACC), NORM)
            tl.store(y_ptr + base + j, y.to(y_ptr.dtype.element_ty), mask=inb)
    if PHASE == 1:
        tl.store(ws_ptr + pid, part)


# ---- normalize backward ----------------------------------------------------------------------
# Group statistics: inf: m = max|x| (NaN-propagating) and c = #{j : |x_j| = m}; l2: r = sum x^2;
# both: dot = <g, x>. Then dx = normalize_grad(g, x, ...) elementwise (module docstring).
# Split path partials per chunk: (chunk max m_k, its tie count c_k, dot_k) or (r_k, -, dot_k);
# the group's m = max_k m_k, c = sum of c_k over the chunks with m_k = m (exact: no second pass).


@triton.jit
def normalize_bwd_rows_kernel(
    gy_ptr,
    x_ptr,
    dx_ptr,
    G,
    L,
    eps: tl.float64,
    NORM: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, offs, inb = _row_tile(G, L, ROWS, BLOCK)
    g = tl.load(gy_ptr + offs, mask=inb, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=inb, other=0.0).to(ACC)
    dot = tl.sum(g * x, axis=1)[:, None]
    ties = tl.zeros([ROWS, 1], ACC)
    if NORM == 0:
        ax = tl.abs(x)
        r = _nan_max(ax, 1)[:, None]
        ties = tl.sum(tl.where(inb & (ax == r), 1.0, 0.0).to(ACC), axis=1)[:, None]
    else:
        r = tl.sum(x * x, axis=1)[:, None]
    dx = _normalize_grad(g, x, r, dot, ties, _as_acc(eps, ACC), NORM)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inb)


@triton.jit
def normalize_bwd_chunk_kernel(
    gy_ptr,
    x_ptr,
    dx_ptr,
    ws_ptr,
    L,
    C,
    NP,
    eps: tl.float64,
    PHASE: tl.constexpr,
    NORM: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    # Program (group, chunk) = divmod(pid, C); ws: [3, NP = G*C]. PHASE 1: the chunk's partials
    # (m_k or r_k, c_k, dot_k) -> ws[:, pid]. PHASE 2: combine the group's, write dx.
    pid = tl.program_id(0).to(tl.int64)
    grp, start, end, base = _chunk_of(pid, C, L, CHUNK)
    r = tl.zeros([], ACC)
    ties = tl.zeros([], ACC)
    dot = tl.zeros([], ACC)
    if PHASE == 2:
        i = tl.arange(0, PBLOCK)
        valid = i < C
        p0 = tl.load(ws_ptr + grp * C + i, mask=valid, other=0.0)
        dot = tl.sum(tl.load(ws_ptr + 2 * NP + grp * C + i, mask=valid, other=0.0), axis=0)
        if NORM == 0:
            r = _nan_max(p0, 0)
            p1 = tl.load(ws_ptr + NP + grp * C + i, mask=valid, other=0.0)
            ties = tl.sum(tl.where(valid & (p0 == r), p1, 0.0), axis=0)
        else:
            r = tl.sum(p0, axis=0)
    for j0 in range(start, end, TILE):
        j = j0 + tl.arange(0, TILE)
        inb = j < end
        x = tl.load(x_ptr + base + j, mask=inb, other=0.0).to(ACC)
        g = tl.load(gy_ptr + base + j, mask=inb, other=0.0).to(ACC)
        if PHASE == 1:
            dot += tl.sum(g * x, axis=0)
            if NORM == 0:
                ax = tl.abs(x)
                tile_max = _nan_max(ax, 0)
                tile_ties = tl.sum(tl.where(inb & (ax == tile_max), 1.0, 0.0).to(ACC), axis=0)
                new_max = _nan_max2(r, tile_max)
                ties = tl.where(r == new_max, ties, 0.0) + tl.where(
                    tile_max == new_max, tile_ties, 0.0
                )
                r = new_max
            else:
                r += tl.sum(x * x, axis=0)
        else:
            dx = _normalize_grad(g, x, r, dot, ties, _as_acc(eps, ACC), NORM)
            tl.store(dx_ptr + base + j, dx.to(dx_ptr.dtype.element_ty), mask=inb)
    if PHASE == 1:
        tl.store(ws_ptr + pid, r)
        tl.store(ws_ptr + NP + pid, ties)
        tl.store(ws_ptr + 2 * NP + pid, dot)


# ---- perturb_step ----------------------------------------------------------------------------
# d' = clamp / project(d + step * normalize(g)) (paper) or normalize(d + step * g)
# (normalize_sum); stage 1 = the normalize reduction (absent for l1), stage 2 = the l2 / l1
# projection's norm (paper rule, finite radius). Masked tokens: d = g = 0 everywhere, output 0.
# Not differentiated.


@triton.jit
def perturb_step_rows_kernel(
    noise_ptr,
    grad_ptr,
    mask_ptr,
    out_ptr,
    G,
    L,
    H,
    step_size: tl.float64,
    radius: tl.float64,
    eps: tl.float64,
    NORM: tl.constexpr,
    RULE: tl.constexpr,
    STAGE2: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TOKEN: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ROWS whole groups per program in registers: one read of d and g, both stage reductions
    # in registers, one write.
    rows, offs, inb = _row_tile(G, L, ROWS, BLOCK)
    live = inb
    if HAS_MASK:
        live = _kept(mask_ptr, rows[:, None], rows[:, None] < G, offs, inb, H, TOKEN)
    step = _as_acc(step_size, ACC)
    rad = _as_acc(radius, ACC)
    d = tl.load(noise_ptr + offs, mask=live, other=0.0).to(ACC)
    g = tl.load(grad_ptr + offs, mask=live, other=0.0).to(ACC)
    scale1 = tl.full([ROWS, 1], 1.0, ACC)
    if NORM != 2:
        r1 = _reduce(_stage1_term(d, g, step, NORM, RULE), 1, NORM == 0)
        scale1 = _stage1_scale(r1, _as_acc(eps, ACC), NORM)[:, None]
    factor2 = tl.full([ROWS, 1], 1.0, ACC)
    if STAGE2:
        r2 = tl.sum(_stage2_term(d, g, scale1, step, NORM), axis=1)
        factor2 = _stage2_factor(r2, rad, NORM)[:, None]
    out = _step_output(d, g, scale1, factor2, step, rad, NORM, RULE)
    out = tl.where(live, out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def perturb_step_chunk_kernel(
    noise_ptr,
    grad_ptr,
    mask_ptr,
    out_ptr,
    ws1_ptr,
    ws2_ptr,
    L,
    H,
    C,
    step_size: tl.float64,
    radius: tl.float64,
    eps: tl.float64,
    PHASE: tl.constexpr,
    NORM: tl.constexpr,
    RULE: tl.constexpr,
    STAGE2: tl.constexpr,
    HAS_MASK: tl.constexpr,
    TOKEN: tl.constexpr,
    ACC: tl.constexpr,
    CHUNK: tl.constexpr,
    TILE: tl.constexpr,
    PBLOCK: tl.constexpr,
):
    # Program (group, chunk) = divmod(pid, C). PHASE 1: stage-1 partial -> ws1[pid].
    # PHASE 2: reduce ws1 of the group -> scale1; stage-2 partial -> ws2[pid].
    # PHASE 3: reduce ws1 (and ws2) of the group; write the chunk's new noise.
    pid = tl.program_id(0).to(tl.int64)
    grp, start, end, base = _chunk_of(pid, C, L, CHUNK)
    step = _as_acc(step_size, ACC)
    rad = _as_acc(radius, ACC)
    scale1 = tl.full([], 1.0, ACC)
    if PHASE >= 2 and NORM != 2:
        r1 = _group_partials(ws1_ptr + grp * C, C, NORM == 0, PBLOCK)
        scale1 = _stage1_scale(r1, _as_acc(eps, ACC), NORM)
    factor2 = tl.full([], 1.0, ACC)
    if PHASE == 3 and STAGE2:
        factor2 = _stage2_factor(_group_partials(ws2_ptr + grp * C, C, False, PBLOCK), rad, NORM)
    part = tl.zeros([], ACC)
    for j0 in range(start, end, TILE):
        j = j0 + tl.arange(0, TILE)
        inb = j < end
        live = inb
        if HAS_MASK:
            live = _kept(mask_ptr, grp, True, base + j, inb, H, TOKEN)
        g = tl.load(grad_ptr + base + j, mask=live, other=0.0).to(ACC)
        if PHASE == 1 and RULE == 0:  # the paper rule's stage 1 reads only g
            d = tl.zeros_like(g)
        else:
            d = tl.load(noise_ptr + base + j, mask=live, other=0.0).to(ACC)
        if PHASE == 1:
            t = _stage1_term(d, g, step, NORM, RULE)
            if NORM == 0:
                part = _nan_max2(part, _nan_max(t, 0))
            else:
                part += tl.sum(t, axis=0)
        elif PHASE == 2:
            part += tl.sum(_stage2_term(d, g, scale1, step, NORM), axis=0)
        else:
            out = _step_output(d, g, scale1, factor2, step, rad, NORM, RULE)
            out = tl.where(live, out, 0.0)
            tl.store(out_ptr + base + j, out.to(out_ptr.dtype.element_ty), mask=inb)
    if PHASE == 1:
        tl.store(ws1_ptr + pid, part)
    if PHASE == 2:
        tl.store(ws2_ptr + pid, part)


# ---- init_noise ------------------------------------------------------------------------------
# out_i = std * z_i, z_i = output (i % 4) of Box-Muller on Philox4x32-10(seed, (i / 4, 0)),
# 0 where the token is masked. Each program draws BLOCK / 4 Philox counters and interleaves the
# four normals of each into 4 consecutive elements. No gradient.


@triton.jit
def _uniform_open01(bits):
    """A uniform in (0, 1) from 24 random bits, centred in their cell (never 0)."""
    return ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _box_muller(b0, b1, PRECISE: tl.constexpr):
    u1 = _uniform_open01(b0)
    u2 = _uniform_open01(b1)
    theta = 6.283185307179586 * u2
    if PRECISE:
        radius = _sqrt(-2.0 * libdevice.log(u1))
        return radius * libdevice.cos(theta), radius * libdevice.sin(theta)
    else:
        radius = _sqrt(-2.0 * tl.log(u1))
        return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def init_noise_kernel(
    out_ptr,
    mask_ptr,
    seed_ptr,
    N,
    H,
    std: tl.float64,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
    PRECISE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    seed = tl.load(seed_ptr).to(tl.int64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    counter = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = philox_impl(c0, c1, zero, zero, k0, k1, 10)
    z0, z1 = _box_muller(r0, r1, PRECISE)
    z2, z3 = _box_muller(r2, r3, PRECISE)
    # [z0_0, z1_0, z2_0, z3_0, z0_1, ...]: element 4 q + k is z_k of counter q
    z = tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    val = z.to(ACC) * _as_acc(std, ACC)
    if HAS_MASK:
        keep = tl.load(mask_ptr + offs // H, mask=inb, other=0) != 0
        val = tl.where(keep, val, 0.0)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=inb)


# ---- launchers -------------------------------------------------------------------------------


def _on_device(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device otherwise)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _groups(x: torch.Tensor, scope: int) -> tuple[int, int, int]:
    """(G, L, H): number of groups, group length (H or T*H), token length H."""
    h = x.shape[-1]
    length = h if scope == 0 else x.shape[-2] * h
    return x.numel() // length, length, h


def _num_warps(elements: int) -> int:
    """Warps for a program of this many elements (~8-16 per thread, 1 to 16 warps)."""
    return min(16, max(1, triton.next_power_of_2(elements) // 512))


def _single_max(acc: torch.dtype) -> int:
    return SINGLE_MAX_BLOCK if acc != torch.float64 else max(1, SINGLE_MAX_BLOCK // 2)


def _rows_config(groups: int, length: int, acc: torch.dtype) -> tuple[int, int, int] | None:
    """(ROWS, BLOCK, num_warps) of the rows path, or None when a group is too large for it."""
    block = triton.next_power_of_2(length)
    if block > _single_max(acc):
        return None
    rows = max(1, min(ROWS_TILE // block, triton.next_power_of_2(groups)))
    return rows, block, _num_warps(rows * block)


def _split_config(length: int) -> tuple[int, int, int, int]:
    """(CHUNK, C, PBLOCK, TILE) of the split path: C <= SPLIT_MAX_CHUNKS chunks per group."""
    tile = SPLIT_TILE
    chunk = max(tile, triton.next_power_of_2(triton.cdiv(length, SPLIT_MAX_CHUNKS)))
    c = triton.cdiv(length, chunk)
    return chunk, c, triton.next_power_of_2(c), tile


def normalize(x: torch.Tensor, norm: int, scope: int, eps: float) -> torch.Tensor:
    """x: [..., T, H] (contiguous). Returns y, x's shape and dtype: per group x / (max|x| + eps)
    (norm 0), x / (||x||_2 + eps) (norm 1) or sign(x) (norm 2)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    acc = acc_dtype(x.dtype)
    G, L, _ = _groups(x, scope)
    cfg = _rows_config(G, L, acc)
    with _on_device(x):
        if cfg is not None:
            rows, block, num_warps = cfg
            normalize_rows_kernel[(triton.cdiv(G, rows),)](
                x, y, G, L, eps, NORM=norm, ACC=_TL_ACC[acc], ROWS=rows, BLOCK=block,
                num_warps=num_warps,
            )  # fmt: skip
            return y
        chunk, c, pblock, tile = _split_config(L)
        ws = x.new_empty((G * c,), dtype=acc)
        for phase in (1, 2) if norm != 2 else (2,):
            normalize_chunk_kernel[(G * c,)](
                x, y, ws, L, c, eps, PHASE=phase, NORM=norm, ACC=_TL_ACC[acc], CHUNK=chunk,
                TILE=tile, PBLOCK=pblock, num_warps=_num_warps(tile),
            )  # fmt: skip
    return y


def normalize_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, norm: int, scope: int, eps: float
) -> torch.Tensor:
    """grad_y, x: [..., T, H] (same shape). Returns dx (x's shape and dtype); zeros for l1."""
    x = x.contiguous()
    grad_y = grad_y.contiguous()
    if norm == 2 or x.numel() == 0:
        return torch.zeros_like(x)
    dx = torch.empty_like(x)
    acc = acc_dtype(x.dtype)
    G, L, _ = _groups(x, scope)
    cfg = _rows_config(G, L, acc)
    with _on_device(x):
        if cfg is not None:
            rows, block, num_warps = cfg
            normalize_bwd_rows_kernel[(triton.cdiv(G, rows),)](
                grad_y, x, dx, G, L, eps, NORM=norm, ACC=_TL_ACC[acc], ROWS=rows, BLOCK=block,
                num_warps=num_warps,
            )  # fmt: skip
            return dx
        chunk, c, pblock, tile = _split_config(L)
        ws = x.new_empty((3, G * c), dtype=acc)
        for phase in (1, 2):
            normalize_bwd_chunk_kernel[(G * c,)](
                grad_y, x, dx, ws, L, c, G * c, eps, PHASE=phase, NORM=norm, ACC=_TL_ACC[acc],
                CHUNK=chunk, TILE=tile, PBLOCK=pblock, num_warps=_num_warps(tile),
            )  # fmt: skip
    return dx


def perturb_step(
    noise: torch.Tensor,
    grad: torch.Tensor,
    mask: torch.Tensor | None,
    step_size: float,
    radius: float,
    norm: int,
    scope: int,
    rule: int,
    eps: float,
) -> torch.Tensor:
    """noise, grad: [..., T, H] (same shape and dtype); mask: bool [..., T] or None.
    Returns the new noise (noise's shape and dtype); radius = inf: no projection."""
    noise = noise.contiguous()
    grad = grad.contiguous()
    out = torch.empty_like(noise)
    if noise.numel() == 0:
        return out
    acc = acc_dtype(noise.dtype)
    G, L, H = _groups(noise, scope)
    has_mask = mask is not None
    mask_arg = mask.contiguous() if has_mask else out  # a dummy pointer when HAS_MASK is False
    stage2 = rule == 0 and norm != 0 and radius < float("inf")
    token = scope == 0
    with _on_device(noise):
        cfg = _rows_config(G, L, acc)
        if cfg is not None:
            rows, block, num_warps = cfg
            perturb_step_rows_kernel[(triton.cdiv(G, rows),)](
                noise, grad, mask_arg, out, G, L, H, step_size, radius, eps,
                NORM=norm, RULE=rule, STAGE2=stage2, HAS_MASK=has_mask, TOKEN=token,
                ACC=_TL_ACC[acc], ROWS=rows, BLOCK=block, num_warps=num_warps,
            )  # fmt: skip
            return out
        chunk, c, pblock, tile = _split_config(L)
        ws1 = noise.new_empty((G * c,), dtype=acc)
        ws2 = noise.new_empty((G * c,), dtype=acc) if stage2 else ws1
        phases = ((1,) if norm != 2 else ()) + ((2,) if stage2 else ()) + (3,)
        for phase in phases:
            perturb_step_chunk_kernel[(G * c,)](
                noise, grad, mask_arg, out, ws1, ws2, L, H, c, step_size, radius, eps,
                PHASE=phase, NORM=norm, RULE=rule, STAGE2=stage2, HAS_MASK=has_mask,
                TOKEN=token, ACC=_TL_ACC[acc], CHUNK=chunk, TILE=tile, PBLOCK=pblock,
                num_warps=_num_warps(tile),
            )  # fmt: skip
    return out


def init_noise(
    like: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor, std: float
) -> torch.Tensor:
    """N(0, std^2) shaped like ``like`` ([..., T, H]; its dtype and device), 0 where mask
    (bool [..., T]) is False. seed: 0-d int64 on like's device, read in the kernel."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    n = out.numel()
    if n == 0:
        return out
    acc = acc_dtype(like.dtype)
    has_mask = mask is not None
    with _on_device(like):
        init_noise_kernel[(triton.cdiv(n, NOISE_BLOCK),)](
            out, mask.contiguous() if has_mask else out, seed, n, like.shape[-1], std,
            HAS_MASK=has_mask, ACC=_TL_ACC[acc], BLOCK=NOISE_BLOCK,
            PRECISE=_HAS_LIBDEVICE and like.is_cuda, num_warps=_num_warps(NOISE_BLOCK),
        )  # fmt: skip
    return out
