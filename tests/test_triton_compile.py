"""Ahead-of-time compile check of the Triton kernels for real GPUs, without a GPU.

Every specialisation the launcher of adello_kernels/ops/flexda_triton.py can pick (each logits
dtype x each `kernel_config` the heuristics can return, see `all_kernel_configs`) and the
finalize kernel (fp32 and fp64 accumulation) are compiled with `triton.compile` for sm_80 (A100)
and sm_90 (H100/H200) down to PTX and a cubin (Triton's bundled ptxas). A kernel that would not
build on a real GPU (an unsupported op for a dtype, a layout that cannot be lowered, a shared
memory or register overflow) fails here, in CI.

Besides the constexprs, a configuration says whether rows are 16-byte aligned: Triton's JIT
specialises the integer argument `row_bytes` on divisibility by 16, which turns accesses into
16-byte vectors, and the launcher caps registers only then. Pointers are compiled as 16-byte
aligned, as Triton's JIT specialises fresh torch allocations. The JIT also turns an integer
argument equal to 1 into a constexpr, so B = N = 1 (and P = C = 1 in the finalize kernel) are
compiled too: a kernel calling a tensor method such as `.to()` on one of them fails only there.

The compiled cubins are also checked for register spills: the fp32-accumulating configurations
are capped at 128 registers (two 8-warp programs per SM) on the premise that ptxas needs no
spill there; a kernel change that breaks this premise shows up here as local-memory use.

Triton caches compiled kernels (~/.triton/cache): the first run compiles about 90 kernels (about
3 minutes of CPU time), later runs of an unchanged kernel take seconds.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted functions, which triton.compile "
                "cannot lower; run this file without the interpreter", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from adello_kernels.ops import flexda_triton as ft  # noqa: E402

ARCHS = (80, 90)
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
             torch.float64: "fp64"}


def _signature(kernel, pointer_types: dict[str, str]) -> tuple[dict, dict]:
    """Triton signature (every argument of `kernel` typed; ints as i32, the float64 bit patterns
    *_bits as i64, constexprs as 'constexpr') and the 16-byte alignment attributes of its
    pointers."""
    sig, attrs = {}, {}
    for i, p in enumerate(kernel.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i64" if name.endswith("_bits") else "i32"
    return sig, attrs


def _aligned(kernel, attrs: dict, name: str) -> dict:
    """`attrs` plus: integer argument `name` is a multiple of 16."""
    index = [p.name for p in kernel.params].index(name)
    return {**attrs, (index,): [["tt.divisibility", 16]]}


def _fwd_pointer_types(dtype: torch.dtype, step: bool = False) -> dict[str, str]:
    """Pointer types of `_rows_kernel`: flexda_fwd_triton passes ds, du and hparams in the acc
    dtype (du again as the unused target pointer, hparams as the unused step pointer);
    flexda_step_triton the fp32 priors (the target prior: Q or a fixed one), the fp32
    temperature and the int64 step counter. The prior weights are acc (or the mask buffer as a
    placeholder when unweighted)."""
    e = TRITON_TYPE[dtype]
    a = "fp64" if dtype == torch.float64 else "fp32"
    types = {"zl_ptr": e, "zw_ptr": e, "zs_ptr": e, "glb_ptr": e, "gs_ptr": e,
             "y_ptr": "i64", "plab_ptr": "i64", "loss_part_ptr": a, "prior_part_ptr": a,
             "mask_ptr": a, "wt_ptr": a}
    if step:
        types.update(adj_l_ptr="fp32", adj_u_ptr="fp32", tgt_ptr="fp32", hp_ptr="fp32",
                     step_ptr="i64")
    else:
        types.update(adj_l_ptr=a, adj_u_ptr=a, tgt_ptr=a, hp_ptr=a, step_ptr=a)
    return types


def _rows_constexprs(cfg, mode: str) -> dict:
    """mode: 'fwd' (flexda_fwd_triton: raw and EM batch prior in one kernel, the estimator read
    from hparams), 'step' (flexda_step_triton, flexda on), 'step-noflexda', 'step-em' (flexda
    on, prior_em=True: the PRIOR_EM specialisation); a '-w' suffix adds the per-row prior
    weights (the WEIGHTED specialisation), a '-dall' suffix distill_all (DISTILL_ALL: every row
    distils), e.g. 'step-w', 'fwd-dall', 'step-em-w-dall'."""
    tokens = mode.split("-")
    fwd = tokens[0] == "fwd"
    adj = ft.ADJ_LOADED if fwd else ft.ADJ_ZERO if "noflexda" in tokens else ft.ADJ_PRIORS
    return {"ROWS": cfg.rows, "BLOCK_C": cfg.block_c, "LOOP_C": cfg.loop_c,
            "ADJ": adj.value, "STEP": not fwd, "PRIOR_EM": "em" in tokens,
            "WEIGHTED": "w" in tokens, "DISTILL_ALL": "dall" in tokens}


def _local_memory_bytes(cubin: bytes, tmp_path) -> int | None:
    """STACK + LOCAL bytes per thread reported by cuobjdump for `cubin` (None: no cuobjdump)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if tool is None:
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    fields = dict(tok.split(":", 1) for tok in out.split() if ":" in tok
                  and tok.split(":", 1)[1].isdigit())
    return int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


