"""Fused Triton kernel of one ADELLO step: `adello::flexda_fwd_triton` (SPEC.md sections 1-3).

The schema, fake and autograd live in adello_kernels/ops/flexda.py; this file holds the kernels,
their launcher and the registration (CUDA key always; CPU key too when TRITON_INTERPRET=1 was set
before this module was imported, so that CPU tensors run under Triton's interpreter).

Two launches per step, no host sync, no data-dependent shapes (CUDA-graph capturable):

  1. `_flexda_fwd_kernel`, a persistent grid of P = min(tiles, 4 x SMs) programs. Rows are cut
     into tiles of ROWS rows: labeled tiles 0..TL-1, then unlabeled tiles TL..TL+TU-1 (an unlabeled
     tile holds the weak AND the strong rows of the same samples). Program p takes tiles p, p+P,
     p+2P, ... For each tile it writes the gradient rows (and the mask and pseudo-labels of
     unlabeled rows) and adds the tile's losses and the column sums of softmax(z_w) to its own
     partials, kept in registers and stored once at the end:
         loss_part  [P, 3]  (sum_b CE_s, sum_i M CE_u, sum_i (1-M) H)          acc dtype
         prior_part [P, C]  sum of softmax(z_w) over the program's weak rows  acc dtype
  2. `_flexda_finalize_kernel` sums the partials over P in a fixed order and writes loss, terms
     and prior_batch. Partials instead of float atomics: results are bitwise reproducible run to
     run (same shapes, same GPU). A small kernel instead of torch.sum(0): two launches per step
     instead of about six (the sum plus the scalar epilogue), and [256 x 16] tiles read all P
     rows in one or two round trips. The persistent grid keeps P (hence the partials) small:
     2 MB at the bandwidth shape, against 0.66 GB (bf16) to 1.3 GB (fp32) of compulsory traffic.

Two regimes, chosen on the host from C (`kernel_config`):
  * C <= MAX_FUSED_BLOCK_C: a tile is [ROWS, next_pow2(C)] in registers, small rows packed several
    per tile; each input read once, each gradient written once. The loads of a program's next tile
    are issued before the math on the current one (software prefetch), to keep memory busy while
    the fp32 math holds the registers.
  * larger C: [ROWS, LOOP_BLOCK_C] column blocks in a loop. Pass 1: online max / sum-exp / argmax
    of every row; pass 2 re-reads the row (from L2, mostly) and writes the gradients; the
    program's prior partial row is accumulated in global memory.

Numerics: fp32 accumulation (fp64 for fp64 logits, which the op schema allows: supported, as a
correctness path with one configuration); bf16/fp16 are upcast before any arithmetic (Triton's
interpreter computes bf16 arithmetic wrongly, and tl.exp refuses bf16). Row offsets are int64.
The hyperparameters (lambda_u, lambda_d, gate, T) are read from the device tensor inside the
kernel, so the gate and the T == 1 fast path are runtime branches. The threshold travels as the
bits of a float64 (a Python float argument would be passed as fp32) and is rounded to the acc dtype
in the kernel, as the contract says.

Launches are plain `kernel[grid](...)` calls. torch.library.wrap_triton only matters where
torch.compile traces the launcher (a triton_op); here register_fake makes the op a leaf of the
graph, so the launcher runs as is, on a GPU as under the interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import struct
from typing import NamedTuple

import torch

import triton  # an ImportError here makes backends._load_triton report triton as unavailable
import triton.language as tl

from . import flexda as _flexda  # noqa: F401  defines adello::flexda_fwd_triton (schema, fake)

# Whether triton.jit below builds interpreted kernels: decided by the environment when this module
# (and so the decorators) first runs, not when a kernel is called.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _reciprocal(n, ACC: tl.constexpr):
    """1 / n in the acc dtype. n is a row count, which Triton's JIT turns into a constexpr when it
    equals 1 (so no n.to(...)): the division promotes it to ACC either way."""
    return tl.full([], 1.0, ACC) / n


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, C):
    """Rows `rows` (< n_rows) of a row-major [n_rows, C] tensor as a [ROWS, BLOCK_C] tile in the
    tensor's own dtype (the caller upcasts before any arithmetic). Padding reads nothing."""
    m2 = (rows < n_rows)[:, None] & (cols < C)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m2, other=0.0)


