"""One optimizer step of the training driver, in three forms that compute the same thing:

    eager        plain PyTorch (the default)
    compile      `--compile step`: the views (gather + weak/strong augmentation + normalise),
                 the forward and the ADELLOLoss step of each micro-batch as one
                 `torch.compile(fullgraph=True)` graph, its backward compiled with it
                 (AOTAutograd); SGD (fused on CUDA) and the EMA stay multi-tensor kernels
    cuda graph   `--cuda-graph`: the whole step (views, forward, loss, backward of every
                 micro-batch, the optimizer and the EMA) captured once and replayed

A step draws the global batch's indices and augmentation parameters eagerly from the private
generators in every form (a few small kernels), so all three see the same batches and views,
and a resumed or DDP run draws exactly what the uninterrupted one-process run draws. With
`grad_accum` K the global batch is cut into K micro-batches (after the DDP rank's slice);
ADELLOLoss is called with update=False on all but the last, so alpha, the prior and the step
advance once per optimizer step; each micro-batch's loss is divided by K, the mean of equal
micro-batches' means being the batch's mean; under DDP the gradient all-reduce runs on the last
micro-batch only. BatchNorm normalises each micro-batch with its own statistics (as each DDP
rank does without --sync-bn).

In compiled and captured steps RandAugment runs every operation on the whole batch and keeps
the drawn one (`augment.randaugment(subset=False)`: no data-dependent shapes); the images are
the same as the eager CPU step's per-operation subsets. The learning rate of a captured step
is a device tensor refilled from a device table before each replay (fused SGD reads it there);
the eager and compiled steps set the optimizer's float lr between steps, outside any graph, so
a changing lr never recompiles. The EMA decay is constant within a run.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from ..ops.state import momentum_update
from . import augment

PHASES = ("sample_augment", "forward_backward", "optimizer_ema")


class StepRunner:
    """Runs `Trainer`'s optimizer steps (`tr` is the trainer; its model, EMA, optimizer,
    criterion, data, generators and log accumulator are used in place)."""

    def __init__(self, tr, *, nan_at: int = 0, stall=None):
        self.tr = tr
        cfg = tr.cfg
        self.k = cfg["grad_accum"]
        self.supervised = tr.crit is None
        self.compiled = cfg["compile"] == "step"
        self.use_graph = bool(cfg["cuda_graph"])
        self.phase_timing = bool(cfg["phase_timing"])
        self.phase_s = [0.0, 0.0, 0.0]
        self.nan_at, self.stall = nan_at, stall
        # Rows of one micro-batch on this rank, and where this rank's share starts.
        self.bm, self.nm = tr.b // self.k, tr.n // self.k
        self.subset = None if not (self.compiled or self.use_graph) else False
        self.sched = tr.schedule
        self._lr_set = None
        if self.compiled:
            # One graph per (update, pending rows) of the criterion: K micro-batches need K.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                        2 * self.k + 4)
            opts = dict(fullgraph=True, dynamic=False)
            if self.phase_timing:
                self.views = torch.compile(self._views, **opts)
                self.fwd = torch.compile(self._forward_loss, **opts)
            else:
                self.micro = torch.compile(self._micro, **opts)
        self.graph = None
        if self.use_graph:
            if tr.device.type != "cuda":
                raise ValueError("--cuda-graph: needs a CUDA device (this run is on "
                                 f"{tr.device.type})")
            if tr.dist.active:
                raise ValueError("--cuda-graph: not supported under DDP (run one process per "
                                 "GPU without --cuda-graph)")
            if self.phase_timing:
                raise ValueError("--phase-timing: cannot split a captured step; drop "
                                 "--cuda-graph or --phase-timing")

    # -- the pieces ---------------------------------------------------------------------------

    def draw(self) -> tuple:
        """Indices and augmentation parameters of the global batch (identical on every rank),
        in the order the generators have always been read."""
        tr = self.tr
        h, w = tr.data.image_shape[1:]
        lb_sel = tr.lb_sampler.next(tr.b_global)
        p_l = augment.sample_weak(tr.b_global, h, w, tr.gen_aug)
        if self.supervised:
            return lb_sel, p_l, None, None, None
        ulb_sel = tr.ulb_sampler.next(tr.n_global)
        p_w = augment.sample_weak(tr.n_global, h, w, tr.gen_aug)
        p_s = augment.sample_strong(tr.n_global, h, w, tr.gen_aug)
        return lb_sel, p_l, ulb_sel, p_w, p_s

    def micro_slices(self, drawn: tuple, k: int) -> tuple:
        """Micro-batch k of this rank's share of the drawn global batch."""
        tr = self.tr
        lb_sel, p_l, ulb_sel, p_w, p_s = drawn
        b0 = tr.dist.rank * tr.b + k * self.bm
        out = [lb_sel[b0:b0 + self.bm], augment.slice_params(p_l, b0, b0 + self.bm)]
        if self.supervised:
            return tuple(out) + (None, None, None)
        n0 = tr.dist.rank * tr.n + k * self.nm
        return tuple(out) + (ulb_sel[n0:n0 + self.nm],
                             augment.slice_params(p_w, n0, n0 + self.nm),
                             augment.slice_params(p_s, n0, n0 + self.nm))

    def _views(self, lb_sel, p_l, ulb_sel, p_w, p_s, poison: bool = False):
        """Normalised cat(labeled weak, unlabeled weak, unlabeled strong), labels, true labels."""
        d = self.tr.data
        x_lb = augment.apply_weak(d.images[d.lb_pos[lb_sel]], p_l)
        y_lb = d.lb_labels[lb_sel]
        parts = [x_lb.float()]
        y_true = None
        if ulb_sel is not None:
            raw = d.images[d.ulb_pos[ulb_sel]]
            parts.append(augment.apply_weak(raw, p_w).float())
            parts.append(augment.apply_strong(raw, p_s, subset=self.subset))
            y_true = d.ulb_labels[ulb_sel]
        x = d.normalize(torch.cat(parts))
        if poison:
            x = x * float("nan")
        return x, y_lb, y_true

    def _forward_loss(self, x, y_lb, y_true, update: bool):
        """(loss, [9] float64 logged values) of one micro-batch."""
        tr = self.tr
        with torch.autocast(tr.device.type, dtype=torch.bfloat16, enabled=tr.amp):
            logits = tr.net(x)
        if y_true is None:
            loss = F.cross_entropy(logits.float(), y_lb)
            zero = torch.zeros((), device=x.device)
            stats = [loss.detach()] + [zero] * 8
        else:
            z_l, z_w, z_s = logits.split([self.bm, self.nm, self.nm])
            out = tr.crit(z_l, y_lb, z_w.detach(), z_s, update=update)
            loss = out.loss
            if tr.prior_raw is not None and update:  # the raw estimator beside Q (trainer.py)
                raw = torch.softmax(z_w.detach().float(), -1).mean(0)
                tr.prior_raw.copy_(momentum_update(tr.prior_raw, raw, tr.crit.prior_momentum)[0])
            known = (y_true >= 0).to(out.mask.dtype)
            hit = (out.pseudo_labels == y_true).to(out.mask.dtype)
            stats = [loss.detach(), out.loss_sup, out.loss_unsup, out.loss_distill,
                     out.mask.mean(), (hit * out.mask).sum(), (known * out.mask).sum(),
                     hit.sum(), known.sum()]
        return loss, torch.stack([s.to(torch.float64) for s in stats])

    def _micro(self, lb_sel, p_l, ulb_sel, p_w, p_s, update: bool, poison: bool = False):
        x, y_lb, y_true = self._views(lb_sel, p_l, ulb_sel, p_w, p_s, poison)
        return self._forward_loss(x, y_lb, y_true, update)

    def _sync(self) -> None:
        if self.tr.device.type == "cuda":
            torch.cuda.synchronize(self.tr.device)

    def _tick(self, t: float, i: int) -> float:
        self._sync()
        now = time.perf_counter()
        self.phase_s[i] += now - t
        return now

    # -- the step ------------------------------------------------------------------------------

    def _body(self, drawn: tuple, poison: bool = False, t: float | None = None) -> None:
        """Everything after the draw: micro-batches, backward, optimizer, EMA, log values."""
        tr = self.tr
        if tr.skip_nonfinite:
            torch._foreach_copy_(tr._bn_saved, tr._bn_buffers)
        tr.opt.zero_grad(set_to_none=True)
        vals = None
        for k in range(self.k):
            last = k == self.k - 1
            args = self.micro_slices(drawn, k)
            ddp = getattr(tr, "_ddp", None)
            ctx = ddp.no_sync() if (ddp is not None and not last) else contextlib.nullcontext()
            with ctx:
                if self.phase_timing:
                    x, y_lb, y_true = (self.views if self.compiled else self._views)(
                        *args, poison)
                    t = self._tick(t, 0)
                    loss, v = (self.fwd if self.compiled else self._forward_loss)(
                        x, y_lb, y_true, last)
                else:
                    loss, v = (self.micro if self.compiled else self._micro)(*args, last, poison)
                (loss if self.k == 1 else loss / self.k).backward()
                if self.phase_timing:
                    t = self._tick(t, 1)
            vals = v if vals is None else vals + v
        if self.k > 1:
            # Losses and the mask ratio are means over the step; the pseudo-label counts, sums.
            scale = torch.ones_like(vals)
            scale[:5] = 1.0 / self.k
            vals = vals * scale
        loss_ok = torch.isfinite(vals[0])
        if tr.skip_nonfinite:
            # DDP has all-reduced the gradients, so every rank takes the same decision.
            grads = [p.grad for p in tr.model.parameters() if p.grad is not None]
            g_ok = torch.isfinite(torch.stack(torch._foreach_norm(grads, math.inf))).all()
            skip = ~(g_ok if tr.dist.active else g_ok & loss_ok)
            tr.opt.found_inf = skip.float()
            tr.opt.step()
            for b, old in zip(tr._bn_buffers, tr._bn_saved):
                b.copy_(torch.where(skip, old, b))
        else:
            skip = torch.zeros((), dtype=torch.bool, device=tr.device)
            tr.opt.step()
        tr.ema.update()
        # Logged values stay on the device; read every log_every steps (no per-step sync).
        tr._log_acc += torch.cat([torch.where(loss_ok, vals, 0.0),
                                  torch.stack([loss_ok, ~loss_ok, skip]).to(torch.float64)])
        if self.phase_timing:
            self._tick(t, 2)

    def step(self) -> None:
        tr = self.tr
        if not self.sched.lr_constant and self.graph is None:
            lr = self.sched.lr_at(tr.step)
            if lr != self._lr_set:
                for g in tr.opt.param_groups:
                    g["lr"] = lr
                self._lr_set = lr
        if self.use_graph:
            self._graph_step()
        else:
            t = time.perf_counter()
            if self.phase_timing:
                self._sync()
                t = time.perf_counter()
            drawn = self.draw()
            poison = bool(self.nan_at) and tr.step + 1 == self.nan_at
            if self.stall and int(self.stall[0]) == tr.dist.rank and \
                    tr.step + 1 == int(self.stall[1]):
                time.sleep(self.stall[2])
            self._body(drawn, poison, t)
        tr._log_steps += 1
        tr.step += 1

    # -- CUDA graph -------------------------------------------------------------------------

    def _state_tensors(self) -> list[torch.Tensor]:
        tr = self.tr
        ts = list(tr.model.parameters()) + list(tr.model.buffers()) + \
            list(tr.ema.module.parameters()) + list(tr.ema.module.buffers()) + [tr._log_acc]
        for st in tr.opt.state.values():
            ts += [t for t in st.values() if isinstance(t, torch.Tensor)]
        if tr.crit is not None:
            ts += list(tr.crit.buffers())
        return ts

    def _capture(self) -> None:
        """Record the step once: warm up on a side stream (allocations, lazy state, autotuning),
        put every tensor, generator and sampler back as it was, then capture."""
        tr = self.tr
        gens = (tr.gen_data.get_state(), tr.gen_aug.get_state())
        samplers = (tr.lb_sampler.state_dict(), tr.ulb_sampler.state_dict())
        self.static = self.draw()
        with torch.no_grad():
            for p in tr.model.parameters():      # momentum buffers must exist before capture
                st = tr.opt.state[p]
                if tr.cfg["momentum"] > 0 and st.get("momentum_buffer") is None:
                    st["momentum_buffer"] = torch.zeros_like(p)
        # Fused SGD reads a device lr: refilled from the table before each replay.
        self._lr_dev = torch.tensor(self.sched.lr_table() if not self.sched.lr_constant
                                    else [self.sched.lr], dtype=torch.float32, device=tr.device)
        self._lr_t = self._lr_dev[0].clone()
        for g in tr.opt.param_groups:
            g["lr"] = self._lr_t
        saved = [t.detach().clone() for t in self._state_tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._body(self.static)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            torch._foreach_copy_(self._state_tensors(), saved)
        del saved
        tr.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body(self.static)
        tr.gen_data.set_state(gens[0])
        tr.gen_aug.set_state(gens[1])
        tr.lb_sampler.load_state_dict(samplers[0])
        tr.ulb_sampler.load_state_dict(samplers[1])

    def _graph_step(self) -> None:
        if self.graph is None:
            self._capture()
        tr = self.tr
        fresh = self.draw()
        with torch.no_grad():
            for dst, src in zip(self.static, fresh):
                if dst is None:
                    continue
                if isinstance(dst, dict):
                    for key in dst:
                        dst[key].copy_(src[key])
                else:
                    dst.copy_(src)
            if not self.sched.lr_constant:
                self._lr_t.copy_(self._lr_dev[min(tr.step, self._lr_dev.numel() - 1)])
        self.graph.replay()