def _check_binary(compiled, arch: int) -> None:
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx, "PTX for the wrong architecture"
    assert ".entry" in ptx
    cubin = compiled.asm["cubin"]
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF", "no cubin produced"


# The step kernel (the training path) on both architectures; the row op's variant (same row
# code, ds/du loaded instead of computed, the batch prior's estimator a runtime branch) and the
# flexda=False step on sm_90 only, to bound the CPU time of this file; the EM step's
# specialisation on sm_90 at the bandwidth shape (fp32, bf16), an unaligned row and the column
# loop (its spill check included where capped); the prior weights' (WEIGHTED) and distill_all's
# (DISTILL_ALL) specialisations likewise, alone and combined with the others, on sm_90.
FWD_CASES = ([(dtype, cfg, arch, "step") for dtype in ft.LOGITS_DTYPES
              for cfg in ft.all_kernel_configs(dtype) for arch in ARCHS]
             + [(dtype, cfg, 90, "fwd") for dtype in ft.LOGITS_DTYPES
                for cfg in ft.all_kernel_configs(dtype)]
             + [(torch.float32, ft.kernel_config(c, torch.float32), 90, "step-noflexda")
                for c in (1000, 20000)]
             + [(dtype, ft.kernel_config(c, dtype), 90, "step-em")
                for dtype, c in ((torch.float32, 1000), (torch.bfloat16, 1000),
                                 (torch.bfloat16, 127), (torch.float32, 20000),
                                 (torch.float64, 1000))]
             + [(dtype, ft.kernel_config(c, dtype), 90, mode)
                for dtype, c, mode in ((torch.float32, 1000, "step-w"),
                                       (torch.bfloat16, 127, "fwd-w"),
                                       (torch.float32, 20000, "step-w"),
                                       (torch.float32, 20000, "fwd-w"),
                                       (torch.float32, 20000, "step-em-w"))]
             + [(dtype, ft.kernel_config(c, dtype), 90, mode)
                for dtype, c, mode in ((torch.float32, 1000, "step-dall"),
                                       (torch.bfloat16, 1000, "step-dall"),
                                       (torch.bfloat16, 127, "fwd-dall"),
                                       (torch.float32, 20000, "step-dall"),
                                       (torch.bfloat16, 20000, "step-dall"),
                                       (torch.float32, 20000, "fwd-dall"),
                                       (torch.float32, 20000, "step-em-dall"),
                                       (torch.float32, 1000, "step-w-dall"),
                                       (torch.float32, 20000, "step-w-dall"),
                                       (torch.float64, 1000, "step-dall"))])


def _fwd_id(case) -> str:
    dtype, cfg, arch, mode = case
    regime = "loop" if cfg.loop_c else "fused"
    return (f"{mode}-sm{arch}-{DTYPE_IDS[dtype]}-{regime}-rows{cfg.rows}-block{cfg.block_c}"
            f"-w{cfg.num_warps}-{'rows16B' if cfg.aligned else 'unaligned'}")


def test_dispatcher_choices_are_all_listed():
    """`all_kernel_configs` (what this file compiles) covers what `kernel_config` returns."""
    for dtype in ft.LOGITS_DTYPES:
        listed = set(ft.all_kernel_configs(dtype))
        for c in list(range(1, 300)) + [500, 999, 1000, 1024, 2047, 2049, 4096, 4097, 8192,
                                        10000, 32768, 100000]:
            assert ft.kernel_config(c, dtype) in listed, (dtype, c)