@triton.jit
def _load_block(ptr, offs, m2, cmask, ACC: tl.constexpr):
    """One column block of the looped kernels, [ROWS, BLOCK_C] at offsets `offs` (valid where m2),
    upcast to ACC; padding columns are -inf (exp -> 0)."""
    x = tl.load(ptr + offs, mask=m2, other=0.0).to(ACC)
    return tl.where(cmask[None, :], x, float("-inf"))


@triton.jit
def _load_block_adjusted(ptr, adj_ptr, offs, m2, cols, cmask, ACC: tl.constexpr):
    """`_load_block` plus the logit adjustment adj[cols] (ds or du) on every row."""
    x = tl.load(ptr + offs, mask=m2, other=0.0).to(ACC)
    d = tl.load(adj_ptr + cols, mask=cmask, other=0.0)
    return tl.where(cmask[None, :], x + d[None, :], float("-inf"))


@triton.jit
def _sup_tile(x_raw, y, glb_ptr, ds, rows, cols, B, C, ACC: tl.constexpr):
    """Labeled rows `rows`, loaded as x_raw / y (whole rows in registers). Returns the per-row CE
    (0 on padding rows).

    x = z_l + ds;  CE = lse(x) - x[y] = log(sum_c exp(x_c - m)) + (m - x[y]),  m = max x
    (the difference m - x[y] is taken first, so logits ~1e4 do not cancel in fp32);
    dL_s/dx = (softmax(x) - onehot(y)) / B.
    """
    rmask = rows < B
    cmask = cols < C
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    x = x_raw.to(ACC)                                                # upcast before any arithmetic
    x = tl.where(cmask[None, :], x + ds[None, :], float("-inf"))     # padding columns: exp -> 0
    m = tl.max(x, 1)
    e = tl.exp(x - m[:, None])
    s = tl.sum(e, 1)
    onehot = cols[None, :] == y[:, None]
    x_y = tl.sum(tl.where(onehot, x, 0.0), 1)
    ce = tl.where(rmask, tl.log(s) + (m - x_y), 0.0)
    inv_b = _reciprocal(B, ACC)
    g = (e * (1.0 / s)[:, None] - onehot.to(ACC)) * inv_b
    tl.store(glb_ptr + offs, g.to(glb_ptr.dtype.element_ty), mask=m2)
    return ce


