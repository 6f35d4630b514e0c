"""The AOT compile report (gradkernels.aot) and the GPU validation script (bench/gpu_run.sh).

The fast tests compile a handful of real kernel specialisations for sm_80 and sm_90 on the CPU (a few
seconds each); the full report over every kernel, config, dtype and architecture is ``slow``.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

from gradkernels import aot
from gradkernels.kernels import linear as KL

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = ROOT / "bench" / "gpu_run.sh"


def _linear_rows(case, dtype, archs=(80, 90), config_filter=None, kernels=None, include_pruned=False):
    rows = aot.build_rows(archs, kernels=kernels, dtypes=[dtype], cases=[case], include_pruned=include_pruned,
                          config_filter=config_filter)
    return [r for r in rows if r.case == case]  # the CLI's --case matches substrings: keep the exact one


# ---------------------------------------------------------------------------------------------------
# Signatures derived from the recorded launches (no compiling)
# ---------------------------------------------------------------------------------------------------


def test_signature_follows_kernel_parameters_and_launch():
    rows = _linear_rows("fwd-gelu", "fp16", archs=(90,))
    assert {r.kernel for r in rows} == {"_linear_kernel"}
    params = [p.name for p in aot.kernel_params(KL._linear_kernel)]
    configs = KL.get_linear_configs()
    assert len(rows) == len(configs), "one row per config of the factory"
    job = next(r.job for r in rows if r.job is not None)
    sig = dict(job.signature)
    consts = dict(job.constexprs)
    assert [n for n, _ in job.signature] == params, "signature in the kernel's parameter order"
    # fwd with bias + gelu + stored pre-activation: pointers typed, unused ones constexpr None.
    for name in ("A", "B", "C", "BIAS", "PRE_OUT"):
        assert sig[name] == "*fp16", name
    for name in ("PRE_IN", "WS", "ROWSUM"):
        assert sig[name] == "constexpr" and consts[name] is None, name
    # Unit strides are specialised to the constant 1, like a real launch; others are aligned i32.
    assert consts["stride_ak"] == 1 and consts["stride_cn"] == 1
    assert sig["stride_am"] == "i32" and "stride_am" in job.aligned
    assert consts["EPILOGUE_ACT"] == "gelu" and consts["HAS_BIAS"] is True and consts["STORE_PRE"] is True
    assert consts["SPLIT_K"] == 1 and consts["INPUT_PRECISION"] == "ieee"
    opts = dict(job.options)
    cfg = next(c for c in configs if aot.config_label(c) == next(r.config for r in rows if r.job == job))
    assert opts["num_warps"] == cfg.num_warps and opts["num_stages"] == cfg.num_stages
    assert all(consts[k] == v for k, v in cfg.kwargs.items())


def test_dtype_variants_set_input_precision_and_pointer_types():
    tf32 = next(r.job for r in _linear_rows("dx-gelu", "fp32-tf32", archs=(80,)) if r.job is not None)
    ieee = next(r.job for r in _linear_rows("dx-gelu", "fp32-ieee", archs=(80,)) if r.job is not None)
    bf16 = next(r.job for r in _linear_rows("dx-gelu", "bf16", archs=(80,)) if r.job is not None)
    assert dict(tf32.constexprs)["INPUT_PRECISION"] == "tf32"
    assert dict(ieee.constexprs)["INPUT_PRECISION"] == "ieee"
    assert dict(bf16.signature)["A"] == "*bf16"
    # dX launch: the prologue reads the pre-activation, no epilogue activation, no row sums.
    c = dict(bf16.constexprs)
    assert c["PROLOGUE_ACT"] == "gelu" and c["EPILOGUE_ACT"] is None and c["ROW_SUM"] is False
    assert dict(bf16.signature)["PRE_IN"] == "*bf16"


def test_split_cases_cover_the_reduce_kernel():
    rows = _linear_rows("dw-gelu-split", "fp16", archs=(90,))
    reduce_rows = [r for r in rows if r.kernel == "_linear_split_reduce_kernel"]
    # dW partials and the bias-gradient (row sum) partials: two reduce launches.
    assert len(reduce_rows) == 2
    for r in reduce_rows:
        c = dict(r.job.constexprs)
        assert c["SPLIT_K"] == 4 and dict(r.job.options)["num_warps"] == KL.REDUCE_WARPS
        assert dict(r.job.signature)["WS"] == "*fp32", "partials are in the accumulator dtype"
    main = [r for r in rows if r.kernel == "_linear_kernel" and r.job is not None]
    assert main and all(dict(r.job.constexprs)["ROW_SUM"] is True for r in main)


@pytest.mark.parametrize("dtype,nbytes", [("fp64", 8), ("fp32-tf32", 4), ("bf16", 2)])
def test_pruned_configs_are_the_launchers_prune_for_each_arch(dtype, nbytes):
    """The report checks what the autotuner may pick: keep() for that arch, with or without the launch's
    flags (whichever the launcher passes), falling back to the last config when keep() rejects all."""
    configs = KL.get_linear_configs()
    picked = {}
    for arch in (80, 90):
        rows = [r for r in _linear_rows("dw-gelu", dtype, archs=(arch,)) if r.kernel == "_linear_kernel"]
        assert len(rows) == len(configs)
        flags = next(dict(r.job.constexprs) for r in rows if r.job is not None)
        candidates = []
        for f in (None, flags):
            kept = [aot.config_label(c) for c in configs if KL.keep(c, nbytes, arch, flags=f)]
            candidates.append(set(kept or [aot.config_label(configs[-1])]))
        got = {r.config for r in rows if not r.pruned}
        assert got in candidates, (arch, got, candidates)
        assert all((r.job is None) == r.pruned for r in rows)
        picked[arch] = got
    assert all(len(k) < len(configs) for k in picked.values())
    if nbytes == 4:
        assert picked[80] != picked[90], "shared memory and register rules differ between sm_80 and sm_90"


def test_launcher_prune_sees_a_cuda_device_of_the_arch_and_the_launch_flags():
    """launcher_prune runs the launcher's prune as the autotuner would on an sm_80 / sm_90 device."""
    seen = {}

    def spy(configs, named_args, **kwargs):
        a = named_args["A"]
        seen.update(cap=torch.cuda.get_device_capability(a.device), cuda=a.is_cuda, size=a.element_size(),
                    flags=kwargs, has_block=any(k.startswith("BLOCK") for k in kwargs))
        return configs[:1]

    launch = _launch("fwd-gelu", "bf16")
    before = torch.cuda.get_device_capability
    for arch in (80, 90):
        out = aot.launcher_prune(spy)(KL.get_linear_configs(), launch, arch)
        assert len(out) == 1
        assert seen["cap"] == divmod(arch, 10) and seen["cuda"] and seen["size"] == 2
        assert seen["flags"]["EPILOGUE_ACT"] == "gelu" and seen["flags"]["STORE_PRE"] is True
        assert seen["flags"]["INPUT_PRECISION"] == "ieee" and not seen["has_block"]
    assert torch.cuda.get_device_capability is before, "the capability query is restored"