def compile_rows(dtype, cfg, arch: int, mode: str = "step"):
    """`_rows_kernel` compiled for one specialisation (the launcher's options)."""
    kernel = ft._rows_kernel
    sig, attrs = _signature(kernel, _fwd_pointer_types(dtype, not mode.startswith("fwd")))
    if cfg.aligned:
        attrs = _aligned(kernel, attrs, "row_bytes")
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs, constexprs=_rows_constexprs(cfg, mode))
    options = {"num_warps": cfg.num_warps}
    if cfg.maxnreg:
        options["maxnreg"] = cfg.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


@pytest.mark.parametrize("case", FWD_CASES, ids=_fwd_id)
def test_fwd_kernel_compiles(case, tmp_path):
    dtype, cfg, arch, mode = case
    compiled = compile_rows(dtype, cfg, arch, mode)
    _check_binary(compiled, arch)
    if cfg.aligned:
        vector = "ld.global.v2.b64" if dtype == torch.float64 else "ld.global.v4"
        assert vector in compiled.asm["ptx"], "16-byte rows but no 16-byte loads"
    if cfg.maxnreg:
        spill = _local_memory_bytes(compiled.asm["cubin"], tmp_path)
        # a few bytes of stack are tolerated (ptxas saves a register pair across a call)
        assert spill is None or spill <= 16, f"{spill} bytes of local memory per thread"


def _finalize_pointer_types(acc: str, step: bool, weighted: bool = False) -> dict[str, str]:
    types = {name: acc for name in ("loss_part_ptr", "prior_part_ptr", "loss_ptr", "ls_ptr",
                                    "lu_ptr", "ld_ptr", "prior_ptr")}
    if weighted:   # the [N] prior weights (acc)
        types["wt_ptr"] = acc
    if step:   # temperature, step, skipped_updates, prior_ulb (fp32 state)
        types.update(hp_ptr="fp32", step_ptr="i64", skipped_ptr="i64", q_ptr="fp32")
    else:      # hparams (the state pointers are unused stand-ins)
        types.update(hp_ptr=acc, step_ptr=acc, skipped_ptr=acc, q_ptr=acc)
    return types


def _finalize_signature(acc: str, step: bool, weighted: bool) -> tuple[dict, dict, dict]:
    """Signature, attributes and the weights' constexprs of `_finalize_kernel`: the launcher
    passes wt_ptr=None unweighted (Triton makes a None argument a constexpr, so the kernel's
    parameters are those it had before prior weights), the weights' tensor when weighted."""
    sig, attrs = _signature(ft._finalize_kernel, _finalize_pointer_types(acc, step, weighted))
    constexprs = {"WEIGHTED": weighted}
    if not weighted:
        sig["wt_ptr"] = "constexpr"
        constexprs["wt_ptr"] = None
    return sig, attrs, constexprs


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("acc", ["fp32", "fp64"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "w"])
@pytest.mark.parametrize("mode", [(False, False), (True, False), (True, True)],
                         ids=["fwd", "step", "step-update"])
def test_finalize_kernel_compiles(acc, arch, mode, weighted):
    step, update = mode
    sig, attrs, wconst = _finalize_signature(acc, step, weighted)
    src = ASTSource(fn=ft._finalize_kernel, signature=sig, attrs=attrs,
                    constexprs={"BLOCK_P": ft.FIN_BLOCK_P, "BLOCK_C": ft.FIN_BLOCK_C,
                                "STEP": step, "UPDATE": update, **wconst})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": ft.FIN_NUM_WARPS})
    _check_binary(compiled, arch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype", ft.LOGITS_DTYPES, ids=DTYPE_IDS.get)
def test_scale_kernel_compiles(dtype, arch):
    e = TRITON_TYPE[dtype]
    acc = "fp64" if dtype == torch.float64 else "fp32"
    sig, attrs = _signature(ft._scale_kernel, {"a_ptr": e, "b_ptr": e, "g_ptr": acc})
    src = ASTSource(fn=ft._scale_kernel, signature=sig, attrs=attrs,
                    constexprs={"BLOCK": ft.SCALE_BLOCK})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": ft.SCALE_NUM_WARPS})
    _check_binary(compiled, arch)


UNIT_CASES = [(torch.float32, ft.kernel_config(1000, torch.float32)),
              (torch.bfloat16, ft.kernel_config(20000, torch.bfloat16)),
              (torch.float64, ft.kernel_config(10, torch.float64))]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("mode", ["step", "step-w-dall"])
@pytest.mark.parametrize("case", UNIT_CASES, ids=lambda c: f"{DTYPE_IDS[c[0]]}-"
                         f"{'loop' if c[1].loop_c else 'fused'}")
def test_fwd_kernel_compiles_with_one_row(case, arch, mode):
    """B = N = 1: Triton's JIT passes them as constexpr 1 (also with prior weights and
    distill_all, whose code reads N)."""
    dtype, cfg = case
    sig, attrs = _signature(ft._rows_kernel, _fwd_pointer_types(dtype, True))
    sig["B"] = sig["N"] = "constexpr"
    src = ASTSource(fn=ft._rows_kernel, signature=sig, attrs=attrs,
                    constexprs={**_rows_constexprs(cfg, mode), "B": 1, "N": 1})
    options = {"num_warps": cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {})}
    _check_binary(triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options), arch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "w"])