@triton.jit
def _unsup_tile(w_raw, s_raw, gs_ptr, mask_ptr, plab_ptr, du, rows, cols, N, C, thr,
                lam_u, lam_d, gate_on, t, ACC: tl.constexpr):
    """Unlabeled rows `rows`, loaded as w_raw (weak) and s_raw (strong): the weak and strong row of
    each sample together, whole rows in registers.

    Returns (sum over the rows of softmax(z_w) [BLOCK_C], M * CE_u [ROWS], (1-M) * H [ROWS]).

    Weak view (raw logits):  pw = e_w / s_w, e_w = exp(z_w - m_w);  max_c pw = exp(0) / s_w = 1/s_w,
      M = [1/s_w >= tau] (inclusive, in the acc dtype);  yhat = first index of max z_w (softmax is
      monotonic, so it is also the first argmax of pw).
    Strong view:  a = z_s + du;  CE_u = log(s_a) + (m_a - a[yhat]).
    Distillation (only when gate != 0; with gate == 0 it is skipped, never multiplied by 0):
      q = softmax(z_w / T), p_T = softmax(a / T); with m'_a = m_a / T (T > 0 keeps the argmax),
      H(q, p_T) = -sum_c q_c (a_c/T - m'_a - log s'_a) = log s'_a + (1/T) sum_c q_c (m_a - a_c)
      (sum q = 1; per-element differences m_a - a_c avoid cancellation at large logits).
    Gradient:  dL/dz_s = (lambda_u M (softmax(a) - onehot(yhat))
                          + lambda_d (1-M) (p_T - q) / T) / N.
    T == 1 (the released default) is a runtime branch reusing pw and softmax(a): no extra exps.
    """
    rmask = rows < N
    cmask = cols < C
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]

    w = tl.where(cmask[None, :], w_raw.to(ACC), float("-inf"))
    m_w, yhat = tl.max(w, 1, return_indices=True, return_indices_tie_break_left=True)
    e_w = tl.exp(w - m_w[:, None])
    inv_sw = 1.0 / tl.sum(e_w, 1)
    msk = tl.where(rmask & (inv_sw >= thr), 1.0, 0.0).to(ACC)
    pw = e_w * inv_sw[:, None]
    prior = tl.sum(tl.where(rmask[:, None], pw, 0.0), 0)

    a = tl.where(cmask[None, :], s_raw.to(ACC) + du[None, :], float("-inf"))
    m_a = tl.max(a, 1)
    e_a = tl.exp(a - m_a[:, None])
    s_a = tl.sum(e_a, 1)
    pa = e_a * (1.0 / s_a)[:, None]
    onehot = cols[None, :] == yhat[:, None]
    a_y = tl.sum(tl.where(onehot, a, 0.0), 1)
    lu = tl.where(rmask, msk * (tl.log(s_a) + (m_a - a_y)), 0.0)
    g = lam_u * msk[:, None] * (pa - onehot.to(ACC))

    ld = tl.zeros_like(lu)
    if gate_on:
        # q * (m_a - a) on padding columns would be 0 * inf: masked out of the sums.
        if t == 1.0:
            h = tl.log(s_a) + tl.sum(tl.where(cmask[None, :], pw * (m_a[:, None] - a), 0.0), 1)
            g = g + lam_d * (1.0 - msk)[:, None] * (pa - pw)
        else:
            # Ordered so that w, then a, die early (this branch sets the kernel's register peak).
            inv_t = 1.0 / t
            q = tl.exp((w - m_w[:, None]) * inv_t)
            q = q * (1.0 / tl.sum(q, 1))[:, None]
            dot = tl.sum(tl.where(cmask[None, :], q * (m_a[:, None] - a), 0.0), 1)
            p_t = tl.exp((a - m_a[:, None]) * inv_t)
            s_t = tl.sum(p_t, 1)
            h = tl.log(s_t) + inv_t * dot
            g = g + (lam_d * inv_t) * (1.0 - msk)[:, None] * (p_t * (1.0 / s_t)[:, None] - q)
        ld = tl.where(rmask, (1.0 - msk) * h, 0.0)

    inv_n = _reciprocal(N, ACC)
    tl.store(gs_ptr + offs, (g * inv_n).to(gs_ptr.dtype.element_ty), mask=m2)
    tl.store(mask_ptr + rows, msk, mask=rmask)
    tl.store(plab_ptr + rows, yhat.to(tl.int64), mask=rmask)
    return prior, lu, ld


