"""Fused Triton kernels of one ADELLO step: `adello::flexda_fwd_triton` (ops/flexda.py) and the
whole training step `adello::flexda_step_triton` (ops/step.py), which share their row code.

The schemas and fakes live in ops/flexda.py and ops/step.py; this file holds the kernels, their
launchers, the step's autograd and the registrations (CUDA key always; CPU key too when
TRITON_INTERPRET=1 was set before this module was imported, so that CPU tensors run under Triton's
interpreter). The math: docs/method.md; the contract: docs/contract.md.

A training step (`flexda_step_triton`: forward, backward, prior update) is three launches, no host
sync, no data-dependent shape (CUDA-graph capturable), bitwise reproducible run to run:

  1. `_rows_kernel`, a persistent grid of P programs (P = what fits on the device, see
     `_programs_per_sm`). Each program first computes the step's prologue itself from the state
     tensors (alpha_t from `step`, the adjustments ds, du in float64 rounded once to the acc dtype,
     the gate [t >= t0], T), then takes row tiles of ROWS rows: labeled tiles 0..TL-1, then
     unlabeled tiles TL..TL+TU-1 (an unlabeled tile holds the weak AND the strong rows of the same
     samples); program p takes tiles p, p+P, p+2P, ... For each tile it writes the gradient rows
     (and the mask and pseudo-labels of unlabeled rows) and adds the tile's losses and the column
     sums of softmax(z_w) to its own partials, kept in registers and stored once at the end:
         loss_part  [P, 4]  (sum_b CE_s, sum_i M CE_u, sum_i (1-M) H, sum of the prior partial)
         prior_part [P, C]  sum over the program's weak rows of their batch-prior rows: softmax(z_w)
                            (raw), or softmax(z_w + du) with the EM estimator (see below)
     With prior weights w (the constexpr WEIGHTED; without them the kernels are the code they
     were): a weak row adds w_i times its prior row (w_i folded into the row's scale 1 / s_w
     or 1 / sum_c e_w r), nothing when !(w_i > 0) (tl.where, so a NaN row of weight 0 leaves no
     trace). The weight sum W is not a partial: the finalize kernel sums the N weights.
     With distill_all (the constexpr DISTILL_ALL; False is the code it was) every row distils
     once the gate is on: the third slot sums H over all rows, an M = 1 row has both terms
     and both gradients, from the exps the row already has (T = 1: softmax(a) and pw; T != 1:
     the pass at 1/T that the M = 0 rows take).
     Why every program recomputes the prologue: it is O(C) (one pow and three logs per class), a
     few microseconds of float64 work spread over all SMs, against O((B + N) C / P) row work per
     program; a separate prologue launch would cost more than that, and sharing one result
     between programs would need a grid-wide barrier. In the column-loop regime (C > 4096, where
     a row does not fit in registers) the program keeps only the normaliser sum_c Q^alpha and
     recomputes the adjustments of each column block where it reads it (`_adj_block`): a pow and
     two logs in float64 per column, per pass over a LOOP_ROWS-row tile. That is cheap next to
     the row traffic at C <= 4096 but not obviously so at C = 8192 and above, where a float64
     transcendental per element of a 2-row tile may make the loop regime compute-bound; the
     alternative (a [P, 2, C] scratch of adjustments per program) adds P C words of traffic.
  2. `_finalize_kernel` sums the partials over P in a fixed order and writes the loss, its three
     terms and prior_batch (sum / N, or with weights sum * (1 / W), W = the sum of the positive
     w_i, which every program forms from the N weights in one fixed order, all NaN when
     W == 0), then (when `update`) applies the epilogue: ok = all finite
     (prior_batch); Q <- m Q + (1 - m) prior_batch in Q's dtype (m and 1 - m rounded once), else
     skipped_updates += 1; step += 1 (weighted with W == 0: Q and skipped_updates kept, step
     += 1). Program j owns columns [16 j, 16 j + 16) of the prior, and
     program 0 the step and skip counters, so no two programs write the same word and no
     program reads a word another one writes. ok is the same decision in every program: the
     fourth loss slot sums each program's whole prior partial, which is finite exactly when all
     of prior_batch is (every term is a probability or NaN, raw or EM: no overflow, no inf - inf).
  3. The backward: `_scale_kernel` multiplies both saved gradients in place by the incoming
     grad, which it reads on the device; it returns at once when that grad is exactly 1 (the
     usual loss.backward()).
Partials instead of float atomics: the reduction order never depends on scheduling.

`adello::flexda_fwd_triton` is launches 1 and 2 without the prologue and the epilogue: ds, du
and the hyperparameters come in as tensors (hparams slots named in ops/flexda.py).

The batch prior (docs/method.md, Prior estimator). raw: the weak softmax pw = e_w / s_w,
e_w = exp(z_w - max z_w), s_w = sum_c e_w. EM (one Saerens et al. step per batch): the weak
posteriors moved from the prior the logits are pulled to (Qa) to the current estimate Q,
    pe = softmax(z_w + du),  du = log(Q + eps) - log(Qa + eps) (the strong view's adjustment),
which needs no exp pass of its own: exp(z_w + du - max z_w) = e_w r with r = exp(du), so
    pe_c = e_w,c r_c / sum_c e_w,c r_c.
The row code multiplies the weak exps it already has by r (r formed from du in registers, C exps
per tile shared by its rows); the column loop sums e_w r in pass 1 beside s_w (same exps, same
rescaling as the max moves) and forms pe from pass 2's exps. The max of z_w still bounds the
exponent (r <= (1 + eps) / eps), and sum_c e_w r >= r at the argmax > 0. A NaN/inf weak row
gives NaN e_w, hence a NaN pe in every column: the same NaN prior as raw. With flexda off
du = 0, r = 1 and e_w r = e_w exactly, so pe = pw bit for bit. The switch: hparams[HP_PRIOR_EM]
!= 0, read on the device in flexda_fwd_triton (a uniform branch), or the constexpr PRIOR_EM in
flexda_step_triton (its `prior_em` is a host bool); raw mode computes what it did before, bit
for bit.

Two regimes, chosen on the host from C (`kernel_config`):
  * C <= MAX_FUSED_BLOCK_C: a tile is [ROWS, next_pow2(C)] in registers, small rows packed several
    per tile; each input read once, each gradient written once. The loads of a program's next tile
    are issued before the math on the current one (software prefetch), to keep memory busy while
    the fp32 math holds the registers.
  * larger C: [ROWS, LOOP_BLOCK_C] column blocks in a loop. Pass 1: online max / sum-exp / argmax
    of every row; pass 2 re-reads the row (from L2, mostly) and writes the gradients; the
    program's prior partial row is accumulated in global memory.

Numerics: fp32 accumulation (fp64 for fp64 logits, which the op schemas allow: supported, as a
correctness path with one configuration); bf16/fp16 are upcast before any arithmetic (Triton's
interpreter computes bf16 arithmetic wrongly, and tl.exp refuses bf16). Row offsets are int64.
Python floats reach the kernels as the bits of a float64 (a float argument would be passed as
fp32): the prologue runs in float64 as the contract says, and the threshold, lambda_u, lambda_d
are rounded to the acc dtype in the kernel. A label outside [0, C) gives its row a NaN
cross-entropy and a NaN gradient row (it is only ever compared, never used as an address).

Launches are plain `kernel[grid](...)` calls. torch.library.wrap_triton only matters where
torch.compile traces the launcher (a triton_op); here register_fake makes the ops leaves of the
graph, so the launchers run as they are, on a GPU as under the interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import struct
from typing import NamedTuple

import torch
import triton  # an ImportError here makes backends._load_triton report triton as unavailable
import triton.language as tl

from . import flexda as _flexda  # defines adello::flexda_fwd_triton (schema, fake, autograd)
from . import step as _step  # noqa: F401  defines adello::flexda_step_triton (schema, fake)


def _interpreted() -> bool:
    # triton.knobs (Triton >= 3.4) holds the parsed environment; older releases only read it.
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Whether triton.jit below builds interpreted kernels: decided by the environment when this module
# (and so the decorators) first runs, not when a kernel is called.
INTERPRETED = _interpreted()

# The hparams slots of adello::flexda_fwd_triton, named once for every backend (ops/flexda.py).
HP_LAMBDA_U = tl.constexpr(_flexda.HP_LAMBDA_U)
HP_LAMBDA_D = tl.constexpr(_flexda.HP_LAMBDA_D)
HP_GATE = tl.constexpr(_flexda.HP_GATE)
HP_TEMPERATURE = tl.constexpr(_flexda.HP_TEMPERATURE)
HP_PRIOR_EM = tl.constexpr(_flexda.HP_PRIOR_EM)

# How the row kernel gets the logit adjustments (constexpr ADJ).
ADJ_LOADED = tl.constexpr(0)    # flexda_fwd_triton: ds, du are input tensors
ADJ_PRIORS = tl.constexpr(1)    # flexda_step_triton, flexda on: computed from P_L, Q and alpha_t
ADJ_ZERO = tl.constexpr(2)      # flexda_step_triton, flexda off: ds = du = 0
LOSS_SLOTS = 4                  # loss_part columns (see the module docstring)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _f64(bits):
    """A Python float passed as its float64 bit pattern (a small pattern arrives as int32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _pow64(x, p):
    """x ** p for x >= 0 in float64, with torch.pow's zeros: 0 ** 0 = 1, 0 ** p = 0 (p > 0),
    0 ** p = inf (p < 0). (libdevice's pow has no interpreter implementation; exp(p log x) in
    float64 is within a few ulp of it, far below the fp32 rounding that follows.)"""
    zero_pow = tl.where(p == 0.0, 1.0, tl.where(p > 0.0, 0.0, float("inf")))
    safe = tl.where(x == 0.0, 1.0, x)
    return tl.where(x == 0.0, zero_pow, tl.exp(p * tl.log(safe)))


@triton.jit
def _alpha(step_ptr, total_steps, epoch_steps, alpha_min, power):
    """alpha_t = 1 - (1 - alpha_min) * clamp(u / U, 0, 1) ** power, in float64, with
    u = floor(t / n), U = floor(T_max / n), n = epoch_steps (1: the per-step t / T_max)."""
    t = tl.load(step_ptr)
    t = tl.maximum(t, 0)          # (a negative step clamps to 0 either way)
    frac = (t // epoch_steps).to(tl.float64) / (total_steps // epoch_steps).to(tl.float64)
    frac = tl.minimum(tl.maximum(frac, 0.0), 1.0)
    return 1.0 - (1.0 - alpha_min) * _pow64(frac, power)


@triton.jit
def _adj_block(adj_ptr, num_ptr, q_ptr, cols, cmask, alpha, inv_z, eps, ADJ: tl.constexpr,
               ACC: tl.constexpr):
    """The adjustment of columns `cols` in the acc dtype (0 on padding columns):
        ADJ_LOADED  adj_ptr[cols] (ds or du, already in the acc dtype)
        ADJ_PRIORS  log(num + eps) - log(R^alpha / Z + eps), in float64, rounded once;
                    num = P_L gives ds, num = Q gives du; q_ptr is R, the prior the target
                    is flattened from (Q itself, or a fixed target prior); inv_z = 1 / sum_c
                    R_c^alpha
        ADJ_ZERO    0
    """
    if ADJ == ADJ_LOADED:
        d = tl.load(adj_ptr + cols, mask=cmask, other=0.0).to(ACC)
    elif ADJ == ADJ_PRIORS:
        q = tl.load(q_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
        num = tl.load(num_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
        log_qa = tl.log(_pow64(q, alpha) * inv_z + eps)
        d = tl.where(cmask, tl.log(num + eps) - log_qa, 0.0).to(ACC)
    else:
        d = tl.zeros(cols.shape, ACC)
    return d


@triton.jit
def _inv_z(q_ptr, cols0, C, alpha, BLOCK_C: tl.constexpr):
    """1 / sum_c Q_c^alpha in float64, the column blocks summed in a fixed order."""
    acc = tl.zeros([BLOCK_C], tl.float64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        q = tl.load(q_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
        acc += tl.where(cmask, _pow64(q, alpha), 0.0)
    return 1.0 / tl.sum(acc, 0)


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
def _load_block(ptr, offs, m2, cmask, d, ACC: tl.constexpr):
    """One column block of the looped kernels, [ROWS, BLOCK_C] at offsets `offs` (valid where m2),
    upcast to ACC, plus the adjustment d[cols] on every row; padding columns are -inf (exp -> 0)."""
    x = tl.load(ptr + offs, mask=m2, other=0.0).to(ACC)
    return tl.where(cmask[None, :], x + d[None, :], float("-inf"))


@triton.jit
def _row_weights(wt_ptr, rows, N, ACC: tl.constexpr):
    """The prior weights of rows `rows` (< N) in the acc dtype, with every weight that is not
    > 0 (0, negative, NaN; and padding rows) replaced by 0: a row of weight 0 here is left out of
    the batch prior entirely, and these values are what W sums."""
    w = tl.load(wt_ptr + rows, mask=rows < N, other=0.0).to(ACC)
    return tl.where(w > 0.0, w, 0.0)


@triton.jit
def _bad_label(y, C):
    """Labels outside [0, C): their row's CE and gradient are NaN (never an address)."""
    return (y < 0) | (y >= C)


@triton.jit
def _sup_tile(x_raw, y, glb_ptr, ds, rows, cols, B, C, ACC: tl.constexpr):
    """Labeled rows `rows`, loaded as x_raw / y (whole rows in registers). Returns the per-row CE
    (0 on padding rows, NaN on rows with a label outside [0, C)).

    x = z_l + ds;  CE = lse(x) - x[y] = log(sum_c exp(x_c - m)) + (m - x[y]),  m = max x
    (the difference m - x[y] is taken first, so logits ~1e4 do not cancel in fp32);
    dL_s/dx = (softmax(x) - onehot(y)) / B.
    """
    rmask = rows < B
    cmask = cols < C
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    bad = _bad_label(y, C)
    x = x_raw.to(ACC)                                                # upcast before any arithmetic
    x = tl.where(cmask[None, :], x + ds[None, :], float("-inf"))     # padding columns: exp -> 0
    m = tl.max(x, 1)
    e = tl.exp(x - m[:, None])
    s = tl.sum(e, 1)
    onehot = cols[None, :] == y[:, None]
    x_y = tl.sum(tl.where(onehot, x, 0.0), 1)
    ce = tl.where(rmask, tl.where(bad, float("nan"), tl.log(s) + (m - x_y)), 0.0)
    inv_b = _reciprocal(B, ACC)
    g = (e * (1.0 / s)[:, None] - onehot.to(ACC)) * inv_b
    g = tl.where(bad[:, None], float("nan"), g)
    tl.store(glb_ptr + offs, g.to(glb_ptr.dtype.element_ty), mask=m2)
    return ce


@triton.jit
def _unsup_tile(w_raw, s_raw, gs_ptr, mask_ptr, plab_ptr, du, rows, cols, N, C, thr,
                lam_u, lam_d, gate_on, t, em, wv, WEIGHTED: tl.constexpr, ACC: tl.constexpr,
                DISTILL_ALL: tl.constexpr = False):
    """Unlabeled rows `rows`, loaded as w_raw (weak) and s_raw (strong): the weak and strong row of
    each sample together, whole rows in registers.

    Returns (the rows' batch-prior sum [BLOCK_C], M * CE_u [ROWS], (1-M) * H [ROWS]).

    Weak view (raw logits):  pw = e_w / s_w, e_w = exp(z_w - m_w);  max_c pw = exp(0) / s_w = 1/s_w,
      M = [1/s_w >= tau] (inclusive, in the acc dtype);  yhat = first index of max z_w (softmax is
      monotonic, so it is also the first argmax of pw).
    Batch prior (`em`: a uniform runtime branch, or a constexpr in the step op):
      raw  sum over the rows of pw;
      em   sum over the rows of pe = softmax(z_w + du), from the weak exps already there:
           exp(z_w + du - m_w) = e_w r with r = exp(du), so pe_c = e_w,c r_c / sum_c e_w,c r_c
           (m_w cancels; sum_c e_w r >= r[argmax] > 0 for du from the priors, |du| <=
           log((1 + eps) / eps)). r is formed per tile from du in registers: C exps shared by
           the tile's ROWS rows, cheaper than keeping a second [BLOCK_C] live across tiles.
           A NaN/inf weak row has NaN e_w, so its pe is NaN in every column, as pw is.
      WEIGHTED: wv [ROWS] are the rows' prior weights from `_row_weights` (0 where not > 0),
           folded into the per-row scale (pw: e_w (w / s_w); pe: e_w r (w / sum_c e_w r)); a row
           of weight 0 is masked out (tl.where, so a NaN row adds nothing). Unweighted, wv is
           unused and the code is what it was.
    Strong view:  a = z_s + du;  CE_u = log(s_a) + (m_a - a[yhat]).
    Distillation (only when gate != 0; with gate == 0 it is skipped, never multiplied by 0):
      q = softmax(z_w / T), p_T = softmax(a / T); with m'_a = m_a / T (T > 0 keeps the argmax),
      H(q, p_T) = -sum_c q_c (a_c/T - m'_a - log s'_a) = log s'_a + (1/T) sum_c q_c (m_a - a_c)
      (sum q = 1; per-element differences m_a - a_c avoid cancellation at large logits).
    Gradient:  dL/dz_s = (lambda_u M (softmax(a) - onehot(yhat))
                          + lambda_d (1-M) (p_T - q) / T) / N.
    T == 1 (the released default) is a runtime branch reusing pw and softmax(a): no extra exps.
    DISTILL_ALL (the op's distill_all, a constexpr): the distillation covers every row, H and
    lambda_d (p_T - q) / T without the (1 - M) factor, so an M = 1 row has both terms (and a
    NaN strong row both NaN); the same exps serve both (T = 1: pa and pw; T != 1: the second
    pass at 1/T). False: the code it was before.
    Returns (prior, M * CE_u, (1-M) * H, or H on every row with DISTILL_ALL).
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
    if WEIGHTED:
        keep = wv > 0.0                                   # False on padding rows (wv = 0)
        if em:
            er = e_w * tl.exp(du)[None, :]
            pe = er * (wv / tl.sum(er, 1))[:, None]
            prior = tl.sum(tl.where(keep[:, None], pe, 0.0), 0)
        else:
            prior = tl.sum(tl.where(keep[:, None], e_w * (inv_sw * wv)[:, None], 0.0), 0)
    else:
        if em:
            er = e_w * tl.exp(du)[None, :]
            pe = er * (1.0 / tl.sum(er, 1))[:, None]
            prior = tl.sum(tl.where(rmask[:, None], pe, 0.0), 0)
        else:
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
            if DISTILL_ALL:
                g = g + lam_d * (pa - pw)
            else:
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
            if DISTILL_ALL:
                g = g + (lam_d * inv_t) * (p_t * (1.0 / s_t)[:, None] - q)
            else:
                g = g + (lam_d * inv_t) * (1.0 - msk)[:, None] * (p_t * (1.0 / s_t)[:, None] - q)
        if DISTILL_ALL:
            ld = tl.where(rmask, h, 0.0)
        else:
            ld = tl.where(rmask, (1.0 - msk) * h, 0.0)

    inv_n = _reciprocal(N, ACC)
    tl.store(gs_ptr + offs, (g * inv_n).to(gs_ptr.dtype.element_ty), mask=m2)
    tl.store(mask_ptr + rows, msk, mask=rmask)
    tl.store(plab_ptr + rows, yhat.to(tl.int64), mask=rmask)
    return prior, lu, ld


@triton.jit
def _sup_tile_looped(zl_ptr, y_ptr, glb_ptr, adj_ptr, pl_ptr, q_ptr, alpha, inv_z, eps, rows,
                     cols0, B, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ADJ: tl.constexpr,
                     ACC: tl.constexpr):
    """Labeled rows for large C, column blocks of BLOCK_C. Same math as `_sup_tile`.

    Pass 1, online softmax (Milakov & Gimelshein 2018): with running max m and sum s of
    exp(x - m), a block with max m_b gives m' = max(m, m_b), s' = s exp(m - m') + sum exp(x - m').
    m' = -inf (every logit so far -inf) would make exp(-inf - -inf) = NaN: subtract 0 instead.
    x[y] is picked up on the way. Pass 2 writes (exp(x - m) / s - onehot(y)) / B.
    """
    rmask = rows < B
    row_off = rows.to(tl.int64) * C
    y = tl.load(y_ptr + rows, mask=rmask, other=0)
    bad = _bad_label(y, C)
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS], ACC)
    x_y = tl.zeros([ROWS], ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        offs = row_off[:, None] + cols[None, :]
        d = _adj_block(adj_ptr, pl_ptr, q_ptr, cols, cmask, alpha, inv_z, eps, ADJ, ACC)
        x = _load_block(zl_ptr, offs, rmask[:, None] & cmask[None, :], cmask, d, ACC)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub[:, None]), 1)
        x_y += tl.sum(tl.where(cols[None, :] == y[:, None], x, 0.0), 1)
        m = m_new
    ce = tl.where(rmask, tl.where(bad, float("nan"), tl.log(s) + (m - x_y)), 0.0)

    inv_s = 1.0 / s
    inv_b = _reciprocal(B, ACC)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        offs = row_off[:, None] + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        d = _adj_block(adj_ptr, pl_ptr, q_ptr, cols, cmask, alpha, inv_z, eps, ADJ, ACC)
        x = _load_block(zl_ptr, offs, m2, cmask, d, ACC)
        onehot = (cols[None, :] == y[:, None]).to(ACC)
        g = (tl.exp(x - m[:, None]) * inv_s[:, None] - onehot) * inv_b
        g = tl.where(bad[:, None], float("nan"), g)
        tl.store(glb_ptr + offs, g.to(glb_ptr.dtype.element_ty), mask=m2)
    return ce


@triton.jit
def _unsup_tile_looped(zw_ptr, zs_ptr, gs_ptr, mask_ptr, plab_ptr, adj_ptr, q_ptr, r_ptr, alpha,
                       inv_z, eps, prior_row_ptr, rows, cols0, N, C, thr, lam_u, lam_d, gate_on, t,
                       em, wt_ptr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, ADJ: tl.constexpr,
                       LATE_STRONG: tl.constexpr, WEIGHTED: tl.constexpr, ACC: tl.constexpr,
                       DISTILL_ALL: tl.constexpr = False):
    """Unlabeled rows for large C, column blocks of BLOCK_C. Same math as `_unsup_tile`.

    Pass 1 (online, see `_sup_tile_looped`): weak max m_w, sum s_w and first argmax (a block's
    argmax replaces the running one only when its max is strictly larger: first index on ties);
    strong max m_a and sum s_a; and, only when the distillation is on with T != 1, the sums of
    exp((z_w - m_w)/T) and exp((a - m_a)/T) (rescaled by exp((m - m')/T) as the max moves).
    With `em` (the EM batch prior, see `_unsup_tile`) the same pass also sums
    s_e = sum_c exp(z_w,c - m_w) r_c, r = exp(du) of the block (the d it adds to the strong
    view): the block's weak exps are the ones s_w sums, and s_e is rescaled by the same
    exp(m_w - m_w') as the max moves; r costs BLOCK_C exps per block, shared by the tile's rows.
    Pass 2: pw, M, the prior partial row (pw, or with `em` pe = exp(z_w - m_w) r / s_e, the
    block's exps shared with pw), a[yhat], sum_c q_c (m_a - a_c) and the gradient.
    WEIGHTED (wt_ptr: the [N] prior weights): the prior rows are exp(z_w - m_w) (w / s_w), or
    exp(z_w - m_w) r (w / s_e), the weight folded into the per-row scale, and rows of weight 0
    are masked out of the partial (so a NaN row of weight 0 adds nothing). The weights are
    loaded after pass 1 and live only as that scale (kp) and its mask through pass 2 (loaded
    before pass 1, they were live across both loops: 32 bytes of spill under the 128-register
    cap, sm_90, fp32); their sum W is the finalize kernel's.
    LATE_STRONG (the step's EM specialisation, and every WEIGHTED one): pass 2 loads the strong
    block after the prior partial's update instead of with the weak block. A 16-warp program has
    at most 128 registers a thread; the float64 adjustments, the EM prior's tile and a strong
    block in flight across the barrier exceed them (32 bytes of spill, sm_90, fp32), the later
    load does not (the weighted prior's tile likewise: 24 bytes with the early load). Unweighted
    raw mode and flexda_fwd_triton keep the early load: their code is unchanged.
    The fourth loss slot (psum, only tested for finiteness) is, with WEIGHTED, the rows' kp s_w
    (kp s_e with `em`) where kept: w_i for a finite row, NaN for a NaN row, formed once per
    tile instead of a per-block row sum of the weighted tile (which also made it spill).
    The program's prior partial row lives in global memory (C is too large for registers): it is
    read-modified-written by this program only, after a barrier so that no thread of the program
    reads an element before the thread that wrote it last has finished.
    DISTILL_ALL: every row distils (no (1 - M) factor on H and on its gradient; see
    `_unsup_tile`), from the same two passes.
    Returns (M * CE_u [ROWS], (1-M) * H [ROWS] (H with DISTILL_ALL), the tile's sum of its prior
    rows (a scalar)).
    """
    rmask = rows < N
    row_off = rows.to(tl.int64) * C
    need_t = gate_on & (t != 1.0)
    inv_t = 1.0 / t
    m_w = tl.full([ROWS], float("-inf"), ACC)
    s_w = tl.zeros([ROWS], ACC)
    s_e = tl.zeros([ROWS], ACC)
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
        zero = tl.zeros([BLOCK_C], ACC)
        w = _load_block(zw_ptr, offs, m2, cmask, zero, ACC)
        d = _adj_block(adj_ptr, q_ptr, r_ptr, cols, cmask, alpha, inv_z, eps, ADJ, ACC)
        a = _load_block(zs_ptr, offs, m2, cmask, d, ACC)

        b_max, b_idx = tl.max(w, 1, return_indices=True, return_indices_tie_break_left=True)
        yhat = tl.where(b_max > m_w, b_idx + c0, yhat)
        mw_new = tl.maximum(m_w, b_max)
        mw_sub = tl.where(mw_new == float("-inf"), 0.0, mw_new)
        ma_new = tl.maximum(m_a, tl.max(a, 1))
        ma_sub = tl.where(ma_new == float("-inf"), 0.0, ma_new)
        rescale_w = tl.exp(m_w - mw_sub)
        e_w = tl.exp(w - mw_sub[:, None])
        s_w = s_w * rescale_w + tl.sum(e_w, 1)
        if em:
            s_e = s_e * rescale_w + tl.sum(e_w * tl.exp(d)[None, :], 1)
        s_a = s_a * tl.exp(m_a - ma_sub) + tl.sum(tl.exp(a - ma_sub[:, None]), 1)
        if need_t:
            s_q = s_q * tl.exp((m_w - mw_sub) * inv_t) + tl.sum(
                tl.exp((w - mw_sub[:, None]) * inv_t), 1)
            s_t = s_t * tl.exp((m_a - ma_sub) * inv_t) + tl.sum(
                tl.exp((a - ma_sub[:, None]) * inv_t), 1)
        m_w = mw_new
        m_a = ma_new

    inv_sw = 1.0 / s_w
    inv_se = 1.0 / s_e
    inv_sa = 1.0 / s_a
    inv_sq = 1.0 / s_q
    inv_st = 1.0 / s_t
    if WEIGHTED:
        wv = _row_weights(wt_ptr, rows, N, ACC)
        keep = wv > 0.0                                   # False on padding rows (wv = 0)
        if em:                                            # the row's scale in the prior
            kp = wv * inv_se
        else:
            kp = wv * inv_sw
    msk = tl.where(rmask & (inv_sw >= thr), 1.0, 0.0).to(ACC)
    inv_n = _reciprocal(N, ACC)
    a_y = tl.zeros([ROWS], ACC)
    dot = tl.zeros([ROWS], ACC)
    psum = tl.zeros([ROWS], ACC)
    if WEIGHTED:                  # the rows' sums of their prior rows, once (see above)
        if em:
            psum = tl.where(keep, kp * s_e, 0.0)
        else:
            psum = tl.where(keep, kp * s_w, 0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cmask = cols < C
        offs = row_off[:, None] + cols[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        zero = tl.zeros([BLOCK_C], ACC)
        w = _load_block(zw_ptr, offs, m2, cmask, zero, ACC)
        d = _adj_block(adj_ptr, q_ptr, r_ptr, cols, cmask, alpha, inv_z, eps, ADJ, ACC)
        if not LATE_STRONG:
            a = _load_block(zs_ptr, offs, m2, cmask, d, ACC)

        e_w = tl.exp(w - m_w[:, None])
        pw = tl.where(rmask[:, None], e_w * inv_sw[:, None], 0.0)
        if WEIGHTED:
            if em:
                pk = tl.where(keep[:, None], (e_w * tl.exp(d)[None, :]) * kp[:, None], 0.0)
            else:
                pk = tl.where(keep[:, None], e_w * kp[:, None], 0.0)
            prior_cols = tl.sum(pk, 0)
        else:
            if em:
                pe = tl.where(rmask[:, None], (e_w * tl.exp(d)[None, :]) * inv_se[:, None], 0.0)
                prior_rows = tl.sum(pe, 1)
                prior_cols = tl.sum(pe, 0)
            else:
                prior_rows = tl.sum(pw, 1)
                prior_cols = tl.sum(pw, 0)
            psum += prior_rows
        tl.debug_barrier()
        part = tl.load(prior_row_ptr + cols, mask=cmask, other=0.0)
        tl.store(prior_row_ptr + cols, part + prior_cols, mask=cmask)

        if LATE_STRONG:
            a = _load_block(zs_ptr, offs, m2, cmask, d, ACC)
        pa = tl.exp(a - m_a[:, None]) * inv_sa[:, None]
        onehot = cols[None, :] == yhat[:, None]
        a_y += tl.sum(tl.where(onehot, a, 0.0), 1)
        g = lam_u * msk[:, None] * (pa - onehot.to(ACC))
        if gate_on:
            if need_t:
                q = tl.exp((w - m_w[:, None]) * inv_t) * inv_sq[:, None]
                p_t = tl.exp((a - m_a[:, None]) * inv_t) * inv_st[:, None]
                if DISTILL_ALL:
                    g = g + (lam_d * inv_t) * (p_t - q)
                else:
                    g = g + (lam_d * inv_t) * (1.0 - msk)[:, None] * (p_t - q)
            else:
                q = pw
                if DISTILL_ALL:
                    g = g + lam_d * (pa - pw)
                else:
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
        if DISTILL_ALL:
            ld = tl.where(rmask, h, 0.0)
        else:
            ld = tl.where(rmask, (1.0 - msk) * h, 0.0)
    tl.store(mask_ptr + rows, msk, mask=rmask)
    tl.store(plab_ptr + rows, yhat.to(tl.int64), mask=rmask)
    return lu, ld, tl.sum(psum, 0)


@triton.jit(do_not_specialize=["thr_bits", "total_steps", "epoch_steps", "alpha_min_bits",
                               "power_bits", "distill_start", "lam_u_bits", "lam_d_bits",
                               "eps_bits"])
def _rows_kernel(zl_ptr, y_ptr, zw_ptr, zs_ptr, adj_l_ptr, adj_u_ptr, tgt_ptr, hp_ptr, step_ptr,
                 wt_ptr, loss_part_ptr, prior_part_ptr, mask_ptr, plab_ptr, glb_ptr, gs_ptr,
                 B, N, row_bytes, thr_bits, total_steps, epoch_steps, alpha_min_bits, power_bits,
                 distill_start, lam_u_bits, lam_d_bits, eps_bits,
                 ROWS: tl.constexpr, BLOCK_C: tl.constexpr, LOOP_C: tl.constexpr,
                 ADJ: tl.constexpr, STEP: tl.constexpr, PRIOR_EM: tl.constexpr,
                 WEIGHTED: tl.constexpr = False, DISTILL_ALL: tl.constexpr = False):
    """One persistent program: the prologue, labeled tiles pid, pid+P, ... then the unlabeled
    tiles that continue the same round robin (global tile index TL + u); finally its partials.

    STEP = False (flexda_fwd_triton): adj_l_ptr, adj_u_ptr are ds, du; hp_ptr the hparams
    vector; step_ptr and the scalar arguments after thr_bits are unused; the batch prior's
    estimator is hparams[HP_PRIOR_EM] != 0, read on the device (a uniform branch; PRIOR_EM is
    unused and passed False, so raw and em share one compiled kernel).
    STEP = True (flexda_step_triton): adj_l_ptr, adj_u_ptr are P_L, Q; tgt_ptr R, the prior the
    target Qa is flattened from (Q itself, or the op's fixed prior_target; unused and any
    pointer when STEP = False); hp_ptr the temperature;
    step_ptr the step counter; the floats come as float64 bits; PRIOR_EM is the op's `prior_em`
    (a host bool, so a constexpr: the raw step compiles to the kernel it was before).
    WEIGHTED (both ops): wt_ptr holds the [N] prior weights (acc dtype); each unlabeled row's
    prior contribution is scaled by its weight (left out when the weight is not > 0); the
    weights' sum W is left to `_finalize_kernel` (a W_p accumulator here made the looped
    kernel spill). Unweighted, wt_ptr is any unused pointer and the code is what it was before
    prior weights existed. loss_part is [P, 4] either way.
    DISTILL_ALL (both ops, the op's host bool distill_all): when the gate is on, every unlabeled
    row has the distillation term and its gradient (an M = 1 row both terms); the third loss
    slot sums H over all rows. False compiles to the kernel as it was.
    """
    ACC: tl.constexpr = loss_part_ptr.dtype.element_ty   # fp32, or fp64 for fp64 logits
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # C arrives as the row size in bytes: Triton's JIT specialises an integer argument that is a
    # multiple of 16, and the division by the element size keeps that divisibility, so when rows
    # are 16-byte aligned the compiler knows it and loads/stores become 16-byte vectors.
    ELT: tl.constexpr = zl_ptr.dtype.element_ty.primitive_bitwidth // 8
    C = row_bytes // ELT
    thr = _f64(thr_bits).to(ACC)                 # (acc) threshold, rounded once
    if STEP:
        t_step = tl.load(step_ptr)
        lam_u = _f64(lam_u_bits).to(ACC)
        lam_d = _f64(lam_d_bits).to(ACC)
        gate_on = t_step >= distill_start
        t = tl.load(hp_ptr).to(tl.float64).to(ACC)
        alpha = _alpha(step_ptr, total_steps, epoch_steps, _f64(alpha_min_bits),
                       _f64(power_bits))
        eps = _f64(eps_bits)
        em = PRIOR_EM
    else:
        lam_u = tl.load(hp_ptr + HP_LAMBDA_U).to(ACC)
        lam_d = tl.load(hp_ptr + HP_LAMBDA_D).to(ACC)
        gate_on = tl.load(hp_ptr + HP_GATE) != 0
        t = tl.load(hp_ptr + HP_TEMPERATURE).to(ACC)
        em = tl.load(hp_ptr + HP_PRIOR_EM) != 0
        alpha = 1.0
        eps = 0.0

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
        inv_z = 1.0
        if ADJ == ADJ_PRIORS:
            inv_z = _inv_z(tgt_ptr, cols, C, alpha, BLOCK_C)
        for c0 in range(0, C, BLOCK_C):
            tl.store(prior_row_ptr + c0 + cols, tl.zeros([BLOCK_C], ACC), mask=c0 + cols < C)
        tl.debug_barrier()
        for tile in range(pid, n_lab, nprog):
            ls_acc += _sup_tile_looped(zl_ptr, y_ptr, glb_ptr, adj_l_ptr, adj_l_ptr, tgt_ptr,
                                       alpha, inv_z, eps, tile * ROWS + r, cols, B, C, ROWS,
                                       BLOCK_C, ADJ, ACC)
        psum = tl.zeros([], ACC)
        for tile in range(u_start, n_unl, nprog):
            lu, ld, ps = _unsup_tile_looped(zw_ptr, zs_ptr, gs_ptr, mask_ptr, plab_ptr, adj_u_ptr,
                                            adj_u_ptr, tgt_ptr, alpha, inv_z, eps, prior_row_ptr,
                                            tile * ROWS + r, cols, N, C, thr, lam_u, lam_d,
                                            gate_on, t, em, wt_ptr, ROWS, BLOCK_C, ADJ,
                                            (STEP and PRIOR_EM) or WEIGHTED, WEIGHTED, ACC,
                                            DISTILL_ALL)
            lu_acc += lu
            ld_acc += ld
            psum += ps
    else:
        cmask = cols < C
        if ADJ == ADJ_PRIORS:
            q = tl.load(tgt_ptr + cols, mask=cmask, other=1.0).to(tl.float64)
            inv_z = 1.0 / tl.sum(tl.where(cmask, _pow64(q, alpha), 0.0), 0)
        else:
            inv_z = 1.0
        ds = _adj_block(adj_l_ptr, adj_l_ptr, tgt_ptr, cols, cmask, alpha, inv_z, eps, ADJ, ACC)
        du = _adj_block(adj_u_ptr, adj_u_ptr, tgt_ptr, cols, cmask, alpha, inv_z, eps, ADJ, ACC)
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
        if WEIGHTED:
            wv = _row_weights(wt_ptr, rows, N, ACC)
        else:
            wv = lu_acc                                       # unused
        for tile in range(u_start, n_unl, nprog):
            rows = tile * ROWS + r
            nxt = rows + nprog * ROWS
            w_nxt = _load_tile(zw_ptr, nxt, cols, N, C)
            s_nxt = _load_tile(zs_ptr, nxt, cols, N, C)
            if WEIGHTED:
                wv_nxt = _row_weights(wt_ptr, nxt, N, ACC)
            p, lu, ld = _unsup_tile(w_raw, s_raw, gs_ptr, mask_ptr, plab_ptr, du, rows, cols, N,
                                    C, thr, lam_u, lam_d, gate_on, t, em, wv, WEIGHTED, ACC,
                                    DISTILL_ALL)
            w_raw = w_nxt
            s_raw = s_nxt
            if WEIGHTED:
                wv = wv_nxt
            prior_acc += p
            lu_acc += lu
            ld_acc += ld
        tl.store(prior_row_ptr + cols, prior_acc, mask=cmask)
        psum = tl.sum(prior_acc, 0)
    base = loss_part_ptr + pid * 4
    tl.store(base + 0, tl.sum(ls_acc, 0))
    tl.store(base + 1, tl.sum(lu_acc, 0))
    tl.store(base + 2, tl.sum(ld_acc, 0))
    tl.store(base + 3, psum)


@triton.jit(do_not_specialize=["lam_u_bits", "lam_d_bits", "distill_start", "mom_bits"])
def _finalize_kernel(loss_part_ptr, prior_part_ptr, hp_ptr, step_ptr, skipped_ptr, q_ptr,
                     loss_ptr, ls_ptr, lu_ptr, ld_ptr, prior_ptr, P, B, N, C,
                     lam_u_bits, lam_d_bits, distill_start, mom_bits,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STEP: tl.constexpr,
                     UPDATE: tl.constexpr, WEIGHTED: tl.constexpr = False, wt_ptr=None):
    """Deterministic reduction of the partials, then the step's epilogue.

    Program j sums columns [j*BLOCK_C, ...) of prior_part over the P rows in a fixed order and
    writes prior_batch there; program 0 also reduces the loss partials and writes
        L_s = S_s / B, L_u = S_u / N, L_d = gate ? S_d / N : 0,
        loss = L_s + lambda_u L_u + (gate ? lambda_d L_d : 0).
    STEP: lambda_u, lambda_d come as float64 bits and gate = [t >= t0] from the step counter
    (read by program 0 only, before it writes it); else from hparams (hp_ptr).
    UPDATE (STEP only): every program decides ok from the fourth loss slot (the same fixed-order
    sum in each), updates its own columns of Q when ok, and program 0 advances the counters.
    WEIGHTED (prior weights, wt_ptr the [N] weights in the acc dtype; unweighted it is None, a
    constexpr, so the kernel's parameters are what they were): every program sums the N
    weights itself, W = sum of the w_i > 0, in one fixed order (BLOCK_P-wide blocks, then the
    block's lanes), so all programs hold the same W; prior_batch = (sum of the partials) *
    (1 / W), all NaN when W == 0. With UPDATE and W == 0 the epilogue leaves Q and
    skipped_updates as they are (no estimate, nothing counted) and only advances the step.
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
    if WEIGHTED:
        wacc = tl.zeros([BLOCK_P], ACC)
        for n0 in range(0, N, BLOCK_P):
            wacc += _row_weights(wt_ptr, n0 + p, N, ACC)
        w_total = tl.sum(wacc, 0)
        has_rows = w_total > 0.0                    # W == 0: no row to estimate from
        inv_w = tl.full([], 1.0, ACC) / w_total
        prior_batch = tl.where(has_rows, tl.sum(acc, 0) * inv_w, float("nan"))
    else:
        prior_batch = tl.sum(acc, 0) * _reciprocal(N, ACC)
    tl.store(prior_ptr + cols, prior_batch, mask=cmask)

    k = tl.arange(0, 4)
    lacc = tl.zeros([BLOCK_P, 4], ACC)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + p
        lmask = (rows < P)[:, None] & (k < 4)[None, :]
        lacc += tl.load(loss_part_ptr + rows[:, None] * 4 + k[None, :], mask=lmask,
                        other=0.0)
    sums = tl.sum(lacc, 0)

    if pid == 0:
        if STEP:
            t_step = tl.load(step_ptr)
            lam_u = _f64(lam_u_bits).to(ACC)
            lam_d = _f64(lam_d_bits).to(ACC)
            gate_on = t_step >= distill_start
        else:
            lam_u = tl.load(hp_ptr + HP_LAMBDA_U).to(ACC)
            lam_d = tl.load(hp_ptr + HP_LAMBDA_D).to(ACC)
            gate_on = tl.load(hp_ptr + HP_GATE) != 0
        l_s = tl.sum(tl.where(k == 0, sums, 0.0), 0) / B
        l_u = tl.sum(tl.where(k == 1, sums, 0.0), 0) / N
        l_d = tl.sum(tl.where(k == 2, sums, 0.0), 0) / N
        l_d = tl.where(gate_on, l_d, 0.0)
        loss = l_s + lam_u * l_u + tl.where(gate_on, lam_d * l_d, 0.0)
        tl.store(loss_ptr, loss)
        tl.store(ls_ptr, l_s)
        tl.store(lu_ptr, l_u)
        tl.store(ld_ptr, l_d)
        if UPDATE:
            total = tl.sum(tl.where(k == 3, sums, 0.0), 0)
            ok0 = tl.abs(total) < float("inf")               # False for NaN and +-inf
            if WEIGHTED:
                ok0 = ok0 | (w_total <= 0.0)                 # W == 0: skipped, not counted
            tl.store(skipped_ptr, tl.load(skipped_ptr) + tl.where(ok0, 0, 1).to(tl.int64))
            tl.store(step_ptr, t_step + 1)

    if UPDATE:
        total = tl.sum(tl.where(k == 3, sums, 0.0), 0)
        ok = tl.abs(total) < float("inf")
        if WEIGHTED:
            ok = ok & has_rows                               # W == 0: Q kept as it is
        QT: tl.constexpr = q_ptr.dtype.element_ty
        mom = _f64(mom_bits)
        m = mom.to(QT)                                       # both rounded once, from float64
        one_minus_m = (1.0 - mom).to(QT)
        q = tl.load(q_ptr + cols, mask=cmask, other=0.0)
        tl.store(q_ptr + cols, m * q + one_minus_m * prior_batch.to(QT),
                 mask=cmask & (tl.zeros([BLOCK_C], tl.int32) + ok.to(tl.int32) != 0))


@triton.jit
def _scale_kernel(a_ptr, b_ptr, g_ptr, n_a, n_b, BLOCK: tl.constexpr):
    """a *= g and b *= g in place (one launch for both saved gradients), g a 0-d tensor read on the
    device: the product is formed as torch does (g rounded to the tensors' dtype, fp32 math for
    fp32/bf16/fp16, fp64 for fp64). With g exactly 1 every program returns after one load."""
    g = tl.load(g_ptr)
    if g != 1.0:
        DT: tl.constexpr = a_ptr.dtype.element_ty
        CT: tl.constexpr = tl.float64 if DT == tl.float64 else tl.float32
        gs = g.to(DT).to(CT)
        # int64 block indices: a tensor may hold more than 2**31 elements
        pid = tl.program_id(0).to(tl.int64)
        nprog = tl.num_programs(0).to(tl.int64)
        blocks_a = tl.cdiv(n_a, BLOCK)
        total = blocks_a + tl.cdiv(n_b, BLOCK)
        r = tl.arange(0, BLOCK).to(tl.int64)
        for blk in range(pid, total, nprog):
            if blk < blocks_a:
                offs = blk * BLOCK + r
                m = offs < n_a
                x = tl.load(a_ptr + offs, mask=m, other=0.0)
                tl.store(a_ptr + offs, (x.to(CT) * gs).to(DT), mask=m)
            else:
                offs = (blk - blocks_a) * BLOCK + r
                m = offs < n_b
                x = tl.load(b_ptr + offs, mask=m, other=0.0)
                tl.store(b_ptr + offs, (x.to(CT) * gs).to(DT), mask=m)


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

MAX_FUSED_BLOCK_C = 4096   # whole rows in registers up to this many (padded) classes
LOOP_BLOCK_C = 2048        # column block of the large-C regime
LOOP_ROWS = 2              # rows per tile in the large-C regime
TILE_ELEMS = 2048          # rows packed per tile until ROWS * BLOCK_C reaches this
THREAD_ELEMS = 8           # elements of a tile per thread: num_warps = tile / (32 THREAD_ELEMS)
MIN_BLOCK_C = 128          # smaller C is padded (few specialisations; small C is latency-bound)
MAX_REGISTERS = 128        # ptxas cap for 16-byte-aligned rows: 2 programs of 8 warps per SM
FP64_ROWS, FP64_BLOCK_C, FP64_WARPS = 2, 512, 4   # fp64: one configuration (see kernel_config)
# Persistent grid: P = (programs of the compiled kernel that fit on one SM) x SMs, read from the
# compiled kernel's registers and shared memory (`_programs_per_sm`, `occupancy`). A grid of
# more programs than fit runs in waves: a program of the second wave starts only when one of the
# first has finished all its tiles, so the extra programs add nothing but partials (and a tail).
# At the bandwidth shape (C = 1000, 16-byte rows, ROWS = 2, BLOCK_C = 1024, 8 warps, cap 128),
# ptxas gives the step kernel 128 registers and no spill for fp32 and bf16 (sm_90; 151 / 158
# uncapped): 2 programs = 16 warps per SM, so P = 264 on an H100/H200, where a fixed 4 per SM
# asked for 528 in two waves. Measured alternatives (registers, stack bytes, programs per SM):
# ROWS = 1 with 8 warps (4 elements a thread) fits 80 registers without a spill in fp32 (3 per
# SM, 24 warps) and 64 in bf16 (4 per SM, 32 warps); ROWS = 2 at 16 warps needs 121 uncapped
# and spills under 64. More resident warps hide more latency but keep the same bytes in flight
# per SM (the prefetched next tile), so which wins is a measurement: benchmarks/gpu_bench.py
# sweeps them (TILE_ELEMS / THREAD_ELEMS / MAX_REGISTERS / PROGRAMS_PER_SM) against the copy
# bandwidth. PROGRAMS_PER_SM, when set, overrides the computed value; FALLBACK_PROGRAMS_PER_SM
# is used when the occupancy cannot be read.
PROGRAMS_PER_SM: int | None = None
FALLBACK_PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 3   # grid cap under TRITON_INTERPRET=1 (exercises the round robin)
FIN_BLOCK_P = 256          # finalize tile: 256 partial rows x 16 columns
FIN_BLOCK_C = 16
FIN_NUM_WARPS = 4
SCALE_BLOCK = 4096         # scale kernel: elements per block, grid-stride over both tensors
SCALE_PROGRAMS_PER_SM = 4
SCALE_NUM_WARPS = 8

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
    """The specialisation the launchers use for C = num_classes and logits of `dtype`.

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
    warps = min(16, max(4, rows * block // (32 * THREAD_ELEMS)))
    return KernelConfig(rows, block, loop, warps, MAX_REGISTERS if aligned else None, aligned)


def all_kernel_configs(dtype: torch.dtype) -> list[KernelConfig]:
    """Every configuration `kernel_config` can return for `dtype` (the AOT compile test's list):
    each power-of-two padded row and the column loop, with aligned and unaligned rows."""
    configs = {kernel_config(c, dtype) for k in range(17) for c in (1 << k, (1 << k) + 1)}
    return sorted(configs, key=lambda cfg: (cfg.loop_c, cfg.block_c, cfg.aligned))


def occupancy(n_regs: int, shared_bytes: int, num_warps: int, *, regs_per_sm: int = 65536,
              max_warps_per_sm: int = 64, shared_per_sm: int = 233472,
              max_blocks_per_sm: int = 32) -> int:
    """Programs of one kernel that fit on an SM at once (Hopper limits by default: 64 K registers,
    64 warps, 228 KiB of shared memory, 32 blocks). Registers are allocated per warp in units of
    256 (8 per thread), which is what usually binds here: 128 registers x 8 warps = 32 K, two
    programs; 168 registers x 8 warps, one."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_warps = max_warps_per_sm // num_warps
    by_shared = shared_per_sm // shared_bytes if shared_bytes > 0 else max_blocks_per_sm
    return max(1, min(by_regs, by_warps, by_shared, max_blocks_per_sm))


_OCCUPANCY: dict = {}


def _programs_per_sm(kernel, key, args, meta, device: torch.device) -> int:
    """Programs per SM for this specialisation, from the compiled kernel (compiled once by
    `warmup`, then cached per key; no launch, no device sync)."""
    if PROGRAMS_PER_SM:
        return PROGRAMS_PER_SM
    found = _OCCUPANCY.get(key)
    if found is not None:
        return found
    try:
        compiled = kernel.warmup(*args, grid=(1,), **meta)
        init = getattr(compiled, "_init_handles", None)
        if init is not None:
            init()
        props = torch.cuda.get_device_properties(device)
        n_regs = int(compiled.n_regs)
        shared = int(getattr(compiled.metadata, "shared", 0) or 0)
        found = occupancy(
            n_regs, shared, meta["num_warps"],
            regs_per_sm=int(getattr(props, "regs_per_multiprocessor", 65536) or 65536),
            max_warps_per_sm=int(getattr(props, "max_threads_per_multi_processor", 2048)
                                 or 2048) // 32,
            shared_per_sm=int(getattr(props, "shared_memory_per_multiprocessor", 233472)
                              or 233472))
    except Exception:  # noqa: BLE001  an occupancy guess must never fail a launch
        found = FALLBACK_PROGRAMS_PER_SM
    _OCCUPANCY[key] = found
    return found


def rows_kernel_resources(num_classes: int, dtype: torch.dtype, device="cuda",
                          prior_em: bool = False, prior_weight: bool = False,
                          distill_all: bool = False) -> dict:
    """What ptxas made of the step's row kernel for C = num_classes and `dtype` on `device`
    (compiled, not launched; the EM batch prior's specialisation with `prior_em`, the prior
    weights' with `prior_weight`, every row distilling with `distill_all`): registers,
    spills, shared memory, and the programs per SM and grid the launcher derives from them.
    For the GPU check's report; needs a GPU."""
    device = torch.device(device)
    cfg = kernel_config(num_classes, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = 16          # divisible by 16 like the benchmark batches, so the same specialisation
    z = torch.empty((rows, num_classes), device=device, dtype=dtype)
    f32 = dict(device=device, dtype=torch.float32)
    prior = torch.empty(num_classes, **f32)
    weighted = bool(prior_weight)
    meta = dict(ROWS=cfg.rows, BLOCK_C=cfg.block_c, LOOP_C=cfg.loop_c, ADJ=ADJ_PRIORS.value,
                STEP=True, PRIOR_EM=bool(prior_em), WEIGHTED=weighted,
                DISTILL_ALL=bool(distill_all), num_warps=cfg.num_warps,
                **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    args = (z, torch.empty(rows, device=device, dtype=torch.int64), z, z, prior, prior,
            prior, torch.empty((), **f32), torch.empty((), device=device, dtype=torch.int64),
            torch.empty(rows, device=device, dtype=acc),
            torch.empty((1, LOSS_SLOTS), device=device, dtype=acc),
            torch.empty((1, num_classes), device=device, dtype=acc),
            torch.empty(rows, device=device, dtype=acc),
            torch.empty(rows, device=device, dtype=torch.int64), z, z,
            rows, rows, num_classes * z.element_size(), _f64_bits(0.95), 100, 1,
            _f64_bits(0.1), _f64_bits(2.0), 0, _f64_bits(1.0), _f64_bits(1.0), _f64_bits(1e-9))
    with _device_ctx(device):
        compiled = _rows_kernel.warmup(*args, grid=(1,), **meta)
        compiled._init_handles()
        per_sm = _programs_per_sm(_rows_kernel, ("report", dtype, cfg, bool(prior_em),
                                                 weighted, bool(distill_all), device.index),
                                  args, meta, device)
        sms = _sm_count(device)
    return {"dtype": str(dtype).replace("torch.", ""), "C": num_classes, **cfg._asdict(),
            "prior_em": bool(prior_em), "prior_weight": weighted,
            "distill_all": bool(distill_all),
            "n_regs": int(compiled.n_regs), "n_spills": int(compiled.n_spills),
            "shared": int(compiled.metadata.shared), "programs_per_sm": per_sm, "sms": sms,
            "grid": per_sm * sms}


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(_device_index(device))


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _f64_bits(value: float) -> int:
    """The float64 bit pattern of `value` as a signed int64 (the kernels bitcast it back)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]



def _check_logits(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s):
    """Shape/dtype/device checks (metadata only: no device access). Returns (B, N, C)."""
    dtype = logits_lb.dtype
    if dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_lb: expected float32, bfloat16, float16 or float64, got {dtype}")
    if logits_ulb_w.dtype != dtype or logits_ulb_s.dtype != dtype:
        raise ValueError("logits_ulb_w, logits_ulb_s: must have the dtype of logits_lb")
    if logits_lb.dim() != 2 or logits_ulb_w.dim() != 2 or logits_ulb_s.shape != logits_ulb_w.shape \
            or logits_ulb_w.shape[1] != logits_lb.shape[1]:
        raise ValueError("logits: expected logits_lb [B, C] and logits_ulb_w, logits_ulb_s [N, C]")
    b, c = logits_lb.shape
    if labels_lb.shape != (b,):
        raise ValueError(f"labels_lb: expected shape ({b},), got {tuple(labels_lb.shape)}")
    dev = logits_lb.device
    for name, v in (("labels_lb", labels_lb), ("logits_ulb_w", logits_ulb_w),
                    ("logits_ulb_s", logits_ulb_s)):
        if v.device != dev:
            raise ValueError(f"{name}: on {v.device}, logits_lb on {dev}")
    return b, logits_ulb_w.shape[0], c


def _launch_rows(z_l, y, z_w, z_s, adj_l, adj_u, tgt, hp, step, b, n, c, threshold, scalars,
                 adj, step_mode, acc, prior_em=False, prior_weight=None, distill_all=False):
    """Allocates the row outputs and partials, launches `_rows_kernel`. Returns the outputs and
    partials (mask, pseudo_labels, grad_lb, grad_ulb_s, loss_part, prior_part, nprog).
    `prior_em` (the step op's, a constexpr) only with step_mode; flexda_fwd_triton's estimator is
    read from hparams in the kernel. `prior_weight`: the [N] contiguous acc-dtype weights (the
    WEIGHTED specialisation) or None (the kernel as before). `distill_all`: the DISTILL_ALL
    specialisation (every row distils), both ops."""
    dev = z_l.device
    dtype = z_l.dtype
    cfg = kernel_config(c, dtype)
    tiles = triton.cdiv(b, cfg.rows) + triton.cdiv(n, cfg.rows)
    mask = torch.empty(n, device=dev, dtype=acc)
    pseudo_labels = torch.empty(n, device=dev, dtype=torch.int64)
    grad_lb = torch.empty((b, c), device=dev, dtype=dtype)
    grad_ulb_s = torch.empty((n, c), device=dev, dtype=dtype)
    weighted = prior_weight is not None
    wt = prior_weight if weighted else mask      # unweighted: an unused stand-in pointer
    meta = dict(ROWS=cfg.rows, BLOCK_C=cfg.block_c, LOOP_C=cfg.loop_c, ADJ=adj, STEP=step_mode,
                PRIOR_EM=bool(prior_em and step_mode), WEIGHTED=weighted,
                DISTILL_ALL=bool(distill_all), num_warps=cfg.num_warps,
                **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    tail = (b, n, c * z_l.element_size(), _f64_bits(threshold), *scalars)
    if INTERPRETED or dev.type != "cuda":
        nprog = max(1, min(tiles, INTERPRETER_PROGRAMS))
    else:
        # Occupancy of this specialisation, cached after the first call; the first compiles it
        # with stand-in partials (the grid size does not enter the kernel's code).
        key = ("rows", dtype, cfg, adj, step_mode, meta["PRIOR_EM"], weighted,
               meta["DISTILL_ALL"], _device_index(dev))
        per_sm = _OCCUPANCY.get(key) or PROGRAMS_PER_SM
        if not per_sm:
            probe = torch.empty((1, LOSS_SLOTS), device=dev, dtype=acc)
            per_sm = _programs_per_sm(_rows_kernel, key, (z_l, y, z_w, z_s, adj_l, adj_u, tgt,
                                                          hp, step, wt, probe, probe, mask,
                                                          pseudo_labels, grad_lb, grad_ulb_s,
                                                          *tail), meta, dev)
        nprog = max(1, min(tiles, per_sm * _sm_count(dev)))
    loss_part = torch.empty((nprog, LOSS_SLOTS), device=dev, dtype=acc)
    prior_part = torch.empty((nprog, c), device=dev, dtype=acc)
    _rows_kernel[(nprog,)](z_l, y, z_w, z_s, adj_l, adj_u, tgt, hp, step, wt, loss_part,
                           prior_part, mask, pseudo_labels, grad_lb, grad_ulb_s, *tail, **meta)
    return mask, pseudo_labels, grad_lb, grad_ulb_s, loss_part, prior_part, nprog


def _device_ctx(dev: torch.device):
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def flexda_fwd_triton(logits_lb: torch.Tensor, labels_lb: torch.Tensor,
                      logits_ulb_w: torch.Tensor, logits_ulb_s: torch.Tensor,
                      adj_lb: torch.Tensor, adj_ulb: torch.Tensor, hparams: torch.Tensor,
                      threshold: float, prior_weight=None, distill_all: bool = False):
    """Kernel of `adello::flexda_fwd_triton` (schema in adello_kernels/ops/flexda.py).
    `prior_weight` [N] (or None): the per-row weights of the batch prior (the WEIGHTED
    specialisation of both kernels). `distill_all`: every row distils when the gate is on (the
    DISTILL_ALL specialisation of the row kernel)."""
    b, n, c = _check_logits(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s)
    for name, v, size in (("adj_lb", adj_lb, c), ("adj_ulb", adj_ulb, c),
                          ("hparams", hparams, _flexda.NUM_HPARAMS)):
        if v.shape != (size,):
            raise ValueError(f"{name}: expected shape ({size},), got {tuple(v.shape)}")
    dev = logits_lb.device
    dtype = logits_lb.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    z_l, z_w, z_s = logits_lb.contiguous(), logits_ulb_w.contiguous(), logits_ulb_s.contiguous()
    y = labels_lb.to(torch.int64).contiguous()
    ds, du = adj_lb.to(acc).contiguous(), adj_ulb.to(acc).contiguous()
    hp = hparams.to(acc).contiguous()
    wt = _prior_weights(prior_weight, n, dev, acc)

    loss = torch.empty((), device=dev, dtype=acc)
    terms = torch.empty(3, device=dev, dtype=acc)
    prior_batch = torch.empty(c, device=dev, dtype=acc)
    with _device_ctx(dev):
        mask, pseudo_labels, grad_lb, grad_ulb_s, loss_part, prior_part, nprog = _launch_rows(
            z_l, y, z_w, z_s, ds, du, du, hp, hp, b, n, c, threshold, (1, 1, 0, 0, 0, 0, 0, 0),
            ADJ_LOADED.value, False, acc, prior_weight=wt, distill_all=bool(distill_all))
        _finalize_kernel[(triton.cdiv(c, FIN_BLOCK_C),)](
            loss_part, prior_part, hp, hp, hp, hp, loss, terms[0], terms[1], terms[2],
            prior_batch, nprog, b, n, c, 0, 0, 0, 0,
            BLOCK_P=FIN_BLOCK_P, BLOCK_C=FIN_BLOCK_C, STEP=False, UPDATE=False,
            WEIGHTED=wt is not None, wt_ptr=wt, num_warps=FIN_NUM_WARPS)
    return loss, terms, mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s


def _prior_weights(prior_weight, n, dev, acc):
    """The [N] prior weights as the row kernel reads them (contiguous, acc dtype), or None.
    Metadata checks only (no device access): finite and >= 0 is the caller's contract
    (functional.check_prior_weight); the kernels leave out every weight that is not > 0."""
    if prior_weight is None:
        return None
    if prior_weight.shape != (n,) or not prior_weight.dtype.is_floating_point:
        raise ValueError(f"prior_weight: expected a float [{n}] tensor, got {prior_weight.dtype} "
                         f"{tuple(prior_weight.shape)}")
    if prior_weight.device != dev:
        raise ValueError(f"prior_weight: on {prior_weight.device}, the logits on {dev}")
    return prior_weight.detach().to(acc).contiguous()


def _check_state(prior_lb, prior_ulb, step, skipped_updates, temperature, c, dev):
    for name, v in (("prior_lb", prior_lb), ("prior_ulb", prior_ulb)):
        if v.shape != (c,) or not v.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a float [{c}] tensor, got {v.dtype} "
                             f"{tuple(v.shape)}")
        if v.device != dev:
            raise ValueError(f"{name}: on {v.device}, the logits on {dev}")
    if not prior_ulb.is_contiguous():
        raise ValueError("prior_ulb: must be contiguous (it is updated in place)")
    if prior_ulb.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"prior_ulb: expected float32 (or float64), got {prior_ulb.dtype}")
    for name, v in (("step", step), ("skipped_updates", skipped_updates)):
        if v.numel() != 1 or v.dtype != torch.int64 or v.device != dev:
            raise ValueError(f"{name}: expected a 0-d int64 tensor on {dev}, got {v.dtype} "
                             f"{tuple(v.shape)} on {v.device}")
    if temperature.numel() != 1 or not temperature.dtype.is_floating_point \
            or temperature.device != dev:
        raise ValueError(f"temperature: expected a 0-d float tensor on {dev}")


def flexda_step_triton_kernel(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb,
                              prior_ulb, step, skipped_updates, temperature, total_steps: int,
                              alpha_min: float, power: float, distill_start: int,
                              lambda_u: float, lambda_d: float, eps: float, flexda: bool,
                              threshold: float, prior_momentum: float, update: bool,
                              prior_em: bool = False, prior_target=None,
                              alpha_epoch_steps: int = 1, prior_weight=None,
                              distill_all: bool = False):
    """Kernel of `adello::flexda_step_triton` (schema and semantics: ops/step.py): two launches,
    torch.empty allocations besides; `prior_ulb`, `step`, `skipped_updates` updated in place
    when `update`. `prior_em` selects the EM batch prior (a constexpr of the row kernel); the
    epilogue updates Q with whichever prior_batch the rows gave. `prior_target` (or Q when
    None) is the prior the target Qa is flattened from; alpha advances once every
    `alpha_epoch_steps` steps. `prior_weight` [N] (or None) weights the rows of the batch prior
    (the WEIGHTED specialisation of both kernels); all weights 0: Q and skipped_updates are left
    as they are and only the step advances. `distill_all`: every row distils once the gate is
    on (the DISTILL_ALL specialisation of the row kernel)."""
    b, n, c = _check_logits(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s)
    dev = logits_lb.device
    _check_state(prior_lb, prior_ulb, step, skipped_updates, temperature, c, dev)
    if labels_lb.dtype != torch.int64:
        raise ValueError(f"labels_lb: expected int64, got {labels_lb.dtype}")
    if isinstance(total_steps, bool) or int(total_steps) <= 0:
        raise ValueError(f"total_steps: expected a positive int, got {total_steps!r}")
    if isinstance(alpha_epoch_steps, bool) or not 1 <= int(alpha_epoch_steps) <= int(total_steps):
        raise ValueError(f"alpha_epoch_steps: expected an int in [1, total_steps], got "
                         f"{alpha_epoch_steps!r}")
    if prior_target is not None and (prior_target.shape != (c,) or prior_target.device != dev
                                     or not prior_target.dtype.is_floating_point):
        raise ValueError(f"prior_target: expected a [{c}] float tensor on {dev}")
    dtype = logits_lb.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    wt = _prior_weights(prior_weight, n, dev, acc)
    # contiguous() returns the tensor itself when it already is (ADELLOLoss's row slices are);
    # only a strided input is copied.
    z_l, z_w, z_s = logits_lb.contiguous(), logits_ulb_w.contiguous(), logits_ulb_s.contiguous()
    y = labels_lb.contiguous()
    p_l = prior_lb.contiguous()
    new = dict(device=dev, dtype=acc)
    loss, loss_sup, loss_unsup, loss_distill = (torch.empty((), **new) for _ in range(4))
    prior_batch = torch.empty(c, **new)
    scalars = (int(total_steps), int(alpha_epoch_steps), _f64_bits(alpha_min), _f64_bits(power),
               int(distill_start),
               _f64_bits(lambda_u), _f64_bits(lambda_d), _f64_bits(eps))
    with _device_ctx(dev):
        mask, pseudo_labels, grad_lb, grad_ulb_s, loss_part, prior_part, nprog = _launch_rows(
            z_l, y, z_w, z_s, p_l, prior_ulb,
            prior_ulb if prior_target is None else prior_target.contiguous(), temperature, step,
            b, n, c, threshold, scalars,
            (ADJ_PRIORS if flexda else ADJ_ZERO).value, True, acc, bool(prior_em),
            prior_weight=wt, distill_all=bool(distill_all))
        _finalize_kernel[(triton.cdiv(c, FIN_BLOCK_C),)](
            loss_part, prior_part, temperature, step, skipped_updates, prior_ulb, loss,
            loss_sup, loss_unsup, loss_distill, prior_batch, nprog, b, n, c,
            _f64_bits(lambda_u), _f64_bits(lambda_d), int(distill_start),
            _f64_bits(prior_momentum), BLOCK_P=FIN_BLOCK_P, BLOCK_C=FIN_BLOCK_C, STEP=True,
            UPDATE=bool(update), WEIGHTED=wt is not None, wt_ptr=wt,
            num_warps=FIN_NUM_WARPS)
    return (loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels, prior_batch, grad_lb,
            grad_ulb_s)


def scale_grads_triton_(grad_lb: torch.Tensor, grad_ulb_s: torch.Tensor,
                        grad_loss: torch.Tensor) -> None:
    """grad_lb *= grad_loss and grad_ulb_s *= grad_loss in place, one launch for both (None or
    an empty tensor is skipped); returns at once on the device when grad_loss is exactly 1."""
    a = grad_lb if grad_lb is not None and grad_lb.numel() else None
    b = grad_ulb_s if grad_ulb_s is not None and grad_ulb_s.numel() else None
    if a is None and b is None:
        return
    if a is not None and b is not None and a.dtype != b.dtype:
        raise ValueError("grad_lb, grad_ulb_s: must have one dtype")
    first = a if a is not None else b
    n_a = a.numel() if a is not None else 0
    n_b = b.numel() if b is not None else 0
    blocks = triton.cdiv(n_a, SCALE_BLOCK) + triton.cdiv(n_b, SCALE_BLOCK)
    dev = first.device
    if INTERPRETED or dev.type != "cuda":
        nprog = min(blocks, INTERPRETER_PROGRAMS)
    else:
        nprog = min(blocks, SCALE_PROGRAMS_PER_SM * _sm_count(dev))
    with _device_ctx(dev):
        _scale_kernel[(nprog,)](first if a is None else a, first if b is None else b, grad_loss,
                                n_a, n_b, BLOCK=SCALE_BLOCK, num_warps=SCALE_NUM_WARPS)


# ---------------------------------------------------------------------------------------------
# Autograd of adello::flexda_step_triton
# ---------------------------------------------------------------------------------------------

_STEP_OP = torch.ops.adello.flexda_step_triton.default
_STATE_ARGS = (5, 6, 7)        # prior_ulb, step, skipped_updates: mutated when `update`
_UPDATE_ARG = 19
_FIRST_ORDER_ONLY = ("adello::flexda_step_triton: the fused kernels give first-order gradients "
                     "only; for create_graph=True (higher-order gradients) use "
                     "backend='reference'")


def _plain_eager(grad_loss: torch.Tensor) -> bool:
    """An ordinary tensor outside any tracing, the graph not retained: the saved gradients may be
    scaled in place and handed on (they are released after this backward)."""
    return (type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()
            and not torch._C._autograd._get_current_graph_task_keep_graph())


class FlexdaStepTriton(torch.autograd.Function):
    """The autograd of adello::flexda_step_triton as a plain autograd.Function (what
    `flexda_step_triton` calls, and what the op's Autograd kernel below applies).

    Only `loss` is differentiable: the forward writes dloss/dlogits_lb and dloss/dlogits_ulb_s,
    the backward scales them by the incoming grad. Plain eager, graph not retained: in place,
    one `_scale_kernel` launch, and the saved tensors are handed on as the input gradients (no
    copy: they are released after this backward). retain_graph or tracing: fresh products, so a
    later backward reads the same saved values. create_graph=True raises: the saved gradients
    are values, a second derivative through them would be silently 0."""

    @staticmethod
    def forward(ctx, *args):
        if torch.compiler.is_compiling():
            out = _STEP_OP(*args)
        else:
            # Straight to the kernel: the op's own Autograd kernel would only redispatch.
            with torch._C._AutoDispatchBelowAutograd():
                out = _STEP_OP(*args)
            if args[_UPDATE_ARG]:
                # The kernel writes the state behind autograd's back (no ADInplaceOrView kernel
                # for this op): bump the version counters as an in-place op would, so that a
                # graph that saved one of them notices.
                for i in _STATE_ARGS:     # one at a time: older torch takes one tensor
                    torch.autograd.graph.increment_version(args[i])
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)  # no zero tensors for the non-differentiable outputs
        ctx.save_for_backward(out[7], out[8])
        return out

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        # one gradient slot per forward argument: 25, or fewer from a caller that left out
        # the trailing prior_em, prior_target, alpha_epoch_steps, prior_weight, distill_all
        # (their schema defaults); prior_weight gets none (the losses do not depend on it)
        nargs = len(ctx.needs_input_grad)
        if grad_loss is None:
            return (None,) * nargs
        if torch.is_grad_enabled():
            raise RuntimeError(_FIRST_ORDER_ONLY)
        grad_lb, grad_ulb_s = ctx.saved_tensors
        need_lb, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        if _plain_eager(grad_loss):
            scale_grads_triton_(grad_lb if need_lb else None, grad_ulb_s if need_s else None,
                                grad_loss)
            g_lb = grad_lb.detach() if need_lb else None
            g_s = grad_ulb_s.detach() if need_s else None
        else:
            g_lb = grad_lb * grad_loss.to(grad_lb.dtype) if need_lb else None
            g_s = grad_ulb_s * grad_loss.to(grad_ulb_s.dtype) if need_s else None
        return (g_lb, None, None, g_s) + (None,) * (nargs - 4)


def flexda_step_triton(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb, prior_ulb,
                       step, skipped_updates, temperature, total_steps, alpha_min, power,
                       distill_start, lambda_u, lambda_d, eps, flexda, threshold,
                       prior_momentum, update, prior_em=False, prior_target=None,
                       alpha_epoch_steps=1, prior_weight=None, distill_all=False):
    """One whole ADELLOLoss training step on the Triton kernels (arguments and outputs: the
    schema of adello::flexda_step in ops/step.py), differentiable w.r.t. logits_lb and
    logits_ulb_s through `loss`. Forward: two launches; backward: one; no host sync."""
    return FlexdaStepTriton.apply(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb,
                                  prior_ulb, step, skipped_updates, temperature, total_steps,
                                  alpha_min, power, distill_start, lambda_u, lambda_d, eps,
                                  flexda, threshold, prior_momentum, update, bool(prior_em),
                                  prior_target, int(alpha_epoch_steps), prior_weight,
                                  bool(distill_all))


def _step_autograd_kernel(*args):
    """Autograd-key kernel of the op (direct torch.ops.adello.flexda_step_triton calls):
    torch.library.register_autograd refuses mutating ops, so the Function is applied here. With
    nothing to differentiate (grad mode off, as inside the Function's own forward, or no logits
    requiring grad) it only redispatches below autograd."""
    if torch.is_grad_enabled() and (args[0].requires_grad or args[3].requires_grad):
        return FlexdaStepTriton.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return _STEP_OP(*args)


def is_usable() -> bool:
    """True when the kernels can run in this process: on CUDA tensors, or on CPU tensors when the
    kernels were built by Triton's interpreter (TRITON_INTERPRET=1 before this module's import)."""
    return INTERPRETED or torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------
# Registration (at import): the CUDA key always (every adello:: op needs a CUDA kernel), the CPU
# key too when the kernels are interpreted; the step's Autograd kernel.
# ---------------------------------------------------------------------------------------------
torch.library.register_kernel("adello::flexda_fwd_triton", "cuda", flexda_fwd_triton)
torch.library.register_kernel("adello::flexda_step_triton", "cuda", flexda_step_triton_kernel)
if INTERPRETED:
    torch.library.register_kernel("adello::flexda_fwd_triton", "cpu", flexda_fwd_triton)
    torch.library.register_kernel("adello::flexda_step_triton", "cpu", flexda_step_triton_kernel)
_lib = torch.library.Library("adello", "IMPL")  # kept alive for the process
_lib.impl("flexda_step_triton", _step_autograd_kernel, "Autograd")
