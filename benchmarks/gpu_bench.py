"""The Python phases of benchmarks/gpu_check.sh, one subcommand each, each writing one JSON
fragment (so a phase that times out loses only its own numbers):

    python3 benchmarks/gpu_bench.py env        --json F   versions, device, the APIs relied on
    python3 benchmarks/gpu_bench.py bandwidth  --json F   fused forward / step GB/s at B=N=65536,
                                                          C=1000 (fp32, bf16) vs copy bandwidth
    python3 benchmarks/gpu_bench.py steps      --json F   imagenet127 step: eager / compile /
                                                          triton / cuda (fp32, bf16), ratios
    python3 benchmarks/gpu_bench.py graph      --json F   CUDA-graph-replayed ADELLOLoss step
    python3 benchmarks/gpu_bench.py launches   --json F   profiler kernel count per step; the
                                                          host-sync check (sync debug mode)
    python3 benchmarks/gpu_bench.py memcheck   --json F   tiny steps of every regime, to run
                                                          under compute-sanitizer
    python3 benchmarks/gpu_bench.py registers  --json F   registers / spills / occupancy / grid
    python3 benchmarks/gpu_bench.py sweep      --json F   the Triton step's launch heuristics at
                                                          the bandwidth shape (tuning data)
    python3 benchmarks/gpu_bench.py summary    --dir D    merges D/*.json into D/gpu_check.json,
                                                          prints the final table

`--cpu-smoke` runs a subcommand on CPU with tiny shapes (Triton under TRITON_INTERPRET=1, which
must be set by the caller), so that syntax and API errors show up without a GPU; the numbers
are meaningless then. Bandwidth counts compulsory bytes only: read z_l, z_w, z_s once, write the
two gradients once.
"""
from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

SMOKE = False
JSON_PATH = None   # where the running phase writes its result, also after each row