@triton.jit
def _sup_tile_looped(zl_ptr, y_ptr, glb_ptr, ds_ptr, rows, cols0, B, C, ROWS: tl.constexpr,
                     BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Labeled rows for large C, column blocks of BLOCK_C. Same math as `_sup_tile`.

    Pass 1, online softmax (Milakov & Gimelshein 2018): with running max m and sum s of
    exp(x - m), a block with max m_b gives m' = max(m, m_b), s' = s exp(m - m') + sum exp(x - m').
    m' = -inf (every logit so far -inf) would make exp(-inf - -inf) = NaN: subtract 0 instead.
    x[y] is picked up on the way. Pass 2 writes (exp(x - m) / s - onehot(y)) / B.
    """
    rmask = rows < B
    row_off = rows.to(tl.int64) * C
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS], ACC)
    x_y = tl.zeros([ROWS], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        offs = row_off[:, None] + cols[None, :]
        x = _load_block_adjusted(zl_ptr, ds_ptr, offs, rmask[:, None] & cmask[None, :], cols,
                                 cmask, ACC)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub[:, None]), 1)
        x_y += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
        m = m_new
    ce = tl.where(rmask, tl.log(s) + (m - x_y), 0.0)

    inv_s = 1.0 / s
    inv_b = _reciprocal(B, ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        offs = row_off[:, None] + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        x = _load_block_adjusted(zl_ptr, ds_ptr, offs, m2, cols, cmask, ACC)
        onehot = (cols[None, :] == y[:, None]).to(ACC)
        g = (tl.exp(x - m[:, None]) * inv_s[:, None] - onehot) * inv_b
        tl.store(glb_ptr + offs, g.to(glb_ptr.dtype.element_ty), mask=m2)
    return ce


@triton.jit
def _unsup_tile_looped(zw_ptr, zs_ptr, gs_ptr, mask_ptr, plab_ptr, du_ptr, prior_row_ptr, rows,
                       cols0, N, C, thr, lam_u, lam_d, gate_on, t, ROWS: tl.constexpr,
                       BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Unlabeled rows for large C, column blocks of BLOCK_C. Same math as `_unsup_tile`.

    Pass 1 (online, see `_sup_tile_looped`): weak max m_w, sum s_w and first argmax (a block's
    argmax replaces the running one only when its max is strictly larger: first index on ties);
    strong max m_a and sum s_a; and, only when the distillation is on with T != 1, the sums of
    exp((z_w - m_w)/T) and exp((a - m_a)/T) (rescaled by exp((m - m')/T) as the max moves).
    Pass 2: pw, M, the prior partial row, a[yhat], sum_c q_c (m_a - a_c) and the gradient.
    The program's prior partial row lives in global memory (C is too large for registers): it is
    read-modified-written by this program only, after a barrier so that no thread of the program
    reads an element before the thread that wrote it last has finished.
    """
    rmask = rows < N
    row_off = rows.to(tl.int64) * C
    need_t = gate_on & (t != 1.0)
    inv_t = 1.0 / t
    m_w = tl.full([ROWS], float("-inf"), ACC)
    s_w = tl.zeros([ROWS], ACC)
    s_q = tl.zeros([ROWS], ACC)
    yhat = tl.zeros([ROWS], tl.int32)
    m_a = tl.full([ROWS], float("-inf"), ACC)
    s_a = tl.zeros([ROWS], ACC)
    s_t = tl.zeros([ROWS], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        offs = row_off[:, None] + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        w = _load_block(zw_ptr, offs, m2, cmask, ACC)
        a = _load_block_adjusted(zs_ptr, du_ptr, offs, m2, cols, cmask, ACC)

        b_max, b_idx = tl.max(w, 1, return_indices=True, return_indices_tie_break_left=True)
        yhat = tl.where(b_max > m_w, b_idx + c0, yhat)
        mw_new = tl.maximum(m_w, b_max)
        mw_sub = tl.where(mw_new == float("-inf"), 0.0, mw_new)
        ma_new = tl.maximum(m_a, tl.max(a, 1))
        ma_sub = tl.where(ma_new == float("-inf"), 0.0, ma_new)
        s_w = s_w * tl.exp(m_w - mw_sub) + tl.sum(tl.exp(w - mw_sub[:, None]), 1)
        s_a = s_a * tl.exp(m_a - ma_sub) + tl.sum(tl.exp(a - ma_sub[:, None]), 1)
        if need_t:
            s_q = s_q * tl.exp((m_w - mw_sub) * inv_t) + tl.sum(
                tl.exp((w - mw_sub[:, None]) * inv_t), 1)
            s_t = s_t * tl.exp((m_a - ma_sub) * inv_t) + tl.sum(
                tl.exp((a - ma_sub[:, None]) * inv_t), 1)
        m_w = mw_new
        m_a = ma_new

    inv_sw = 1.0 / s_w
    inv_sa = 1.0 / s_a
    inv_sq = 1.0 / s_q
    inv_st = 1.0 / s_t
    msk = tl.where(rmask & (inv_sw >= thr), 1.0, 0.0).to(ACC)
    inv_n = _reciprocal(N, ACC)
    a_y = tl.zeros([ROWS], ACC)
    dot = tl.zeros([ROWS], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        offs = row_off[:, None] + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        w = _load_block(zw_ptr, offs, m2, cmask, ACC)
        a = _load_block_adjusted(zs_ptr, du_ptr, offs, m2, cols, cmask, ACC)

        pw = tl.exp(w - m_w[:, None]) * inv_sw[:, None]
        tl.debug_barrier()
        part = tl.load(prior_row_ptr + cols, mask=cmask, other=0.0)
        tl.store(prior_row_ptr + cols, part + tl.sum(tl.where(rmask[:, None], pw, 0.0), 0),
                 mask=cmask)

        pa = tl.exp(a - m_a[:, None]) * inv_sa[:, None]
        onehot = cols[None, :] == yhat[:, None]
        a_y += tl.sum(tl.where(onehot, a, 0.0), 1)
        g = lam_u * msk[:, None] * (pa - onehot.to(ACC))
        if gate_on:
            if need_t:
                q = tl.exp((w - m_w[:, None]) * inv_t) * inv_sq[:, None]
                p_t = tl.exp((a - m_a[:, None]) * inv_t) * inv_st[:, None]
                g = g + (lam_d * inv_t) * (1.0 - msk)[:, None] * (p_t - q)
            else:
                q = pw
                g = g + lam_d * (1.0 - msk)[:, None] * (pa - pw)
            dot += tl.sum(tl.where(cmask[None, :], q * (m_a[:, None] - a), 0.0), 1)
        tl.store(gs_ptr + offs, (g * inv_n).to(gs_ptr.dtype.element_ty), mask=m2)

    lu = tl.where(rmask, msk * (tl.log(s_a) + (m_a - a_y)), 0.0)
    ld = tl.zeros_like(lu)
    if gate_on:
        if need_t:
            h = tl.log(s_t) + inv_t * dot
        else:
            h = tl.log(s_a) + dot
        ld = tl.where(rmask, (1.0 - msk) * h, 0.0)
    tl.store(mask_ptr + rows, msk, mask=rmask)
    tl.store(plab_ptr + rows, yhat.to(tl.int64), mask=rmask)
    return lu, ld


@triton.jit(do_not_specialize=["thr_bits"])
def _flexda_fwd_kernel(zl_ptr, y_ptr, zw_ptr, zs_ptr, ds_ptr, du_ptr, hp_ptr,
                       loss_part_ptr, prior_part_ptr, mask_ptr, plab_ptr, glb_ptr, gs_ptr,
                       B, N, row_bytes, thr_bits,
                       ROWS: tl.constexpr, BLOCK_C: tl.constexpr, LOOP_C: tl.constexpr):
    """One persistent program: labeled tiles pid, pid+P, ... then the unlabeled tiles that
    continue the same round robin (global tile index TL + u); finally the program's partials."""
    ACC: tl.constexpr = ds_ptr.dtype.element_ty     # fp32, or fp64 for fp64 logits
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # C arrives as the row size in bytes: Triton's JIT specialises an integer argument that is a
    # multiple of 16, and the division by the element size keeps that divisibility, so when rows
    # are 16-byte aligned the compiler knows it and loads/stores become 16-byte vectors.
    ELT: tl.constexpr = zl_ptr.dtype.element_ty.primitive_bitwidth // 8
    C = row_bytes // ELT
    thr = thr_bits.to(tl.float64, bitcast=True).to(ACC)   # (acc) threshold, rounded once
    lam_u = tl.load(hp_ptr + 0)
    lam_d = tl.load(hp_ptr + 1)
    gate_on = tl.load(hp_ptr + 2) != 0
    t = tl.load(hp_ptr + 3)

    n_lab = tl.cdiv(B, ROWS)
    n_unl = tl.cdiv(N, ROWS)
    # first u with (n_lab + u) % nprog == pid
    u_start = (pid - n_lab % nprog + nprog) % nprog
    r = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    ls_acc = tl.zeros([ROWS], ACC)
    lu_acc = tl.zeros([ROWS], ACC)
    ld_acc = tl.zeros([ROWS], ACC)
    prior_row_ptr = prior_part_ptr + pid.to(tl.int64) * C
    if LOOP_C:
        for c0 in range(0, C, BLOCK_C):
            tl.store(prior_row_ptr + c0 + cols, tl.zeros([BLOCK_C], ACC), mask=c0 + cols < C)
        tl.debug_barrier()
        for tile in range(pid, n_lab, nprog):
            ls_acc += _sup_tile_looped(zl_ptr, y_ptr, glb_ptr, ds_ptr, tile * ROWS + r, cols, B, C,
                                       ROWS, BLOCK_C, ACC)
        for tile in range(u_start, n_unl, nprog):
            lu, ld = _unsup_tile_looped(zw_ptr, zs_ptr, gs_ptr, mask_ptr, plab_ptr, du_ptr,
                                        prior_row_ptr, tile * ROWS + r, cols, N, C, thr, lam_u,
                                        lam_d, gate_on, t, ROWS, BLOCK_C, ACC)
            lu_acc += lu
            ld_acc += ld
    else:
        cmask = cols < C
        ds = tl.load(ds_ptr + cols, mask=cmask, other=0.0)
        du = tl.load(du_ptr + cols, mask=cmask, other=0.0)
        prior_acc = tl.zeros([BLOCK_C], ACC)
        # Software prefetch: the loads of the program's next tile are issued before the math on
        # the current one, so every program keeps memory requests in flight while it computes
        # (the fp32 math needs many registers, which limits the programs per SM). A tile past
        # the end is fully masked and reads nothing.
        rows = pid * ROWS + r
        x_raw = _load_tile(zl_ptr, rows, cols, B, C)
        y = tl.load(y_ptr + rows, mask=rows < B, other=0)
        for tile in range(pid, n_lab, nprog):
            rows = tile * ROWS + r
            nxt = rows + nprog * ROWS
            x_nxt = _load_tile(zl_ptr, nxt, cols, B, C)
            y_nxt = tl.load(y_ptr + nxt, mask=nxt < B, other=0)
            ls_acc += _sup_tile(x_raw, y, glb_ptr, ds, rows, cols, B, C, ACC)
            x_raw = x_nxt
            y = y_nxt
        rows = u_start * ROWS + r
        w_raw = _load_tile(zw_ptr, rows, cols, N, C)
        s_raw = _load_tile(zs_ptr, rows, cols, N, C)
        for tile in range(u_start, n_unl, nprog):
            rows = tile * ROWS + r
            nxt = rows + nprog * ROWS
            w_nxt = _load_tile(zw_ptr, nxt, cols, N, C)
            s_nxt = _load_tile(zs_ptr, nxt, cols, N, C)
            p, lu, ld = _unsup_tile(w_raw, s_raw, gs_ptr, mask_ptr, plab_ptr, du, rows, cols, N,
                                    C, thr, lam_u, lam_d, gate_on, t, ACC)
            w_raw = w_nxt
            s_raw = s_nxt
            prior_acc += p
            lu_acc += lu
            ld_acc += ld
        tl.store(prior_row_ptr + cols, prior_acc, mask=cmask)
    tl.store(loss_part_ptr + pid * 3 + 0, tl.sum(ls_acc, 0))
    tl.store(loss_part_ptr + pid * 3 + 1, tl.sum(lu_acc, 0))
    tl.store(loss_part_ptr + pid * 3 + 2, tl.sum(ld_acc, 0))


@triton.jit
def _flexda_finalize_kernel(loss_part_ptr, prior_part_ptr, hp_ptr, loss_ptr, terms_ptr,
                            prior_ptr, P, B, N, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Deterministic reduction of the partials: program j sums columns [j*BLOCK_C, ...) of
    prior_part over the P rows in a fixed order; program 0 also reduces loss_part and writes
        terms = (S_s / B, S_u / N, gate ? S_d / N : 0),  loss = terms0 + lambda_u terms1
                                                                + (gate ? lambda_d terms2 : 0).
    """
    ACC: tl.constexpr = prior_ptr.dtype.element_ty
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    p = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_C], ACC)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + p
        ptrs = prior_part_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
        acc += tl.load(ptrs, mask=(rows < P)[:, None] & cmask[None, :], other=0.0)
    tl.store(prior_ptr + cols, tl.sum(acc, 0) * _reciprocal(N, ACC), mask=cmask)

    if pid == 0:
        k = tl.arange(0, 4)
        lacc = tl.zeros([BLOCK_P, 4], ACC)
        for p0 in range(0, P, BLOCK_P):
            rows = p0 + p
            lmask = (rows < P)[:, None] & (k < 3)[None, :]
            lacc += tl.load(loss_part_ptr + rows[:, None] * 3 + k[None, :], mask=lmask, other=0.0)
        sums = tl.sum(lacc, 0)
        lam_u = tl.load(hp_ptr + 0)
        lam_d = tl.load(hp_ptr + 1)
        gate_on = tl.load(hp_ptr + 2) != 0
        l_s = tl.sum(tl.where(k == 0, sums, 0.0), 0) / B
        l_u = tl.sum(tl.where(k == 1, sums, 0.0), 0) / N
        l_d = tl.sum(tl.where(k == 2, sums, 0.0), 0) / N
        l_d = tl.where(gate_on, l_d, 0.0)
        loss = l_s + lam_u * l_u + tl.where(gate_on, lam_d * l_d, 0.0)
        tl.store(terms_ptr + k, tl.where(k == 0, l_s, tl.where(k == 1, l_u, l_d)), mask=k < 3)
        tl.store(loss_ptr, loss)


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

MAX_FUSED_BLOCK_C = 4096   # whole rows in registers up to this many (padded) classes
LOOP_BLOCK_C = 2048        # column block of the large-C regime
LOOP_ROWS = 2              # rows per tile in the large-C regime
TILE_ELEMS = 2048          # rows packed per tile until ROWS * BLOCK_C reaches this
MIN_BLOCK_C = 128          # smaller C is padded (few specialisations; small C is latency-bound)
MAX_REGISTERS = 128        # ptxas cap for 16-byte-aligned rows: 2 programs of 8 warps per SM
FP64_ROWS, FP64_BLOCK_C, FP64_WARPS = 2, 512, 4   # fp64: one configuration (see kernel_config)
PROGRAMS_PER_SM = 4        # persistent grid: at most this many programs per SM
INTERPRETER_PROGRAMS = 3   # grid cap under TRITON_INTERPRET=1 (exercises the round robin)
FIN_BLOCK_P = 256          # finalize tile: 256 partial rows x 16 columns
FIN_BLOCK_C = 16
FIN_NUM_WARPS = 4

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class KernelConfig(NamedTuple):
    rows: int               # ROWS: rows per tile
    block_c: int            # BLOCK_C: padded row (fused regime) or column block (loop regime)
    loop_c: bool            # LOOP_C: large-C column loop
    num_warps: int
    maxnreg: int | None     # ptxas register cap (None: ptxas decides)
    aligned: bool           # rows are 16-byte aligned (the JIT specialises row_bytes % 16 == 0)


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def kernel_config(num_classes: int, dtype: torch.dtype) -> KernelConfig:
    """The specialisation the launcher uses for C = num_classes and logits of `dtype`.

    Heuristics from C alone (multi-config autotune would not run in the interpreter):
    * rows packed until a tile holds TILE_ELEMS elements, about 8 elements per thread of each
      live tile (8 warps for 2048 elements, 16 for 4096);
    * 16-byte-aligned rows (C * element size % 16 == 0, e.g. C = 1000) load 16-byte vectors and
      fit in 128 registers without spilling, so the cap puts two 8-warp programs on an SM;
      unaligned rows (e.g. C = 127) need an address per element and are left uncapped
      (tests/test_triton_compile.py checks the no-spill premise on every capped kernel);
    * fp64 logits are a correctness path, not a fast one: one configuration for every C (the
      column loop), so that they add a single compiled kernel.
    """
    elsize = dtype.itemsize
    aligned = (num_classes * elsize) % 16 == 0
    if dtype == torch.float64:
        return KernelConfig(FP64_ROWS, FP64_BLOCK_C, True, FP64_WARPS, None, aligned)
    block = max(MIN_BLOCK_C, _next_pow2(num_classes))
    if block <= MAX_FUSED_BLOCK_C:
        rows, loop = max(1, TILE_ELEMS // block), False
    else:
        rows, block, loop = LOOP_ROWS, min(LOOP_BLOCK_C, MAX_FUSED_BLOCK_C), True
    warps = min(16, max(4, rows * block // 256))
    return KernelConfig(rows, block, loop, warps, MAX_REGISTERS if aligned else None, aligned)


def all_kernel_configs(dtype: torch.dtype) -> list[KernelConfig]:
    """Every configuration `kernel_config` can return for `dtype` (the AOT compile test's list):
    each power-of-two padded row and the column loop, with aligned and unaligned rows."""
    configs = {kernel_config(c, dtype) for k in range(17) for c in (1 << k, (1 << k) + 1)}
    return sorted(configs, key=lambda cfg: (cfg.loop_c, cfg.block_c, cfg.aligned))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _max_programs(device: torch.device) -> int:
    if INTERPRETED or device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_SM * _sm_count(index)


def _threshold_bits(threshold: float) -> int:
    """The float64 bit pattern of `threshold` as a signed int64 (the kernel bitcasts it back)."""
    return struct.unpack("<q", struct.pack("<d", float(threshold)))[0]


def flexda_fwd_triton(logits_lb: torch.Tensor, labels_lb: torch.Tensor,
                      logits_ulb_w: torch.Tensor, logits_ulb_s: torch.Tensor,
                      adj_lb: torch.Tensor, adj_ulb: torch.Tensor, hparams: torch.Tensor,
                      threshold: float):
    """Kernel of `adello::flexda_fwd_triton` (schema in adello_kernels/ops/flexda.py)."""
    dtype = logits_lb.dtype
    if dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_lb: expected float32, bfloat16, float16 or float64, got {dtype}")
    if logits_ulb_w.dtype != dtype or logits_ulb_s.dtype != dtype:
        raise ValueError("logits_ulb_w, logits_ulb_s: must have the dtype of logits_lb")
    if logits_lb.dim() != 2 or logits_ulb_w.dim() != 2 or logits_ulb_s.shape != logits_ulb_w.shape \
            or logits_ulb_w.shape[1] != logits_lb.shape[1]:
        raise ValueError("logits: expected logits_lb [B, C] and logits_ulb_w, logits_ulb_s [N, C]")
    b, c = logits_lb.shape
    n = logits_ulb_w.shape[0]
    if labels_lb.shape != (b,):
        raise ValueError(f"labels_lb: expected shape ({b},), got {tuple(labels_lb.shape)}")
    for name, v, size in (("adj_lb", adj_lb, c), ("adj_ulb", adj_ulb, c), ("hparams", hparams, 4)):
        if v.shape != (size,):
            raise ValueError(f"{name}: expected shape ({size},), got {tuple(v.shape)}")
    dev = logits_lb.device
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    z_l, z_w, z_s = logits_lb.contiguous(), logits_ulb_w.contiguous(), logits_ulb_s.contiguous()
    y = labels_lb.to(torch.int64).contiguous()
    ds, du = adj_lb.to(acc).contiguous(), adj_ulb.to(acc).contiguous()
    hp = hparams.to(acc).contiguous()

    cfg = kernel_config(c, dtype)
    tiles = triton.cdiv(b, cfg.rows) + triton.cdiv(n, cfg.rows)
    nprog = max(1, min(tiles, _max_programs(dev)))

    loss = torch.empty((), device=dev, dtype=acc)
    terms = torch.empty(3, device=dev, dtype=acc)
    mask = torch.empty(n, device=dev, dtype=acc)
    pseudo_labels = torch.empty(n, device=dev, dtype=torch.int64)
    prior_batch = torch.empty(c, device=dev, dtype=acc)
    grad_lb = torch.empty((b, c), device=dev, dtype=dtype)
    grad_ulb_s = torch.empty((n, c), device=dev, dtype=dtype)
    loss_part = torch.empty((nprog, 3), device=dev, dtype=acc)
    prior_part = torch.empty((nprog, c), device=dev, dtype=acc)

    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _flexda_fwd_kernel[(nprog,)](
            z_l, y, z_w, z_s, ds, du, hp, loss_part, prior_part, mask, pseudo_labels, grad_lb,
            grad_ulb_s, b, n, c * z_l.element_size(), _threshold_bits(threshold),
            ROWS=cfg.rows, BLOCK_C=cfg.block_c, LOOP_C=cfg.loop_c,
            num_warps=cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
        _flexda_finalize_kernel[(triton.cdiv(c, FIN_BLOCK_C),)](
            loss_part, prior_part, hp, loss, terms, prior_batch, nprog, b, n, c,
            BLOCK_P=FIN_BLOCK_P, BLOCK_C=FIN_BLOCK_C, num_warps=FIN_NUM_WARPS)
    return loss, terms, mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s


def is_usable() -> bool:
    """True when the kernel can run in this process: on CUDA tensors, or on CPU tensors when the
    kernels were built by Triton's interpreter (TRITON_INTERPRET=1 before this module's import)."""
    return INTERPRETED or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Registration (at import): the CUDA key always (every adello:: op needs a CUDA kernel), the CPU
# key too when the kernels are interpreted.
# ---------------------------------------------------------------------------------------------
torch.library.register_kernel("adello::flexda_fwd_triton", "cuda", flexda_fwd_triton)
if INTERPRETED:
    torch.library.register_kernel("adello::flexda_fwd_triton", "cpu", flexda_fwd_triton)