def test_finalize_kernel_compiles_with_unit_sizes(arch, weighted):
    """P = B = N = C = 1 (one program, one class): constexpr 1 for each."""
    sig, attrs, wconst = _finalize_signature("fp32", True, weighted)
    for name in ("P", "B", "N", "C"):
        sig[name] = "constexpr"
    src = ASTSource(fn=ft._finalize_kernel, signature=sig, attrs=attrs,
                    constexprs={"BLOCK_P": ft.FIN_BLOCK_P, "BLOCK_C": ft.FIN_BLOCK_C,
                                "STEP": True, "UPDATE": True, "P": 1, "B": 1, "N": 1, "C": 1,
                                **wconst})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": ft.FIN_NUM_WARPS})
    _check_binary(compiled, arch)


# ---- registers, spills and occupancy at the bandwidth shape ---------------------------------

def resource_usage(cubin: bytes, tmp_path) -> dict[str, int] | None:
    """REG / STACK / LOCAL / SHARED of a cubin from cuobjdump (None: no cuobjdump)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if tool is None:
        return None
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return {k: int(v) for k, v in (tok.split(":", 1) for tok in out.split()
                                   if ":" in tok and tok.split(":", 1)[1].isdigit())}


def register_report(tmp_path, classes: int = 1000, arch: int = 90) -> list[dict]:
    """The step kernel's resources at C = `classes` for fp32 and bf16 on sm_`arch`, and the
    programs per SM that `ft.occupancy` (what the launcher's grid uses) derives from them."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        cfg = ft.kernel_config(classes, dtype)
        compiled = compile_rows(dtype, cfg, arch, "step")
        res = resource_usage(compiled.asm["cubin"], tmp_path) or {}
        shared = int(compiled.metadata.shared)
        regs = res.get("REG")
        rows.append({"dtype": DTYPE_IDS[dtype], "config": cfg._asdict(), "n_regs": regs,
                     "n_spills_bytes": res.get("STACK", 0) + res.get("LOCAL", 0),
                     "shared": shared,
                     "programs_per_sm": regs and ft.occupancy(regs, shared, cfg.num_warps)})
    return rows


def test_bandwidth_shape_grid_matches_what_fits(tmp_path):
    """At the bandwidth shape (C = 1000) the register cap must hold without a spill, and the
    occupancy it implies (the launcher's grid) must be what the cap was chosen for: two 8-warp
    programs per SM. A kernel change that needs more registers shows up here as a spill or as
    fewer programs per SM (and the grid follows it)."""
    for row in register_report(tmp_path):
        print(row)
        if row["n_regs"] is None:
            pytest.skip("no cuobjdump: register counts unavailable")
        cfg = row["config"]
        assert row["n_spills_bytes"] <= 16, row
        assert cfg["maxnreg"] is None or row["n_regs"] <= cfg["maxnreg"], row
        expect = ft.occupancy(cfg["maxnreg"] or row["n_regs"], row["shared"], cfg["num_warps"])
        assert row["programs_per_sm"] == expect >= 2, row


def test_occupancy_arithmetic():
    """The occupancy formula on Hopper limits: registers in 256-register warp units, warps,
    shared memory, 32 blocks."""
    assert ft.occupancy(128, 0, 8) == 2          # 128 x 32 x 8 = 32 K registers a program
    assert ft.occupancy(151, 0, 8) == 1          # 152 x 256 x 8 > 32 K
    assert ft.occupancy(80, 0, 8) == 3
    assert ft.occupancy(64, 0, 8) == 4
    assert ft.occupancy(32, 0, 4) == 16          # warps: 64 / 4
    assert ft.occupancy(16, 0, 1) == 32          # the block limit
    assert ft.occupancy(32, 100 * 1024, 4) == 2  # shared memory: 228 KiB / 100 KiB