def _save(result: dict) -> dict:
    """Write the phase's result so far: a phase killed by its timeout keeps the rows it has."""
    if JSON_PATH:
        with open(JSON_PATH, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def _device() -> str:
    return "cpu" if SMOKE else "cuda"


def _sync():
    if not SMOKE:
        torch.cuda.synchronize()


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call (CUDA events on a GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    _sync()
    if SMOKE:
        iters = 2
    times = []
    for _ in range(iters):
        if SMOKE:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_gbs() -> float:
    n = (1 << 28) if not SMOKE else (1 << 20)
    src = torch.empty(n, device=_device()).uniform_()
    dst = torch.empty_like(src)
    t = min(timed(lambda: dst.copy_(src), 10) for _ in range(3))
    return 2 * n * 4 / t / 1e9


def _dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _inputs(b, n, c, dtype, seed=0, grad=False):
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(seed)
    z_l = (torch.randn(b, c, device=dev, generator=g) * 4).to(dtype)
    z_w = (torch.randn(n, c, device=dev, generator=g) * 4).to(dtype)
    z_s = (torch.randn(n, c, device=dev, generator=g) * 4).to(dtype)
    y = torch.randint(0, c, (b,), device=dev, generator=g)
    if grad:
        z_l.requires_grad_()
        z_s.requires_grad_()
    return z_l, y, z_w, z_s


def _state(c):
    dev = _device()
    p = torch.rand(c, device=dev) + 0.05
    q = torch.rand(c, device=dev) + 0.05
    return (p / p.sum(), q / q.sum(), torch.tensor(100, device=dev),
            torch.zeros((), dtype=torch.int64, device=dev), torch.tensor(1.0, device=dev))


STEP_SCALARS = dict(total_steps=262_144, alpha_min=0.1, power=2.0, distill_start=0,
                    lambda_u=1.0, lambda_d=1.0, eps=1e-9, flexda=True, threshold=0.95,
                    prior_momentum=0.999)


def _step_call(inputs, state, update=False, fn=None):
    from adello_kernels.ops import flexda_triton as ft
    p_l, q, t, k, temp = state
    fn = fn or ft.flexda_step_triton
    kw = STEP_SCALARS
    return fn(*inputs, p_l, q, t, k, temp, kw["total_steps"], kw["alpha_min"], kw["power"],
              kw["distill_start"], kw["lambda_u"], kw["lambda_d"], kw["eps"], kw["flexda"],
              kw["threshold"], kw["prior_momentum"], update)


def _bandwidth_shape():
    return (64, 64, 100) if SMOKE else (65536, 65536, 1000)


# ---------------------------------------------------------------------------------------------

def _has_tie_break_left() -> bool:
    """tl.max's keyword (its signature is hidden behind Triton's decorators: read the source)."""
    import inspect

    import triton.language.standard as std
    try:
        return "return_indices_tie_break_left" in inspect.getsource(std)
    except (OSError, TypeError):
        return False


def cmd_env(args) -> dict:
    import triton
    import triton.language as tl
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm=f"{p.major}{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    regs_per_sm=getattr(p, "regs_per_multiprocessor", None),
                    shared_per_sm=getattr(p, "shared_memory_per_multiprocessor", None))
    # The APIs the kernels and their glue rely on (a missing one names itself here).
    apis = {
        "triton.knobs.runtime.interpret": hasattr(getattr(triton, "knobs", None), "runtime"),
        "tl.debug_barrier": hasattr(tl, "debug_barrier"),
        "tl.max return_indices_tie_break_left": _has_tie_break_left(),
        "JITFunction.warmup": hasattr(triton.JITFunction, "warmup"),
        "torch.library.register_kernel": hasattr(torch.library, "register_kernel"),
        "torch.library.register_fake": hasattr(torch.library, "register_fake"),
        "torch.library.opcheck": hasattr(torch.library, "opcheck"),
        "torch._C._AutoDispatchBelowAutograd": hasattr(torch._C, "_AutoDispatchBelowAutograd"),
        "torch.autograd.graph.increment_version":
            hasattr(torch.autograd.graph, "increment_version"),
        "_get_current_graph_task_keep_graph":
            hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph"),
        "torch.cuda.set_sync_debug_mode": hasattr(torch.cuda, "set_sync_debug_mode"),
    }
    info["apis"] = apis
    import adello_kernels as ak
    info["available_backends"] = ak.available_backends()
    for k, v in info.items():
        print(f"{k}: {v}")
    missing = [k for k, v in apis.items() if not v]
    if missing:
        print("MISSING APIs:", missing)
    return info


def _fwd_fns(dtype, b, n, c):
    """Forward-only callables at (b, n, c): the Triton row op, the Triton step (update=False),
    and the CUDA row op when built."""
    import adello_kernels as ak
    from adello_kernels.ops import flexda_triton as ft
    from adello_kernels.ops.flexda import HP_PRIOR_EM, NUM_HPARAMS
    z = _inputs(b, n, c, dtype)
    state = _state(c)
    ds = torch.zeros(c, device=_device())
    hp = torch.ones(NUM_HPARAMS, device=_device())
    hp[HP_PRIOR_EM] = 0.0                       # the raw prior estimator
    fns = {"triton:fwd": lambda: ft.flexda_fwd_triton(*z, ds, ds, hp, 0.95),
           "triton:step-fwd": lambda: _step_call(z, state)}
    if "cuda" in ak.available_backends():
        op = torch.ops.adello.flexda_fwd.default
        fns["cuda:fwd"] = lambda: op(*z, ds, ds, hp, 0.95)
    return fns


def cmd_bandwidth(args) -> dict:
    b, n, c = _bandwidth_shape()
    cp = copy_gbs()
    rows = []
    result = {"shape": [b, n, c], "copy_gbs": cp, "rows": rows}
    for dname in ("fp32", "bf16"):
        dtype = _dtype(dname)
        nbytes = dtype.itemsize * c * (2 * b + 3 * n)
        for name, fn in _fwd_fns(dtype, b, n, c).items():
            t = timed(fn)
            row = {"dtype": dname, "provider": name, "ms": t * 1e3, "gbs": nbytes / t / 1e9,
                   "pct_copy": 100 * nbytes / t / 1e9 / cp}
            rows.append(row)
            _save(result)
            print(json.dumps(row), flush=True)
        if not SMOKE:
            torch.cuda.empty_cache()
    return result


def _time_round_robin(fns: dict, rounds: int) -> dict:
    """{name: median seconds}; one timing block of each in turn per round."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    _sync()
    samples = {k: [] for k in fns}
    for _ in range(2 if SMOKE else rounds):
        for k, fn in fns.items():
            samples[k].append(timed(fn, iters=5 if SMOKE else 20, warmup=0))
    return {k: statistics.median(v) for k, v in samples.items()}


def cmd_steps(args) -> dict:
    import providers as P
    shape = P.Shape("tiny", 8, 16, 10) if SMOKE else P.SHAPES["imagenet127"]
    avail = P.providers_for(_device()) if not SMOKE else ["eager", "triton"]
    wanted = [p for p in ("eager", "compile", "triton", "cuda") if p in avail]
    rows = []
    result = {"shape": [shape.b, shape.n, shape.c], "rows": rows}
    for dname in ("fp32", "bf16"):
        fns = {}
        for prov in wanted:
            try:
                fns[prov] = P.make_step(prov, shape, _device(), _dtype(dname))
            except Exception as exc:  # noqa: BLE001  one provider failing must not hide the rest
                rows.append({"dtype": dname, "provider": prov, "error": repr(exc)[:300]})
        times = _time_round_robin(fns, args.rounds)
        for prov, t in times.items():
            row = {"dtype": dname, "shape": shape.name, "provider": prov, "ms": t * 1e3}
            for base in ("eager", "compile"):
                if base in times:
                    row[f"vs_{base}"] = times[base] / t
            rows.append(row)
            print(json.dumps(row), flush=True)
        _save(result)
    return result


def _criterion(backend, c, **kw):
    import adello_kernels as ak
    p = torch.rand(c, device=_device()) + 0.05
    return ak.ADELLOLoss(p / p.sum(), 1000, backend=backend, validate=False, distill_start=2,
                         **kw)


def cmd_graph(args) -> dict:
    """An ADELLOLoss step (forward + backward + update) captured once, replayed: time per replay
    against the eager step, and the replayed state against eager steps."""
    import adello_kernels as ak
    b, n, c = (8, 16, 10) if SMOKE else (256, 512, 127)
    rows = []
    for backend in [x for x in ("triton", "cuda") if x in ak.available_backends()]:
        crit_g, crit_e = _criterion(backend, c), _criterion(backend, c)
        crit_g.load_state_dict(crit_e.state_dict())
        inputs = _inputs(b, n, c, torch.float32, grad=True)
        z_l, y, z_w, z_s = inputs
        seed = torch.ones((), device=_device())
        step = functools.partial(_criterion_step, crit_g, *inputs, seed)
        t_eager = timed(functools.partial(_criterion_step, crit_e, *inputs, seed))
        if SMOKE:
            rows.append({"backend": backend, "eager_ms": t_eager * 1e3, "graph": "skipped (CPU)"})
            continue
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        z_l.grad = z_s.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        t_graph = timed(graph.replay)
        # correctness: from one state, 3 replays == 3 eager steps
        crit_e.load_state_dict(crit_g.state_dict())
        for _ in range(3):
            graph.replay()
            ref = crit_e(z_l.detach().clone().requires_grad_(), y, z_w,
                         z_s.detach().clone().requires_grad_())
        torch.cuda.synchronize()
        ok = bool(torch.allclose(out.loss, ref.loss, rtol=1e-5) and
                  torch.allclose(crit_g.prior_ulb, crit_e.prior_ulb, atol=1e-7) and
                  torch.equal(crit_g.step, crit_e.step))
        rows.append({"backend": backend, "eager_ms": t_eager * 1e3, "graph_ms": t_graph * 1e3,
                     "speedup": t_eager / t_graph, "replay_matches_eager": ok})
        print(json.dumps(rows[-1]), flush=True)
    return {"shape": [b, n, c], "rows": rows}


def _criterion_step(crit, z_l, y, z_w, z_s, seed):
    out = crit(z_l, y, z_w, z_s)
    out.loss.backward(seed)
    return out


def cmd_launches(args) -> dict:
    """Kernels per step from torch.profiler, and the no-host-sync check."""
    from torch.profiler import ProfilerActivity, profile

    import adello_kernels as ak
    b, n, c = (8, 16, 10) if SMOKE else (256, 512, 127)
    rows = []
    for backend in [x for x in ("triton", "cuda") if x in ak.available_backends()]:
        for temperature in (1.0, "imbalance_aware"):
            crit = _criterion(backend, c, temperature=temperature)
            z_l, y, z_w, z_s = _inputs(b, n, c, torch.float32, grad=True)
            for _ in range(3):
                crit(z_l, y, z_w, z_s).loss.backward()
            _sync()
            acts = [ProfilerActivity.CPU] + ([] if SMOKE else [ProfilerActivity.CUDA])
            with profile(activities=acts) as prof:
                crit(z_l, y, z_w, z_s).loss.backward()
                _sync()
            if SMOKE:
                kernels = [e.name for e in prof.events() if e.name.startswith("aten::")]
            else:
                kernels = [e.name for e in prof.events()
                           if e.device_type == torch.autograd.DeviceType.CUDA]
            sync = "skipped (CPU)"
            if not SMOKE:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    crit(z_l, y, z_w, z_s).loss.backward()
                    sync = "none"
                except RuntimeError as exc:
                    sync = f"SYNC: {str(exc)[:200]}"
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            row = {"backend": backend, "temperature": str(temperature),
                   "kernels_per_step": len(kernels), "kernels": sorted(set(kernels))[:40],
                   "host_sync": sync}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"shape": [b, n, c], "rows": rows}


def cmd_memcheck(args) -> dict:
    """Tiny steps of every regime (packed rows, one row a tile, the column loop, bad labels,
    a non-finite weak logit, T != 1), forward and backward, for compute-sanitizer to watch."""
    from adello_kernels.ops import flexda_triton as ft
    results = []
    for c, loop in ((100, False), (1000, False), (300, True)):
        saved = ft.MAX_FUSED_BLOCK_C, ft.LOOP_BLOCK_C
        if loop:
            ft.MAX_FUSED_BLOCK_C, ft.LOOP_BLOCK_C = 128, 128
        try:
            for dtype in (torch.float32, torch.bfloat16):
                z_l, y, z_w, z_s = _inputs(13, 17, c, dtype, grad=True)
                y = y.clone()
                y[3] = c + 2
                y[5] = -1
                z_w = z_w.clone()
                z_w[2, 1] = float("nan")
                state = _state(c)
                state = state[:4] + (torch.tensor(2.0, device=_device()),)
                out = _step_call((z_l, y, z_w, z_s), state, update=True)
                (out[0] * 1.5).backward()
                _sync()
                results.append({"C": c, "loop": loop, "dtype": str(dtype),
                                "loss_nan": bool(torch.isnan(out[0])),
                                "skipped": int(state[3])})
        finally:
            ft.MAX_FUSED_BLOCK_C, ft.LOOP_BLOCK_C = saved
    print(json.dumps(results))
    return {"rows": results}


def cmd_registers(args) -> dict:
    from adello_kernels.ops import flexda_triton as ft
    rows = []
    if SMOKE:
        rows.append({"note": "needs a GPU (compiled kernel metadata)"})
        cfg = ft.kernel_config(1000, torch.float32)
        rows.append({"config": cfg._asdict(), "occupancy_128_regs": ft.occupancy(128, 0, 8)})
        return {"rows": rows}
    for c in (100, 127, 1000, 8192):
        for dtype in (torch.float32, torch.bfloat16):
            try:
                row = ft.rows_kernel_resources(c, dtype)
            except Exception as exc:  # noqa: BLE001
                row = {"C": c, "dtype": str(dtype), "error": repr(exc)[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows}


SWEEP = [("default", {}),
         ("rows1-w8-cap80", {"TILE_ELEMS": 1024, "THREAD_ELEMS": 4, "MAX_REGISTERS": 80}),
         ("rows1-w8-cap64", {"TILE_ELEMS": 1024, "THREAD_ELEMS": 4, "MAX_REGISTERS": 64}),
         ("rows2-w16-nocap", {"THREAD_ELEMS": 4, "MAX_REGISTERS": None}),
         ("4/SM", {"PROGRAMS_PER_SM": 4}), ("1/SM", {"PROGRAMS_PER_SM": 1}),
         ("tile4096", {"TILE_ELEMS": 4096})]


def cmd_sweep(args) -> dict:
    from adello_kernels.ops import flexda_triton as ft
    b, n, c = _bandwidth_shape()
    names = ("TILE_ELEMS", "THREAD_ELEMS", "MAX_REGISTERS", "PROGRAMS_PER_SM")
    base = {k: getattr(ft, k) for k in names}
    cp = copy_gbs()
    rows = []
    result = {"shape": [b, n, c], "copy_gbs": cp, "rows": rows}
    for dname in ("fp32", "bf16"):
        dtype = _dtype(dname)
        z = _inputs(b, n, c, dtype)
        state = _state(c)
        nbytes = dtype.itemsize * c * (2 * b + 3 * n)
        for name, change in SWEEP:
            for k, v in {**base, **change}.items():
                setattr(ft, k, v)
            ft._OCCUPANCY.clear()
            try:
                t = timed(functools.partial(_step_call, z, state), iters=10)
                row = {"dtype": dname, "variant": name, "ms": t * 1e3, "gbs": nbytes / t / 1e9,
                       "pct_copy": 100 * nbytes / t / 1e9 / cp,
                       "config": ft.kernel_config(c, dtype)._asdict()}
                if not SMOKE:
                    res = ft.rows_kernel_resources(c, dtype)
                    row.update({k: res[k] for k in ("n_regs", "n_spills", "programs_per_sm",
                                                    "grid")})
            except Exception as exc:  # noqa: BLE001
                row = {"dtype": dname, "variant": name, "error": repr(exc)[:300]}
            rows.append(row)
            _save(result)
            print(json.dumps(row), flush=True)
        z = None   # free the inputs before the next dtype's
    for k, v in base.items():
        setattr(ft, k, v)
    ft._OCCUPANCY.clear()
    return result


# ---------------------------------------------------------------------------------------------

def cmd_summary(args) -> dict:
    d = args.dir
    parts = {}
    for path in sorted(glob.glob(os.path.join(d, "part_*.json"))):
        with open(path) as f:
            try:
                parts[os.path.basename(path)[5:-5]] = json.load(f)
            except ValueError:
                parts[os.path.basename(path)[5:-5]] = {"error": "unreadable"}
    phases = []
    tsv = os.path.join(d, "phases.tsv")
    if os.path.exists(tsv):
        with open(tsv) as f:
            for line in f:
                name, status, rc, secs, last = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
                phases.append({"phase": name, "status": status, "exit": rc,
                               "seconds": int(secs or 0), "result": last})
    summary = {"phases": phases, **parts}
    goals = []
    bw = parts.get("bandwidth", {})
    for r in bw.get("rows", []):
        if r.get("provider") in ("triton:fwd", "triton:step-fwd", "cuda:fwd"):
            goals.append({"goal": f"bandwidth {r['dtype']} {r['provider']} % of copy",
                          "value": r.get("pct_copy"), "target": 85.0})
    for r in parts.get("steps", {}).get("rows", []):
        if r.get("provider") in ("triton", "cuda") and "vs_compile" in r:
            goals.append({"goal": f"imagenet127 {r['dtype']} {r['provider']} vs compile",
                          "value": r["vs_compile"], "target": 3.0})
    for r in parts.get("launches", {}).get("rows", []):
        if r.get("backend") == "triton" and r.get("temperature") == "1.0":
            goals.append({"goal": "triton step kernels (incl. the backward seed fill)",
                          "value": r["kernels_per_step"], "target": 4, "lower": True})
    for g in goals:
        v = g["value"]
        g["met"] = None if v is None else (v <= g["target"] if g.get("lower") else
                                           v >= g["target"])
    summary["goals"] = goals
    with open(os.path.join(d, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)

    env = parts.get("env", {})
    print(f"\n== gpu_check summary: {env.get('device')} torch {env.get('torch')} "
          f"triton {env.get('triton')} backends {env.get('available_backends')}")
    for p in phases:
        print(f"  {p['phase']:<11} {p['status']:<8} {p['seconds']:>4d}s  {p['result']}")
    if bw:
        print(f"  bandwidth shape {bw.get('shape')}, copy {bw.get('copy_gbs', 0):.0f} GB/s")
        for r in bw.get("rows", []):
            print(f"    {r['dtype']:<5} {r['provider']:<16} {r['ms']:>8.3f} ms "
                  f"{r['gbs']:>7.0f} GB/s {r['pct_copy']:>5.1f}% of copy")
    for r in parts.get("steps", {}).get("rows", []):
        if "error" in r:
            print(f"    step {r['dtype']} {r['provider']}: error {r['error'][:80]}")
            continue
        ve = f"{r['vs_eager']:.1f}x" if "vs_eager" in r else "-"
        vc = f"{r['vs_compile']:.1f}x" if "vs_compile" in r else "-"
        print(f"    step {r['shape']:<12} {r['dtype']:<5} {r['provider']:<8} {r['ms']:>8.3f} ms"
              f"  vs eager {ve:>6}  vs compile {vc:>6}")
    for r in parts.get("graph", {}).get("rows", []):
        print(f"    graph {r}")
    for r in parts.get("launches", {}).get("rows", []):
        print(f"    launches {r['backend']} T={r['temperature']}: {r['kernels_per_step']} kernels,"
              f" host sync: {r['host_sync']}")
    for r in parts.get("registers", {}).get("rows", []):
        print(f"    registers {r}")
    for r in parts.get("sweep", {}).get("rows", []):
        if "error" in r:
            print(f"    sweep {r['dtype']} {r['variant']}: error {r['error'][:80]}")
        else:
            print(f"    sweep {r['dtype']:<5} {r['variant']:<16} {r['ms']:>8.3f} ms "
                  f"{r['pct_copy']:>5.1f}% of copy  regs {r.get('n_regs')} "
                  f"spills {r.get('n_spills')} {r.get('programs_per_sm')}/SM")
    table = parts.get("table", {})
    for r in table.get("rows", []) if isinstance(table, dict) else []:
        if not isinstance(r, dict) or "ms" not in r:
            continue
        ratios = "  ".join(f"{k} {r[k]:.1f}x" for k in ("vs_eager", "vs_compile")
                           if isinstance(r.get(k), (int, float)))
        print(f"    table {r.get('shape', '?'):<18} {r.get('provider', '?'):<14} "
              f"{r['ms']:>9.3f} ms  {ratios}")
    for g in goals:
        mark = {True: "MET", False: "MISSED", None: "n/a"}[g["met"]]
        v = "-" if g["value"] is None else f"{g['value']:.2f}"
        print(f"  goal {mark:<6} {g['goal']}: {v} (target {g['target']})")
    return summary


COMMANDS = {"env": cmd_env, "bandwidth": cmd_bandwidth, "steps": cmd_steps, "graph": cmd_graph,
            "launches": cmd_launches, "memcheck": cmd_memcheck, "registers": cmd_registers,
            "sweep": cmd_sweep, "summary": cmd_summary}


def main(argv=None) -> int:
    global SMOKE, JSON_PATH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=sorted(COMMANDS))
    ap.add_argument("--json", help="write this phase's result here")
    ap.add_argument("--dir", default=".", help="summary: the folder of part_*.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    args = ap.parse_args(argv)
    SMOKE = args.cpu_smoke
    JSON_PATH = args.json
    if not SMOKE and args.command != "summary" and not torch.cuda.is_available():
        print("no CUDA device (use --cpu-smoke for a dry run)")
        return 2
    try:
        result = COMMANDS[args.command](args)
    except Exception:  # noqa: BLE001  the phase fails, its traceback goes to the log
        traceback.print_exc()
        result, rc = {}, 1
        if args.json and os.path.exists(args.json):   # keep the rows saved so far
            try:
                with open(args.json) as f:
                    result = json.load(f)
            except ValueError:
                result = {}
        result["error"] = traceback.format_exc()[-2000:]
    else:
        rc = 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return rc


if __name__ == "__main__":
    sys.exit(main())