def test_attention_launches_follow_the_launcher():
    """Forward and backward attention launches: types from the tensors and the kernels' annotations,
    lengths not specialised (do_not_specialize), head dims and flags from the launcher, the preprocess
    kernel with the tiles a GPU launch uses, and the launcher's own prune per architecture."""
    from gradkernels.kernels import attention as KA

    rows = aot.build_rows([80, 90], kernels=["attn"], dtypes=["bf16"], cases=["attn-bwd-d80-full"])
    kernels = {r.kernel for r in rows}
    assert kernels == {"_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}
    dq = next(r.job for r in rows if r.kernel == "_attn_bwd_dq_kernel" and r.job is not None)
    sig, consts = dict(dq.signature), dict(dq.constexprs)
    assert sig["Q"] == "*bf16" and sig["LSE"] == "*fp32" and sig["SM_SCALE"] == "fp64"
    assert sig["LQ"] == "i32" and "LQ" not in dq.aligned, "do_not_specialize: no divisibility on lengths"
    assert consts["HEAD_D"] == 80 and consts["BLOCK_D"] == 128 and consts["IS_CAUSAL"] is False
    pre = next(r for r in rows if r.kernel == "_attn_bwd_preprocess_kernel")
    assert dict(pre.job.constexprs)["BLOCK_M"] == KA.preprocess_config(80, 2)["BLOCK_M"] == 64
    assert dict(pre.job.options)["num_warps"] == KA.PREPROCESS_WARPS
    for arch in (80, 90):
        fwd = [r for r in aot.build_rows([arch], kernels=["attn"], dtypes=["fp16"], cases=["attn-fwd-d128-causal"])]
        kept = {r.config for r in fwd if not r.pruned}
        expect = {aot.config_label(c) for c in KA.get_attn_fwd_configs()
                  if KA.keep(c, 128, 2, arch, kernel="fwd") and c.num_stages > 1}
        assert kept and kept <= expect, (arch, kept, expect)


def test_fp32_launches_run_in_full_precision_are_not_held_to_tensor_cores():
    """Above D = 128 the attention backward runs fp32 with INPUT_PRECISION="ieee" even where tf32 is
    allowed (kernels/attention.py::backward_precision): the report judges those launches as FMA code,
    the forward (still tf32) and the D = 128 backward by the tensor-core rule."""
    rows = aot.build_rows([90], kernels=["attn"], dtypes=["fp32-tf32"], cases=["attn-bwd-d256", "attn-fwd-d256",
                                                                               "attn-bwd-d128"])
    for r in rows:
        if r.job is None or "preprocess" in r.kernel:
            continue
        precision = dict(r.job.constexprs)["INPUT_PRECISION"]
        expect = "ieee" if r.case == "attn-bwd-d256-causal" else "tf32"
        assert precision == expect, (r.case, r.kernel, precision)
        assert r.needs_tensor_cores == (expect == "tf32"), (r.case, r.kernel)


def test_include_pruned_leaves_out_tiles_certain_to_spill_unless_all_pruned():
    """Calibration runs (--include-pruned) skip the attention tiles whose accumulators and scores alone
    exceed a thread's registers; --all-pruned compiles them too. Pickable configs are never skipped."""
    from gradkernels.kernels import attention as KA

    kw = dict(kernels=["attn"], dtypes=["fp32-ieee"], cases=["attn-fwd-d256"], include_pruned=True)
    rows = aot.build_rows([90], **kw)
    skipped = [r for r in rows if r.job is None]
    assert skipped and all(r.pruned for r in skipped)
    assert all(r.job is not None for r in aot.build_rows([90], all_pruned=True, **kw))
    big = next(c for c in KA.get_attn_fwd_configs() if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 128, 8))
    assert aot.config_label(big) in {r.config for r in skipped}
    assert KA.hopeless(big, "fwd", 256, 256, 4, "ieee") and not KA.hopeless(big, "fwd", 64, 64, 2, None)


def test_attention_tile_table_lists_tiles_clean_in_every_launch(tmp_path):
    """The generator of kernels/attention_tiles.py: a tile is listed for (arch, variant, path, head-dim
    block) only when every row of it there passed (fp16 and bf16 share a path, D = 80 and 128 a block);
    single-accumulator dK/dV launches get their own variant; the written module reads back equal."""
    def row(arch, kernel, dtype, bd, tile, failures=(), **flags):
        bm, bn, w, s, *mx = tile
        return {"arch": arch, "kernel": kernel, "dtype": dtype, "result": {"regs": 1}, "failures": list(failures),
                "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DV": bd, "HEAD_D": bd,
                               "HEAD_DV": bd, **flags},
                "options": {"num_warps": w, "num_stages": s, **({"maxnreg": mx[0]} if mx else {})}}

    fwd, dkdv = "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel"
    rows = [row(90, fwd, "fp16", 128, (128, 64, 8, 3)), row(90, fwd, "bf16", 128, (128, 64, 8, 3)),
            row(90, fwd, "fp16", 128, (64, 64, 4, 3)), row(90, fwd, "bf16", 128, (64, 64, 4, 3), ["spills"]),
            row(86, fwd, "fp64", 32, (16, 16, 8, 1, 255)),
            row(80, dkdv, "fp32-ieee", 256, (16, 64, 8, 2), COMPUTE_DK=False, COMPUTE_DV=True, INPUT_PRECISION="ieee"),
            row(80, dkdv, "fp32-tf32", 64, (32, 64, 4, 3), COMPUTE_DK=True, COMPUTE_DV=True, INPUT_PRECISION="tf32"),
            # A fp32-tf32 launch the launcher runs in "ieee": FMA code, listed under that path.
            row(90, dkdv, "fp32-tf32", 256, (16, 32, 8, 2), ["no HGMMA (tensor cores unused)"], COMPUTE_DK=True,
                COMPUTE_DV=False, INPUT_PRECISION="ieee"),
            {"arch": 90, "kernel": "_attn_bwd_preprocess_kernel", "dtype": "fp16", "result": {}, "failures": [],
             "constexprs": {"BLOCK_M": 64}, "options": {"num_warps": 4}}]
    table = aot.attention_tile_table(rows)
    assert table[90]["fwd"]["tc16"][128] == [(128, 64, 8, 3, None)]
    assert table[80]["fwd"]["fma64"][64] == [(16, 16, 8, 1, 255)]
    assert table[80]["dkdv_dv"]["fma32"][256] == [(16, 64, 8, 2, None)]
    assert table[80]["dkdv"]["tc32"][64] == [(32, 64, 4, 3, None)]
    assert table[90]["dkdv_dk"]["fma32"][256] == [(16, 32, 8, 2, None)] and "tc32" not in table[90]["dkdv_dk"]
    path = tmp_path / "tiles.py"
    aot.write_attention_tiles(table, str(path), "a test")
    ns = {}
    exec(path.read_text(), ns)
    assert ns["CLEAN_TILES"][90]["fwd"]["tc16"][128] == ((128, 64, 8, 3, None),)
    assert ns["CLEAN_TILES"][80]["dkdv"]["tc32"][64] == ((32, 64, 4, 3, None),)
    assert "do not edit by hand" in path.read_text()


def test_build_rows_rejects_unknown_arch_and_dtype():
    with pytest.raises(ValueError, match="arch must be one of"):
        aot.build_rows([75])
    with pytest.raises(ValueError, match="dtype must be one of"):
        aot.build_rows([90], dtypes=["fp8"])


# ---------------------------------------------------------------------------------------------------
# Parsing cuobjdump output
# ---------------------------------------------------------------------------------------------------

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _linear_kernel:
  REG:206 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
        /*0190*/                   HGMMA.64x256x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*01a0*/                   HGMMA.64x256x16.F32 R24, gdesc[UR8], R24 ;
        /*01b0*/              @!P0 STL.64 [R1+0x8], R2 ;
        /*01c0*/                   LDL R5, [R1+0x4] ;
        /*01d0*/                   FFMA R6, R7, R8, R6 ;
        /*01e0*/                   MOV R9, c[0x0][0x210] ;
"""


def test_parse_res_usage_and_count_sass():
    assert aot.parse_res_usage(RES_USAGE) == {"regs": 206, "stack": 16, "static_shared": 1024, "local": 0}
    counts = aot.count_sass(SASS)
    assert counts["HGMMA"] == 2 and counts["STL"] == 1 and counts["LDL"] == 1 and counts["FFMA"] == 1
    assert counts["HMMA"] == 0
    with pytest.raises(ValueError, match="REG"):
        aot.parse_res_usage("no resource lines here")


def _fake_row(arch, result, needs_tc=True):
    job = aot.Job("m", "k", arch, (), (), (), (("num_warps", result.get("num_warps", 4)),))
    return aot.Row(arch, "linear", "fwd", "fp16", "k", "cfg", False, job, needs_tc, result=result)


def test_judge_names_each_failure():
    base = {"regs": 128, "stack": 0, "local": 0, "static_shared": 0, "shared": 64 * 1024, "num_warps": 4,
            "error": None, "has_dot": True, "sass": dict.fromkeys(aot.SASS_OPS, 0) | {"HGMMA": 4, "HMMA": 4}}
    assert aot.judge(_fake_row(90, base)) == []
    spill = base | {"stack": 64, "sass": base["sass"] | {"STL": 3}}
    assert "spills" in aot.judge(_fake_row(90, spill))[0]
    at_limit = base | {"shared": 226 * 1024, "static_shared": 1024}  # 227 KiB: the most one block may use
    assert aot.judge(_fake_row(90, at_limit)) == []
    over = base | {"shared": 226 * 1024, "static_shared": 2048}
    assert "smem 228.0 KiB > 227 KiB" in aot.judge(_fake_row(90, over))[0]
    assert "smem" in aot.judge(_fake_row(80, base | {"shared": 164 * 1024}))[0], "A100: 163 KiB per block"
    no_tc = base | {"sass": base["sass"] | {"HGMMA": 0}}
    assert "no HGMMA" in aot.judge(_fake_row(90, no_tc))[0]
    assert aot.judge(_fake_row(90, no_tc, needs_tc=False)) == [], "fp32-ieee / fp64 may use FMA"
    assert aot.judge(_fake_row(90, no_tc | {"has_dot": False})) == [], "no matmul, no tensor cores needed"
    assert aot.judge(_fake_row(80, no_tc)) == [], "sm_80 wants HMMA, which is there"
    regs = base | {"regs": 255, "num_warps": 16}
    assert "regs 255" in aot.judge(_fake_row(90, regs))[0]
    err = {"error": "CompilationError: boom", "seconds": 0.1}
    assert aot.judge(_fake_row(90, err))[0].startswith("compile:")


# ---------------------------------------------------------------------------------------------------
# Real compiles (the fast subset of the report)
# ---------------------------------------------------------------------------------------------------


def test_fast_subset_compiles_clean_for_sm80_and_sm90():
    """Every config the autotuner may pick for a few representative launches, both architectures.

    The gelu epilogue in fp16 (register pressure), a tf32 dX with the gelu derivative (tf32 must use
    tensor cores), a bf16 split-K dW with the gelu derivative, row sums and the reduce kernel.
    """
    rows = (_linear_rows("fwd-gelu", "fp16") + _linear_rows("dx-gelu", "fp32-tf32")
            + _linear_rows("dw-gelu-split", "bf16"))
    # The biggest and the smallest pickable tile of each launch and arch: bounded time however many
    # configs the prune keeps.
    groups = {}
    for r in rows:
        if not r.pruned:
            groups.setdefault((r.case, r.dtype, r.arch, r.kernel), []).append(r)
    rows = [r for g in groups.values() for r in {id(x): x for x in (g[0], g[-1])}.values()]
    assert len(rows) >= 10, aot.format_table(rows)
    aot.compile_rows(rows, workers=2)
    table = aot.format_table(rows)
    assert not aot.failing(rows), table
    for r in rows:
        assert r.result["error"] is None and r.result["regs"] > 0, table
        if r.kernel == "_linear_kernel":
            op = "HGMMA" if r.arch == 90 else "HMMA"
            assert r.result["sass"][op] > 0, f"{r.arch} {r.dtype}: no {op}\n{table}"


def test_keep_with_launch_flags_keeps_the_big_tiles_of_plain_matmuls():
    """keep(..., flags=...) (what the launcher can pass) keeps 128x256 tiles for a plain fp16 forward on
    sm_90 and sm_80 and drops them for the gelu epilogue; the tile it keeps compiles clean."""
    big = next(c for c in KL.get_linear_configs() if c.kwargs["BLOCK_N"] == 256)
    launch = _launch("fwd", "fp16")
    gelu = _launch("fwd-gelu", "fp16")
    flags = {k: v for k, v in launch.args.items() if k.isupper() and not k.startswith("BLOCK")}
    gelu_flags = {k: v for k, v in gelu.args.items() if k.isupper() and not k.startswith("BLOCK")}
    rows = []
    for arch in (80, 90):
        assert KL.keep(big, 2, arch, flags=flags)
        assert not KL.keep(big, 2, arch, flags=gelu_flags), "seen to spill with the gelu epilogue"
        assert not KL.keep(big, 2, arch), "unknown flags: must suit a gelu epilogue too"
        rows.append(aot.Row(arch, "linear", "fwd", "fp16", "_linear_kernel", aot.config_label(big), False,
                            aot.make_job(launch, arch, big), True))
    aot.compile_rows(rows, workers=2)
    assert not aot.failing(rows), aot.format_table(rows)


def _launch(case, dtype):
    c = next(c for c in aot.all_cases() if c.name == case)
    return next(ln for ln in aot.record_launches(c, aot.DTYPES[dtype]) if ln.kernel == "_linear_kernel")


def test_report_catches_spills_smem_overflow_missing_tensor_cores_and_compile_errors():
    """Configs built to break each rule: the report must flag every one (and not raise)."""
    launch = _launch("fwd-gelu", "fp16")

    def row(arch, cfg, needs_tc=True):
        return aot.Row(arch, "linear", "fwd-gelu", "fp16", "_linear_kernel", aot.config_label(cfg), False,
                       aot.make_job(launch, arch, cfg), needs_tc)

    tile = {"GROUP_M": 8}
    rows = [
        # 128x256 fp32 accumulator over 256 threads is 128 registers alone: a 64-register cap must spill
        # (on sm_80: mma.sync takes small fragments; sm_90's wgmma would need all 128 in one instruction
        # and ptxas refuses to compile instead of spilling).
        row(80, triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, **tile}, num_warps=8, num_stages=3,
                              maxnreg=64)),
        # 6 stages of 256x64 + 64x128 fp16 tiles: ~240 KiB of pipeline buffers, over the A100's 163 KiB.
        row(80, triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, **tile}, num_warps=8, num_stages=6)),
        # 32-row tiles cannot use wgmma (64 rows per warpgroup): mma.sync on sm_90.
        row(90, triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, **tile}, num_warps=4, num_stages=3)),
        # BLOCK_K < 16 trips the kernel's static_assert.
        row(90, triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 8, **tile}, num_warps=4, num_stages=3)),
    ]
    aot.compile_rows(rows, workers=2)
    table = aot.format_table(rows)
    spill, smem, no_tc, bad = (r.failures for r in rows)
    assert any(f.startswith("spills") for f in spill), table
    assert any(f.startswith("smem") for f in smem), table
    assert any(f.startswith("no HGMMA") for f in no_tc), table
    assert rows[2].result["sass"]["HMMA"] > 0, "the fallback is mma.sync"
    assert bad and bad[0].startswith("compile:") and "CompileTimeAssertionFailure" in bad[0], table
    assert len(aot.failing(rows)) == 4


def test_cli_runs_in_a_fresh_process_with_the_interpreter_set(tmp_path):
    """The workers must not inherit TRITON_INTERPRET (the test suite sets it); output and JSON agree."""
    out = tmp_path / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "gradkernels.aot", "--arch", "80", "--kernel", "split_reduce", "--dtype", "fp16",
         "--case", "fwd-gelu-split", "--json", str(out), "--jobs", "1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "_linear_split_reduce_kernel" in proc.stdout and "0 failing" in proc.stdout
    data = json.loads(out.read_text())
    assert data["archs"] == [80] and len(data["rows"]) == 1
    assert data["rows"][0]["result"]["error"] is None and data["rows"][0]["failures"] == []


def test_cli_rejects_bad_arguments(capsys):
    for argv, msg in ((["--arch", "75"], "unsupported"), (["--arch", "x"], "integers"),
                      (["--dtype", "fp8"], "fp8"), (["--jobs", "0"], "--jobs")):
        with pytest.raises(SystemExit) as e:
            aot.main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Autotuner picks (TRITON_PRINT_AUTOTUNING=1 output) against the report
# ---------------------------------------------------------------------------------------------------

AUTOTUNE_LOG = textwrap.dedent("""\
    some benchmark output
    Triton autotuning for function _linear_kernel,
    with key as (2048, 4096, 1024, 1, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'),
    finished after 2.31s,
    best config selected: BLOCK_M: 128, BLOCK_N: 256, BLOCK_K: 64, GROUP_M: 8, num_warps: 8, num_ctas: 1, num_stages: 3, maxnreg: None;
    Triton autotuning for function _linear_kernel,
    with key as (64, 4096, 1024, 4, 'torch.float16', 'torch.float16'),
    finished after 1.02s,
    best config selected: BLOCK_M: 32, BLOCK_N: 64, BLOCK_K: 32, GROUP_M: 8, num_warps: 4, num_ctas: 1, num_stages: 3, maxnreg: None, ir_override: None;
    Triton autotuning for function _attn_fwd,
    with key as (128, 'torch.float16'),
    finished after 1.00s,
    best config selected: BLOCK_M: 128, BLOCK_N: 64, num_warps: 4, num_ctas: 1, num_stages: 3, maxnreg: None;
    """)


def test_autotune_log_picks_are_checked_against_the_report():
    picks = aot.parse_autotune_log(AUTOTUNE_LOG)
    assert [(p["kernel"], p["dtype"], p["config"]) for p in picks] == [
        ("_linear_kernel", "bfloat16", "128x256x64x8 w8 s3"),
        ("_linear_kernel", "float16", "32x64x32x8 w4 s3"),
        ("_attn_fwd", "float16", "128x64 w4 s3"),
    ]
    ok = {"regs": 200, "stack": 0, "local": 0, "static_shared": 0, "shared": 1024, "num_warps": 8, "error": None,
          "has_dot": True,
          "sass": dict.fromkeys(aot.SASS_OPS, 0) | {"HGMMA": 4}}
    no_tc = ok | {"num_warps": 4, "sass": dict.fromkeys(aot.SASS_OPS, 0) | {"HMMA": 8}}
    rows = [
        aot.Row(90, "linear", "fwd", "bf16", "_linear_kernel", "128x256x64x8 w8 s3", False, None, True, ok),
        aot.Row(90, "linear", "fwd", "fp16", "_linear_kernel", "32x64x32x8 w4 s3", False, None, True, no_tc),
    ]
    for r in rows:
        r.job = aot.Job("m", r.kernel, 90, (), (), (), ())
        r.failures = aot.judge(r)
    verdicts = [v for _, v in aot.check_picks(picks, rows)]
    assert verdicts[0] == "ok"
    assert verdicts[1].startswith("FAIL") and "HGMMA" in verdicts[1]
    assert verdicts[2] == "not covered by the report"


# ---------------------------------------------------------------------------------------------------
# The full report (every kernel x config x dtype x case, sm_80 and sm_90)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linear", "attention"])
def test_full_report_every_pickable_config_passes(family, capsys):
    """The whole report for one kernel family, sm_80 and sm_90 (linear: ~3 min on 2 cores; attention:
    ~10 min; CI runs the same as `make aot-check`). Fails, listing the rows, while a config the autotuner
    can pick spills, overflows shared memory or misses the tensor cores."""
    status = aot.main(["--arch", "80,90", "--kernel", family, "--failures-only"])
    out = capsys.readouterr().out
    assert status == 0, out[-20000:]


# ---------------------------------------------------------------------------------------------------
# bench/gpu_run.sh (`make gpu`): what can be checked without a GPU
# ---------------------------------------------------------------------------------------------------


def _script(path, body):
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _run_gpu_script(args, env_extra=None, timeout=60):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(["bash", str(GPU_RUN), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_gpu_run_argument_errors():
    for args, msg in (([], "OUTDIR missing"), (["a", "b"], "one OUTDIR expected"), (["--bogus", "a"], "unknown")):
        proc = _run_gpu_script(args)
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr and "usage:" in proc.stderr


def test_gpu_run_refuses_without_a_gpu(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _script(bindir / "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    out = tmp_path / "out"
    proc = _run_gpu_script([str(out)], {"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert proc.returncode == 3
    assert "no NVIDIA GPU" in proc.stderr
    assert not out.exists(), "nothing is written when the run cannot start"
    # A GPU but a Python without CUDA: refused as well, naming the interpreter.
    _script(bindir / "nvidia-smi", "echo 'GPU 0: fake'\n")
    _script(bindir / "nocuda-python", "exit 1\n")
    proc = _run_gpu_script([str(out)], {"PATH": f"{bindir}:{os.environ['PATH']}",
                                        "PYTHON": str(bindir / "nocuda-python")})
    assert proc.returncode == 3 and "nocuda-python cannot use CUDA" in proc.stderr


def test_gpu_run_steps_limits_and_summary_with_a_fake_gpu(tmp_path):
    """Every step runs with the expected command; a step past the deadline is stopped; summary last."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.log"
    _script(bindir / "nvidia-smi", "echo 'GPU 0: Fake H100'\n")
    _script(bindir / "fakepy", f"""\
        echo "$*" >> {calls}
        case "$*" in
          *"-m pytest"*"not slow"*) echo "7 passed in 1.00s" ;;
          *"-m pytest"*"-m slow"*) sleep 30; echo "never printed" ;;
          *"gradkernels.bench"*) out="${{@: -1}}"; mkdir -p "$out"; echo x > "$out/linear.json";
                                 echo "Triton autotuning for function _linear_kernel," ;;
          *"gradkernels.aot"*) echo "3 rows compiled (3 distinct compiles), 0 pruned by keep(), 0 failing, 1 s" ;;
        esac
        exit 0
        """)
    out = tmp_path / "out dir"  # a space in the path must not break anything
    proc = _run_gpu_script([str(out)], {"PATH": f"{bindir}:{os.environ['PATH']}", "PYTHON": str(bindir / "fakepy"),
                                        "GPU_RUN_BUDGET_S": "8"}, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # tests_slow timed out
    lines = proc.stdout.rstrip().splitlines()
    table = lines[-10:]
    assert table[0].startswith("gradkernels GPU run:") and "Fake H100" in table[0]
    status = {ln.split()[0]: ln.split()[1] for ln in table[3:]}
    assert status == {"env": "ok", "install": "ok", "tests": "ok", "bench": "ok", "aot": "ok", "aot_real": "ok",
                      "tests_slow": "TIMEOUT"}, "\n".join(table)
    assert "7 passed" in table[5]
    log = calls.read_text()
    assert "-m pip install --no-build-isolation --no-deps -e ." in log
    assert "-m pytest -n 4 -q -m not slow" in log
    assert f"-m gradkernels.bench all --quick --out {out}/bench" in log
    assert f"--arch native --failures-only --json {out}/aot.json --autotune-log {out}/bench.log" in log
    assert "--compare-real" in log
    for name in ("env", "install", "tests", "bench", "aot", "aot_real", "tests_slow", "summary"):
        assert (out / (name + (".txt" if name == "summary" else ".log"))).exists(), name
    assert (out / "summary.txt").read_text().strip().splitlines()[-1] == table[-1]


def test_gpu_run_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(GPU_RUN)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
